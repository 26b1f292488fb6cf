"""What makes an Optuna study one study: its trials' directories, the runs its trials are,
what counts toward its total, its name and its objective's name; and a study without MLflow."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import optuna
import pytest

from fce.compose import compose
from tests.helpers import ROOT, TINY, run_cli, runs, store_uri

STUDY_TINY = [*TINY, "flow.n_steps=2", "flow.width=16"]
TUNE = "sweeps/tune.py"


def study_args(tmp_path: Path, *extra: str, db: str = "optuna.db") -> list[str]:
    return [
        "sweep=threshold_lr",
        "sweep.study_name=s",
        f"sweep.storage=sqlite:///{tmp_path / db}",
        f"tracking.uri={store_uri(tmp_path)}",
        *STUDY_TINY,
        *extra,
    ]


def load(tmp_path: Path, db: str = "optuna.db", name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / db}")


def said(result: subprocess.CompletedProcess) -> list[str]:
    """What a command printed on stderr that is not a log record."""
    return [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith("[") and not line[:4].isdigit()
    ]


@pytest.mark.slow
def test_a_study_made_again_under_its_name_runs_its_trials_in_directories_of_its_own(tmp_path):
    """Issue 26.1: the same name in another storage (or after optuna.db was deleted) used to
    find the old study's trial_0000 and fail every trial, exiting 0."""
    for db in ("a.db", "b.db"):
        result = run_cli(study_args(tmp_path, "sweep.n_trials=2", db=db), tmp_path, script=TUNE)
        assert result.returncode == 0, result.stderr[-3000:]
        assert [t.state.name for t in load(tmp_path, db).trials] == ["COMPLETE"] * 2
    dirs = {
        db: {Path(t.user_attrs["fce.output_dir"]) for t in load(tmp_path, db).trials}
        for db in ("a.db", "b.db")
    }
    assert not dirs["a.db"] & dirs["b.db"]
    for found in dirs.values():
        assert all((d / "config.yaml").is_file() for d in found)
        assert len({d.parent for d in found}) == 1  # one directory per study
    _, found = runs(store_uri(tmp_path))
    assert {r.info.status for r in found} == {"FINISHED"}
    assert len([r for r in found if "optuna.trial" in r.data.tags]) == 4


@pytest.mark.slow
def test_a_command_none_of_whose_trials_completed_exits_1_saying_why(tmp_path):
    space = tmp_path / "diverges.yaml"
    space.write_text(
        "objective: nll_ebm\ndirection: minimize\n"
        "params:\n  optimizer.lr_ebm: {type: categorical, choices: [1.0e+4, 2.0e+4]}\n"
    )
    args = study_args(tmp_path, "sweep.n_trials=2")
    args[0] = f"sweep={space}"
    result = run_cli(args, tmp_path, script=TUNE)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = said(result)
    assert line.startswith("error: study s: none of the 2 trial(s) this command ran completed")
    assert "diverged at step" in line
    assert [t.state.name for t in load(tmp_path).trials] == ["FAIL", "FAIL"]
    _, found = runs(store_uri(tmp_path))
    (parent,) = [r for r in found if "optuna.trial" not in r.data.tags]
    assert parent.info.status == "FAILED"
    assert "RUNNING" not in {r.info.status for r in found}


