"""Sweeps end to end: Hydra multirun grids and Optuna studies, against temp stores."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import optuna
import pytest
import yaml

from fce.compose import compose
from fce.signals import SignalRecorder
from tests.helpers import GRID_TINY, HANG_GUARD_S, ROOT, TINY, run_cli, runs, start_cli, store_uri

# Lines a command prints as log records (its own, Optuna's, MLflow's), not as messages.
LOG_RECORD = re.compile(r"^(\[|\d{4}/\d\d/\d\d \d\d:)")
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
    result = run_cli(args, cwd=tmp_path, timeout=HANG_GUARD_S)
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


@pytest.mark.slow
def test_divergent_trials_fail_and_the_study_goes_on(tmp_path):
    # A learning rate of 1e4 blows the EBM up within steps: a divergence, not bad input.
    space = write_space(
        tmp_path, "  optimizer.lr_ebm: {type: categorical, choices: [1.0e-3, 1.0e+4]}\n"
    )
    args = study_args(tmp_path, space, "sweep.n_trials=4", "sweep.sampler=random")
    result = run_cli(args, tmp_path, script="sweeps/tune.py")
    assert result.returncode == 0, result.stderr[-3000:]
    done = trials(tmp_path, "space-8gaussians-glow")
    assert len(done) == 4
    for trial in done:
        diverges = trial.params["optimizer.lr_ebm"] > 1
        assert trial.state.name == ("FAIL" if diverges else "COMPLETE")
        if diverges:
            assert "diverged at step" in trial.user_attrs["error"]
    _, found = runs(store_uri(tmp_path))
    statuses = sorted(r.info.status for r in found if "optuna.trial" in r.data.tags)
    assert statuses.count("FAILED") == sum(t.state.name == "FAIL" for t in done)


@pytest.mark.slow
def test_killed_sweep_leaves_nothing_running_after_the_next_start(tmp_path):
    """The killed trial FAILs at the next start and does not count toward n_trials: the rerun
    of the same study runs both of its trials (issue 26.10)."""
    # A panel and a checkpoint at every step make the trial long enough to be killed in, and
    # change nothing the study keeps (how often a run draws and saves is not what it is).
    slow = ["train.plot_every=1", "train.checkpoint_every=1", "sweep.heartbeat_s=1"]
    args = study_args(tmp_path, "threshold_lr", "sweep.n_trials=2", *slow)
    proc = start_cli(args, tmp_path, script="sweeps/tune.py")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(tmp_path.glob("**/trial_0000/config.yaml")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    # Until the trial's MLflow run exists (a run writes its config.yaml before it opens it).
    while not any(
        "mlflow_run_id" in t.user_attrs for t in trials(tmp_path, "threshold_lr-8gaussians-glow")
    ):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the trial's run never started"
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [t.state.name for t in trials(tmp_path, "threshold_lr-8gaussians-glow")] == ["RUNNING"]

    args = study_args(tmp_path, "threshold_lr", "sweep.n_trials=2", "sweep.heartbeat_s=1")
    result = run_cli(args, tmp_path, script="sweeps/tune.py")
    assert result.returncode == 0, result.stderr[-3000:]
    done = trials(tmp_path, "threshold_lr-8gaussians-glow")
    assert [t.state.name for t in done] == ["FAIL", "COMPLETE", "COMPLETE"]
    _, found = runs(store_uri(tmp_path))
    assert "RUNNING" not in {r.info.status for r in found}
    # Every trial that began a run has one child run, whose state is the trial's.
    children = {r.data.tags["optuna.trial"]: r for r in found if "optuna.trial" in r.data.tags}
    assert sorted(children) == [str(t.number) for t in done]
    assert [children[str(t.number)].data.tags["optuna.state"] for t in done] == [
        t.state.name for t in done
    ]
    assert children["0"].info.status == "KILLED"


def test_help_prints_usage_with_the_spaces_and_settings():
    result = run_cli(["--help"], ROOT, timeout=HANG_GUARD_S, script="sweeps/tune.py")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("usage: python sweeps/tune.py sweep=<space>")
    for space in (ROOT / "sweeps" / "spaces").glob("*.yaml"):
        assert f"  {space.stem} " in result.stdout
    defaults = yaml.safe_load((ROOT / "sweeps" / "defaults.yaml").read_text())
    for key in defaults:
        assert f"  {key}:" in result.stdout


@pytest.mark.slow
def test_a_config_error_in_a_trial_fails_that_trial_and_trials_are_named_apart(tmp_path):
    """Each value is valid alone, so the space passes the check; two of them together are
    not (a batch larger than the data): those trials FAIL, the study goes on."""
    space = write_space(
        tmp_path,
        "  train.batch_size: {type: categorical, choices: [100, 2000]}\n"
        "  dataset.n_samples: {type: categorical, choices: [5000, 1000]}\n",
    )
    args = study_args(tmp_path, space, "sweep.n_trials=6", "sweep.sampler=random")
    result = run_cli(args, tmp_path, script="sweeps/tune.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    done = trials(tmp_path, "space-8gaussians-glow")
    assert len(done) == 6
    invalid = [t for t in done if t.params["train.batch_size"] > t.params["dataset.n_samples"]]
    assert invalid, "the sampler never drew the invalid pair: choose another sweep.seed"
    for trial in done:
        if trial in invalid:
            assert trial.state.name == "FAIL"
            assert "larger than dataset.n_samples" in trial.user_attrs["error"]
        else:
            assert trial.state.name == "COMPLETE"

    _, found = runs(store_uri(tmp_path))
    children = [r for r in found if "optuna.trial" in r.data.tags]
    assert len(children) == 6  # an invalid config starts no training, but it has its run
    for run in children:
        refused = done[int(run.data.tags["optuna.trial"])] in invalid
        assert (run.info.status == "FAILED") == refused
        assert ("larger than dataset.n_samples" in run.data.tags.get("fce.error", "")) == refused
    names = [r.info.run_name for r in children]
    assert len(set(names)) == len(names)
    for run in children:
        trial = done[int(run.data.tags["optuna.trial"])]
        assert run.info.run_name.startswith(f"t{trial.number:03d} ")
        assert f"batch_size={trial.params['train.batch_size']}" in run.info.run_name
        assert f"n_samples={trial.params['dataset.n_samples']}" in run.info.run_name


@pytest.mark.slow
def test_two_drivers_on_one_study_run_n_trials_under_one_parent_run(tmp_path):
    args = study_args(tmp_path, "threshold_lr", "sweep.n_trials=4", "sweep.sampler=random")
    drivers = [start_cli(args, tmp_path, script="sweeps/tune.py") for _ in range(2)]
    for driver in drivers:
        _, stderr = driver.communicate(timeout=HANG_GUARD_S)
        assert driver.returncode == 0, stderr[-3000:]
    done = trials(tmp_path, "threshold_lr-8gaussians-glow")
    assert [t.state.name for t in done] == ["COMPLETE"] * 4
    # Both drivers ran trials: they overlapped, so the count was shared.
    assert len({t.user_attrs["fce.worker"]["fce.pid"] for t in done}) == 2
    assert len({tuple(sorted(t.params.items())) for t in done}) == 4  # no trial drawn twice
    _, found = runs(store_uri(tmp_path))
    parents = [r for r in found if r.info.run_name.startswith("study-")]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    signal.set_wakeup_fd(-1)
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # Python runs the handler between two bytecodes of this thread


def test_the_driver_handler_records_a_signal_and_raises_nothing(restore_signals):
    """Raising from the handler could land inside a store write (a trial left RUNNING, a
    SQLite store left locked); the driver acts on the signal at its next safe point."""
    stop = SignalRecorder().install()
    assert stop() is None
    deliver(signal.SIGTERM)
    assert stop() == signal.SIGTERM
    deliver(signal.SIGINT)  # a second signal changes nothing: the first is acted on
    assert stop() == signal.SIGTERM


def test_a_signal_taken_by_a_runs_own_handler_still_reaches_the_driver(restore_signals):
    """A run in the driver's process installs its own handler; a signal it takes after its
    last look (as the run ends) must still stop the study rather than start the next trial."""
    from fce.interrupts import deferred_interrupts

    stop = SignalRecorder().install()
    with deferred_interrupts() as request:
        deliver(signal.SIGINT)
    assert request.signum == signal.SIGINT
    assert stop() == signal.SIGINT


@pytest.mark.slow
def test_sigterm_stops_a_study_at_a_step_and_leaves_nothing_running(tmp_path):
    long = ["train.max_steps=1000000", "train.epochs=1000000"]
    driver = start_cli(
        study_args(tmp_path, "threshold_lr", "sweep.n_trials=2", *long),
        tmp_path,
        script="sweeps/tune.py",
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("**/trial_0000/config.yaml")):
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline, "the trial never started"
        time.sleep(0.1)
    # Until the trial's MLflow run exists (a signal before that ends the trial with no run).
    while not any(
        "mlflow_run_id" in t.user_attrs for t in trials(tmp_path, "threshold_lr-8gaussians-glow")
    ):
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline, "the trial's run never started"
        time.sleep(0.1)
    time.sleep(0.5)
    driver.send_signal(signal.SIGTERM)
    stdout, stderr = driver.communicate(timeout=HANG_GUARD_S)
    assert driver.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    said = [line for line in stderr.splitlines() if line.strip() and not LOG_RECORD.match(line)]
    assert said == ["interrupted: finished trials are kept; rerun the command to continue"]
    (trial,) = trials(tmp_path, "threshold_lr-8gaussians-glow")
    assert trial.state.name == "FAIL"
    assert trial.user_attrs["error"] == "interrupted by SIGTERM"
    _, found = runs(store_uri(tmp_path))
    by_id = {r.info.run_id: r for r in found}
    run = by_id.pop(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "FAIL"
    assert list(tmp_path.glob("**/trial_0000/checkpoints/step_*.pt"))  # saved as it stopped
    (parent,) = by_id.values()
    assert parent.info.status == "KILLED"


@pytest.mark.slow
def test_a_killed_joblib_grid_takes_its_workers_with_it(tmp_path):
    """SIGKILL to the process that launched a joblib grid: its workers stop their runs at a
    step boundary (KILLED, a checkpoint) and exit, instead of training on and idling."""
    import json

    long = ["train.max_steps=100000", "train.epochs=100000", "tracking=none"]
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", *GRID_TINY]
    args = [a for a in args if not a.startswith(("train.max_steps", "tracking."))]
    launcher = start_cli([*args, *long], tmp_path)
    # Both jobs training (past their set-up: a signal there ends a job before its run
    # exists, with nothing to mark KILLED), however slowly a loaded machine builds them.
    deadline = time.monotonic() + HANG_GUARD_S

    def training() -> int:
        logs = tmp_path.glob("multirun/*/*/*/run.log")
        return sum("ready in" in p.read_text() for p in logs)

    while training() < 2:
        assert launcher.poll() is None, launcher.communicate()
        assert time.monotonic() < deadline, "the grid's jobs never started"
        time.sleep(0.2)
    time.sleep(1.0)
    workers = [
        int(p)
        for p in Path(f"/proc/{launcher.pid}/task").glob("*/children")
        for p in p.read_text().split()
    ]
    assert workers
    launcher.kill()
    launcher.wait()
    # Each job writes its outcome as it stops; the processes listed above need not be the
    # jobs' own (loky starts helpers too), so wait for both: every outcome, every process gone.
    deadline = time.monotonic() + HANG_GUARD_S
    while len(list(tmp_path.glob("multirun/*/*/*/metrics.json"))) < 2 or any(
        Path(f"/proc/{pid}").exists() for pid in workers
    ):
        assert time.monotonic() < deadline, "workers outlived their launcher"
        time.sleep(0.5)
    outcomes = [json.loads(p.read_text()) for p in tmp_path.glob("multirun/*/*/*/metrics.json")]
    assert sorted(o["status"] for o in outcomes) == ["KILLED", "KILLED"]
    assert len(list(tmp_path.glob("multirun/*/*/*/checkpoints/step_*.pt"))) >= 2
    # One grid, one directory: every job resolved the launcher's ${pid:}, not its own.
    assert len(list(tmp_path.glob("multirun/*/*"))) == 1
