"""Sweeps end to end: Hydra multirun grids and Optuna studies, against temp stores."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import optuna
import pytest

from fce.compose import compose
from tests.helpers import GRID_TINY, TINY, run_cli, runs, start_cli, store_uri

STUDY_TINY = [*TINY, "flow.n_steps=2", "flow.width=16"]


def study_args(tmp_path: Path, space: str, *extra: str) -> list[str]:
    return [
        f"sweep={space}",
        f"sweep.storage=sqlite:///{tmp_path / 'optuna.db'}",
        f"tracking.uri={store_uri(tmp_path)}",
        *STUDY_TINY,
        *extra,
    ]


def trials(tmp_path: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    return study.trials


def write_space(tmp_path: Path, params: str, name: str = "space") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"objective: nll_ebm\ndirection: minimize\nparams:\n{params}")
    return str(path)


@pytest.mark.slow
def test_multirun_grid_with_joblib_logs_every_job_with_one_sweep_id(tmp_path):
    args = [
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "dataset=8gaussians,pinwheel",
        "flow=glow,maf",
        "seed=0",
        *GRID_TINY,
        f"tracking.uri={store_uri(tmp_path)}",
    ]
    result = run_cli(args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    _, found = runs(store_uri(tmp_path))
    assert len(found) == 4
    assert {r.info.status for r in found} == {"FINISHED"}
    assert len({r.data.tags["sweep_id"] for r in found}) == 1
    combos = {(r.data.params["dataset.name"], r.data.params["flow.name"]) for r in found}
    assert combos == {(d, f) for d in ("8gaussians", "pinwheel") for f in ("glow", "maf")}


def test_slurm_launcher_config_composes():
    cfg = compose(["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.cpus_per_task == 1 and launcher.timeout_min == 120


@pytest.mark.slow
def test_study_runs_trials_as_mlflow_children_and_continues_to_a_larger_total(tmp_path):
    result = run_cli(
        study_args(tmp_path, "threshold_lr", "sweep.n_trials=3"), tmp_path, script="sweeps/tune.py"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "best trial" in result.stdout
    first = trials(tmp_path, "threshold_lr-8gaussians-glow")
    assert [t.state.name for t in first] == ["COMPLETE"] * 3

    result = run_cli(
        study_args(tmp_path, "threshold_lr", "sweep.n_trials=5"), tmp_path, script="sweeps/tune.py"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    after = trials(tmp_path, "threshold_lr-8gaussians-glow")
    assert [t.state.name for t in after] == ["COMPLETE"] * 5
    assert [(t.params, t.value) for t in after[:3]] == [(t.params, t.value) for t in first]
    assert len({tuple(sorted(t.params.items())) for t in after}) == 5  # no repeated trial

    _, found = runs(store_uri(tmp_path))
    parents = [r for r in found if r.info.run_name.startswith("study-")]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 5
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(int(c.data.tags["optuna.trial"]) for c in children) == list(range(5))
    assert {c.data.tags["optuna.state"] for c in children} == {"COMPLETE"}
    best = min(after, key=lambda t: t.value)
    assert parent.data.tags["best_trial"] == str(best.number)
    assert float(parent.data.tags["best.threshold.value"]) == best.params["threshold.value"]
    assert parent.data.metrics["best_nll_ebm"] == pytest.approx(best.value)
    for child in children:  # each trial's params are its own run's params
        trial = after[int(child.data.tags["optuna.trial"])]
        assert float(child.data.params["optimizer.lr_ebm"]) == pytest.approx(
            trial.params["optimizer.lr_ebm"]
        )


@pytest.mark.slow
def test_parallel_workers_share_one_study(tmp_path):
    args = study_args(tmp_path, "threshold_lr", "sweep.n_trials=4", "sweep.n_jobs=2")
    result = run_cli(args, tmp_path, script="sweeps/tune.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [t.state.name for t in trials(tmp_path, "threshold_lr-8gaussians-glow")] == [
        "COMPLETE"
    ] * 4
    _, found = runs(store_uri(tmp_path))
    assert len([r for r in found if "mlflow.parentRunId" in r.data.tags]) == 4


@pytest.mark.slow
def test_poor_trials_are_pruned_and_marked_in_mlflow(tmp_path):
    space = write_space(
        tmp_path, "  optimizer.lr_ebm: {type: categorical, choices: [1.0e-2, 1.0e-9]}\n"
    )
    args = study_args(
        tmp_path,
        space,
        "sweep.n_trials=6",
        "sweep.sampler=random",
        "sweep.pruner_startup_trials=1",
        "sweep.pruner_warmup_evals=0",
        "train.max_steps=200",  # long enough for lr 1e-2 to pull ahead of a frozen EBM
        "train.eval_every=50",
    )
    result = run_cli(args, tmp_path, script="sweeps/tune.py")
    assert result.returncode == 0, result.stderr[-3000:]
    done = trials(tmp_path, "space-8gaussians-glow")
    pruned = [t for t in done if t.state.name == "PRUNED"]
    assert pruned, [(t.state.name, t.params) for t in done]
    assert all(t.params["optimizer.lr_ebm"] == 1e-9 for t in pruned)
    _, found = runs(store_uri(tmp_path))
    by_trial = {
        int(r.data.tags["optuna.trial"]): r for r in found if "optuna.trial" in r.data.tags
    }
    for trial in pruned:
        run = by_trial[trial.number]
        assert run.info.status == "KILLED"
        assert run.data.tags["optuna.state"] == "PRUNED"
        assert run.data.tags["stopped_early"] == "true"


def test_divergent_trials_fail_and_the_study_goes_on(tmp_path):
    space = write_space(tmp_path, "  ebm.log_z_init: {type: categorical, choices: [1.0, .nan]}\n")
    args = study_args(tmp_path, space, "sweep.n_trials=4", "sweep.sampler=random")
    result = run_cli(args, tmp_path, script="sweeps/tune.py")
    assert result.returncode == 0, result.stderr[-3000:]
    done = trials(tmp_path, "space-8gaussians-glow")
    assert len(done) == 4
    for trial in done:
        diverges = trial.params["ebm.log_z_init"] != trial.params["ebm.log_z_init"]  # NaN
        assert trial.state.name == ("FAIL" if diverges else "COMPLETE")
        if diverges:
            assert "diverged at step 0" in trial.user_attrs["error"]
    _, found = runs(store_uri(tmp_path))
    statuses = sorted(r.info.status for r in found if "optuna.trial" in r.data.tags)
    assert statuses.count("FAILED") == sum(t.state.name == "FAIL" for t in done)


@pytest.mark.slow
def test_killed_sweep_leaves_nothing_running_after_the_next_start(tmp_path):
    slow = ["train.max_steps=100000", "train.epochs=100000", "sweep.heartbeat_s=1"]
    args = study_args(tmp_path, "threshold_lr", "sweep.n_trials=1", *slow)
    proc = start_cli(args, tmp_path, script="sweeps/tune.py")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(tmp_path.glob("**/trial_0000/config.yaml")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [t.state.name for t in trials(tmp_path, "threshold_lr-8gaussians-glow")] == ["RUNNING"]

    args = study_args(tmp_path, "threshold_lr", "sweep.n_trials=2", "sweep.heartbeat_s=1")
    result = run_cli(args, tmp_path, script="sweeps/tune.py")
    assert result.returncode == 0, result.stderr[-3000:]
    states = [t.state.name for t in trials(tmp_path, "threshold_lr-8gaussians-glow")]
    assert states == ["FAIL", "COMPLETE"]
    _, found = runs(store_uri(tmp_path))
    assert "RUNNING" not in {r.info.status for r in found}