def test_a_study_with_tracking_none_scores_its_trials_and_logs_nothing(tmp_path, monkeypatch):
    """Issue 26.2: the driver read tracking.uri, which tracking=none has not."""
    store = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")  # where it would log
    args = [a for a in study_args(tmp_path, "sweep.n_trials=2") if not a.startswith("tracking")]
    result = run_cli([*args, "tracking=none"], tmp_path, script=TUNE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    study = load(tmp_path)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    assert all("mlflow_run_id" not in t.user_attrs for t in study.trials)
    assert "mlflow_parent_run_id" not in study.user_attrs
    assert not store.exists() and not (tmp_path / "mlartifacts").exists()
    assert not (tmp_path / "mlruns").exists()
    assert study.metric_names == ["nll_ebm"]  # optuna-dashboard's label of the objective
    for trial in study.trials:
        assert (Path(trial.user_attrs["fce.output_dir"]) / "metrics.json").is_file()


def dead_pid() -> int:
    """The id of a process of this host that has ended."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.slow
def test_a_trial_whose_worker_died_does_not_use_up_the_budget(tmp_path):
    """Issue 26.10: a trial left RUNNING by a killed worker (as SIGKILL leaves it) is failed
    at the next start; it used to count toward n_trials, so nothing more ran."""
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    killed = study.ask()
    worker = {"fce.host": socket.gethostname(), "fce.pid": str(dead_pid()), "fce.pid_start": "1"}
    killed.set_user_attr("fce.worker", worker)

    result = run_cli(study_args(tmp_path, "sweep.n_trials=1"), tmp_path, script=TUNE)
    assert result.returncode == 0, result.stderr[-3000:]
    done = load(tmp_path).trials
    assert [t.state.name for t in done] == ["FAIL", "COMPLETE"]
    assert "is gone" in done[0].user_attrs["error"]
    assert "best trial 1" in result.stdout


def refused(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = said(result)
    assert line.startswith("error: ")
    assert "sweep.study_name=" in line
    return line


@pytest.mark.slow
def test_a_continuation_with_other_run_settings_is_refused_and_changes_nothing(tmp_path):
    """Issue 29.2: an NCE trial or a shorter one joined an FCE study and was ranked with it."""
    result = run_cli(study_args(tmp_path, "sweep.n_trials=1"), tmp_path, script=TUNE)
    assert result.returncode == 0, result.stderr[-3000:]
    before = [(t.number, t.state.name, t.value) for t in load(tmp_path).trials]

    line = refused(
        run_cli(study_args(tmp_path, "sweep.n_trials=2", "estimator=nce"), tmp_path, script=TUNE)
    )
    assert "estimator.name=nce (the study's: fce)" in line
    steps = next(a for a in STUDY_TINY if a.startswith("train.max_steps=")).split("=")[1]
    shorter = int(steps) - 10
    line = refused(
        run_cli(
            study_args(tmp_path, "sweep.n_trials=2", f"train.max_steps={shorter}"),
            tmp_path,
            script=TUNE,
        )
    )
    assert f"train.max_steps={shorter} (the study's: {steps})" in line
    assert [(t.number, t.state.name, t.value) for t in load(tmp_path).trials] == before
    _, found = runs(store_uri(tmp_path))
    assert len(found) == 2 and {r.info.status for r in found} == {"FINISHED"}

    # How a trial is run and logged is not what it is: these continue the study.
    same = ["threads=2", "progress=none", "train.plot_every=0", "train.checkpoint_every=0"]
    result = run_cli(study_args(tmp_path, "sweep.n_trials=2", *same), tmp_path, script=TUNE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [t.state.name for t in load(tmp_path).trials] == ["COMPLETE"] * 2


@pytest.mark.parametrize(
    ("space", "overrides", "name"),
    [
        ("threshold_lr", ["dataset=spiral", "flow=maf"], "threshold_lr-spiral-maf"),
        ("flow_arch", [], "flow_arch-8gaussians"),
        ("flow_arch", ["flow=maf"], "flow_arch-8gaussians"),
    ],
)
def test_a_study_is_named_by_its_space_and_what_it_does_not_search(space, overrides, name):
    from fce.sweep.identity import default_study_name
    from fce.sweep_space import load_sweep

    settings = load_sweep(space, ROOT / "sweeps" / "spaces", ROOT / "sweeps" / "defaults.yaml", [])
    assert default_study_name(settings, compose(overrides)) == name


@pytest.mark.slow
def test_a_study_of_the_flow_names_neither_the_flow_nor_a_second_study_and_names_its_metric(
    tmp_path,
):
    """Issue 29.5 and 29.6: sweep=flow_arch was named after the default flow, and flow=maf
    made another study of the same space; optuna-dashboard showed "Objective 0"."""
    tiny = [a for a in TINY if not a.startswith(("train.max_steps", "progress"))]
    base = [
        "sweep=flow_arch",
        f"sweep.storage=sqlite:///{tmp_path / 'optuna.db'}",
        "tracking=none",
        *tiny,
        "train.max_steps=20",
        "sweep.pruner=none",
    ]
    for extra in (["sweep.n_trials=1"], ["flow=maf", "sweep.n_trials=2"]):
        result = run_cli([*base, *extra], tmp_path, script=TUNE)
        assert result.returncode == 0, result.stderr[-3000:]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert optuna.get_all_study_names(storage) == ["flow_arch-8gaussians"]
    study = optuna.load_study(study_name="flow_arch-8gaussians", storage=storage)
    assert len(study.trials) == 2
    assert study.metric_names == ["nll_ebm"]
