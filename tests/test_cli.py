"""run.py's entry in process: a single run composed once, by Hydra, and checked on that config."""

from __future__ import annotations

import logging
import os
import signal
import sys

import hydra
import pytest
from hydra.core.global_hydra import GlobalHydra

import fce.cli
import fce.compose
import fce.preflight
from fce.cli import launch
from fce.config import register_configs
from fce.preflight import SingleRunChecks
from tests.helpers import ROOT

CONF = ROOT / "conf"


@pytest.fixture
def entry(monkeypatch):
    """``launch`` as run.py calls it, on a job that records its config instead of training;
    Hydra's compositions counted, and this process's state (signals, Hydra, the callback's
    flag, HYDRA_FULL_ERROR) restored after."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    logging_state = (root.level, list(root.handlers))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(SingleRunChecks, "done", False)
    monkeypatch.setattr(fce.cli, "_started", False)
    monkeypatch.setattr(fce.cli, "_full_error", None)
    compositions = []  # "hydra.main" for each of @hydra.main's, "fce" for each of the suite's
    original = hydra._internal.hydra.Hydra.compose_config
    inside = []

    def counted(self, *args, **kwargs):
        if not inside:
            compositions.append("hydra.main")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(hydra._internal.hydra.Hydra, "compose_config", counted)

    def outside_hydra(*args, **kwargs):
        compositions.append("fce")
        inside.append(True)
        try:
            return original_compose(*args, **kwargs)
        finally:
            inside.pop()

    original_compose = fce.compose.compose
    monkeypatch.setattr(fce.compose, "compose", outside_hydra)
    jobs = []
    register_configs()

    @hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
    def main(cfg):
        fce.cli._job_started()  # as run_job does first
        jobs.append((cfg, os.environ.get("HYDRA_FULL_ERROR")))
        if cfg.train.max_steps == 13:
            raise RuntimeError("a defect in the job")

    def call(*args: str) -> None:
        monkeypatch.setattr(sys, "argv", ["run.py", *args])
        try:
            launch(main, CONF)
        finally:
            GlobalHydra.instance().clear()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            for handler in root.handlers[:]:
                if handler not in logging_state[1]:
                    root.removeHandler(handler)
                    handler.close()
            root.setLevel(logging_state[0])

    yield call, compositions, jobs


def test_a_single_run_is_composed_by_hydra_alone_and_validated_before_its_job(entry, tmp_path):
    call, compositions, jobs = entry
    run_dir = tmp_path / "run"
    call("tracking=none", "train.max_steps=3", f"hydra.run.dir={run_dir}")
    # None of the suite's: @hydra.main's own two (Hydra 1.3 composes once to read hydra.mode,
    # then the run's), which the suite cannot remove without going below @hydra.main.
    assert compositions == ["hydra.main", "hydra.main"]
    assert SingleRunChecks.done  # the callback validated it, so run_job does not again
    # The job sees HYDRA_FULL_ERROR as the user left it (unset): Hydra reports its failures.
    assert [(job.train.max_steps, full_error) for job, full_error in jobs] == [(3, None)]


def test_a_bad_single_run_is_one_line_before_its_directory_exists(entry, tmp_path, capsys):
    call, compositions, jobs = entry
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        call("tracking=none", "train.max_steps=-1", f"hydra.run.dir={run_dir}")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: train.max_steps=-1: must be a positive integer\n"
    assert not run_dir.exists() and jobs == [] and "fce" not in compositions


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_steps=abc", "Error merging override train.max_steps=abc; Value 'abc'"),
        ("nope=1", "nope: no such setting"),
    ],
)
def test_what_hydra_cannot_compose_is_one_line(entry, tmp_path, capsys, override, message):
    call, _, jobs = entry
    with pytest.raises(SystemExit) as exit_:
        call("tracking=none", override, f"hydra.run.dir={tmp_path / 'run'}")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and jobs == []
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_a_grid_is_composed_and_validated_for_every_value_before_a_job(entry, tmp_path, capsys):
    call, compositions, jobs = entry
    with pytest.raises(SystemExit) as exit_:
        call("-m", "tracking=none", "train.max_steps=3,-1", f"hydra.sweep.dir={tmp_path}/grid")
    assert exit_.value.code == 2 and jobs == []
    assert "train.max_steps=-1: must be a positive integer" in capsys.readouterr().err
    assert compositions == ["fce", "fce"]  # one per value, and no job composed


def test_the_checks_are_a_callback_of_the_run_config():
    cfg = fce.compose.compose([], return_hydra_config=True)
    targets = [c._target_ for c in cfg.hydra.callbacks.values()]
    assert "fce.preflight.SingleRunChecks" in targets
    mode = fce.preflight.command_mode
    assert mode(["train.max_steps=3"]) == mode(["hydra.mode=RUN", "seed=1"]) == "run"
    assert mode(["-m", "seed=0,1"]) == mode(["--multirun"]) == mode(["--multir"]) == "multirun"
    assert mode(["hydra.mode=MULTIRUN", "seed=0,1"]) == "multirun"
    assert mode(["--cfg", "job"]) == mode(["--help"]) == mode(["--info"]) == "info"


@pytest.mark.parametrize("tracking", ["none", "mlflow"])
def test_a_resume_without_hydras_record_keeps_the_runs_tracking_group(tmp_path, tracking):
    # A run made with hydra.output_subdir=null keeps no overrides.yaml: the groups come from
    # its config, and the tracking node, which carries no name, by its _target_.
    from omegaconf import OmegaConf

    from fce.preflight import with_saved_run

    saved = fce.compose.compose(["experiment=smoke", f"tracking={tracking}"])
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    try:
        argv = with_saved_run([f"train.resume={tmp_path}"], CONF)
    finally:
        GlobalHydra.instance().clear()
    assert f"tracking={tracking}" in argv
    assert "dataset=8gaussians" in argv


def test_a_failure_of_the_job_itself_is_not_called_bad_input(entry, tmp_path, capsys):
    # Once the job runs, Hydra reports what run_job does not map, as without the suite's entry.
    call, _, jobs = entry
    with pytest.raises(SystemExit) as exit_:
        call("tracking=none", "train.max_steps=13", f"hydra.run.dir={tmp_path / 'run'}")
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and len(jobs) == 1
    assert "RuntimeError: a defect in the job" in err and "error: " not in err


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("seed=${hydra:job.num}", "While dereferencing interpolation '${hydra:job.num}'"),
        ("train.max_steps=${oops:1}", "Unsupported interpolation type oops"),
    ],
)
def test_a_value_that_fails_in_the_checks_is_one_line_not_a_warning(
    entry, tmp_path, capsys, value, message
):
    # Hydra turns a callback's exception into a warning and goes on: the checks end the run.
    call, _, jobs = entry
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        call("tracking=none", value, f"hydra.run.dir={run_dir}")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and jobs == [] and not run_dir.exists()
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize("grid", [["-m"], ["--multir"], ["hydra.mode=MULTIRUN"]])
def test_every_spelling_of_a_grid_is_checked_before_its_first_job(entry, tmp_path, capsys, grid):
    call, _, jobs = entry
    with pytest.raises(SystemExit) as exit_:
        call(*grid, "tracking=none", "train.max_steps=3,-1", f"hydra.sweep.dir={tmp_path}/g")
    assert exit_.value.code == 2 and jobs == []
    assert "train.max_steps=-1: must be a positive integer" in capsys.readouterr().err


def test_a_group_is_restored_by_target_only_where_each_option_declares_its_own():
    from fce.preflight import saved_option

    assert saved_option([CONF], "tracking", {"_target_": "fce.tracking.NullTracker"}) == "none"
    assert saved_option([CONF], "tracking", {"_target_": "fce.tracking.MLflowTracker"}) == (
        "mlflow"
    )
    # ebm's options inherit their _target_ from reference.yaml: the target cannot tell them
    ebm = fce.compose.compose(["ebm=silu"]).ebm
    assert saved_option([CONF], "ebm", dict(ebm)) is None
    assert saved_option([CONF], "flow", {"name": "maf", "_target_": "x"}) == "maf"


def test_a_run_killed_while_hydra_wrote_its_files_resumes_from_the_command_line(tmp_path):
    # Killed after .hydra/config.yaml, before hydra.yaml was written: no traceback; the
    # command line as typed runs in the run's directory.
    from omegaconf import OmegaConf

    from fce.preflight import with_saved_run

    (tmp_path / ".hydra").mkdir()
    saved = fce.compose.compose(["experiment=smoke", "tracking=none"])
    (tmp_path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    (tmp_path / ".hydra" / "hydra.yaml").write_text("")
    argv = ["experiment=smoke", "tracking=none", f"train.resume={tmp_path}"]
    try:
        assert with_saved_run(argv, CONF)[-3:] == argv
    finally:
        GlobalHydra.instance().clear()
