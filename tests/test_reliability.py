"""Reliability end to end: bad input, SIGKILL then resume, four processes on one store, and
determinism. Every test runs the real commands against temporary stores."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import pytest
import torch

from fce import checkpoint
from tests.helpers import run_cli

TUNE = "sweeps/tune.py"
TL = "sweep=threshold_lr"


# --- bad input ----------------------------------------------------------------------------------

# {tmp} is the test's temporary directory. Run cases get a temp store and output directory
# unless they name their own; sweep cases address the study "kept", which holds one finished
# trial before the call and must hold it, intact, after.
RUN_BAD_INPUTS = [
    ("unknown-dataset", ["dataset=moons"], "dataset=moons: unknown dataset; choose one of"),
    ("unknown-flow", ["flow=realnvp"], "flow=realnvp: unknown flow; choose one of: glow, maf"),
    ("unknown-optimizer", ["optimizer=sgdx"], "optimizer=sgdx: unknown optimizer; choose one"),
    ("unknown-threshold", ["threshold=median"], "threshold=median: unknown threshold; choose"),
    ("unknown-device", ["device=tpu"], "device='tpu': unknown; choose one of: auto, cpu, cuda"),
    ("unknown-key", ["train.bogus=1"], "train.bogus"),
    ("type-int", ["train.batch_size=abc"], "train.batch_size=abc; Value 'abc' of type 'str'"),
    ("type-float", ["optimizer.lr_ebm=fast"], "optimizer.lr_ebm=fast; Value 'fast'"),
    ("type-list", ["ebm.hidden=abc"], "ebm.hidden=abc; Invalid value assigned: str is not a"),
    ("type-seed", ["seed=1.5"], "seed=1.5; Value '1.5' of type 'float' could not be converted"),
    ("range-threshold", ["threshold.value=1.5"], "threshold.value=1.5: must be in (0, 1)"),
    ("range-lr", ["optimizer.lr_flow=0"], "optimizer.lr_flow=0.0: must be a positive number"),
    ("range-batch", ["train.batch_size=-5"], "train.batch_size=-5: must be a positive integer"),
    ("range-samples", ["dataset.n_samples=0"], "dataset.n_samples=0: must be a positive integer"),
    *(
        [("no-gpu", ["device=cuda"], "device='cuda': no CUDA GPU is available here")]
        if not torch.cuda.is_available()
        else []  # on a GPU machine device=cuda is good input
    ),
    (
        "batch-over-data",
        ["dataset.n_samples=500"],
        "train.batch_size=1000: larger than dataset.n_samples=500",
    ),
    (
        "resume-missing",
        ["train.resume={tmp}/no/such/run"],
        "train.resume={tmp}/no/such/run: {tmp}/no/such/run: no such checkpoint file or run",
    ),
    (
        "resume-truncated",
        ["train.resume={tmp}/truncated.pt"],
        "train.resume={tmp}/truncated.pt: {tmp}/truncated.pt: not a readable checkpoint",
    ),
    (
        "resume-foreign",
        ["train.resume={tmp}/foreign.pt"],
        "train.resume={tmp}/foreign.pt: {tmp}/foreign.pt: not an FCE checkpoint",
    ),
    (
        "resume-empty-dir",
        ["train.resume={tmp}/empty_run"],
        "train.resume={tmp}/empty_run: {tmp}/empty_run: no checkpoint (step_*.pt) in",
    ),
    (
        "output-dir-under-a-file",
        ["hydra.run.dir={tmp}/afile/sub"],
        "hydra.run.dir={tmp}/afile/sub: {tmp}/afile is a file, not a directory",
    ),
    (
        "multirun-dir-under-a-file",
        ["-m", "seed=1,2", "hydra.sweep.dir={tmp}/afile/sub"],
        "hydra.sweep.dir={tmp}/afile/sub: {tmp}/afile is a file, not a directory",
    ),
    (
        "tracking-unreachable",
        ["tracking.uri=http://127.0.0.1:9"],
        "tracking.uri=http://127.0.0.1:9: no MLflow server answers",
    ),
    (
        "tracking-store-under-a-file",
        ["tracking.uri=sqlite:///{tmp}/afile/mlflow.db"],
        "tracking.uri=sqlite:///{tmp}/afile/mlflow.db: {tmp}/afile is a file, not a directory",
    ),
    (
        "tracking-store-not-a-database",
        ["tracking.uri=sqlite:///{tmp}/garbage.db"],
        "tracking.uri=sqlite:///{tmp}/garbage.db: cannot open the MLflow store "
        "((sqlite3.DatabaseError) file is not a database)",
    ),
]
SWEEP_BAD_INPUTS = [
    ("sweep-missing", [], "sweep=<space> is required once; choose one of:"),
    ("sweep-unknown", ["sweep=nosuch"], "sweep=nosuch: no search space"),
    ("n-trials-zero", [TL, "sweep.n_trials=0"], "sweep.n_trials=0: must be an integer >= 1"),
    ("n-trials-negative", [TL, "sweep.n_trials=-3"], "sweep.n_trials=-3: must be an integer >= 1"),
    ("n-trials-type", [TL, "sweep.n_trials=abc"], "sweep.n_trials='abc': must be an integer >= 1"),
    ("sweep-pruner", [TL, "sweep.pruner=magic"], "sweep.pruner='magic': choose one of: median"),
    (
        "sweep-objective",
        [TL, "sweep.objective=accuracy"],
        "sweep.objective='accuracy': choose one",
    ),
    ("sweep-unknown-key", [TL, "sweep.bogus.key=1"], "sweep.bogus: unknown setting; the settings"),
    ("sweep-run-dataset", [TL, "dataset=moons"], "dataset=moons: unknown dataset; choose one of"),
    ("sweep-run-type", [TL, "train.batch_size=abc"], "train.batch_size=abc; Value 'abc' of type"),
    (
        "space-low-over-high",
        ["sweep={tmp}/low_high.yaml"],
        "{tmp}/low_high.yaml: params.optimizer.lr_ebm: low=1.0 must be < high=0.1",
    ),
    (
        "space-not-yaml",
        ["sweep={tmp}/not_yaml.yaml"],
        "{tmp}/not_yaml.yaml: not valid YAML",
    ),
    (
        "space-no-type",
        ["sweep={tmp}/no_type.yaml"],
        "{tmp}/no_type.yaml: params.threshold.value: needs type: one of float, int, categorical",
    ),
    (
        "space-unknown-key",
        ["sweep={tmp}/unknown_key.yaml"],
        "sweep param train.bogus: no such key in the run config",
    ),
    (
        "sweep-tracking-unreachable",
        [TL, "tracking.uri=http://127.0.0.1:9"],
        "tracking.uri=http://127.0.0.1:9: no MLflow server answers",
    ),
    (
        "sweep-storage-unknown-kind",
        [TL, "sweep.storage=nosuchdb://host/optuna"],
        "sweep.storage=nosuchdb://host/optuna: cannot open the Optuna storage (Can't load plugin",
    ),
    (
        "sweep-storage-under-a-file",
        [TL, "sweep.storage=sqlite:///{tmp}/afile/optuna.db"],
        "sweep.storage=sqlite:///{tmp}/afile/optuna.db: {tmp}/afile is a file, not a directory",
    ),
]
SPACES = {
    "low_high": "params:\n  optimizer.lr_ebm: {type: float, low: 1.0, high: 0.1}\n",
    "not_yaml": "params: [unclosed\n",
    "no_type": "params:\n  threshold.value: {low: 0.5, high: 0.7}\n",
    "unknown_key": "params:\n  train.bogus: {type: float, low: 0.5, high: 0.7}\n",
}
KEPT_STUDY = "kept"
# Lines a failing command may print before its error: log records (Hydra's, MLflow's, Optuna's).
LOG_RECORD = re.compile(r"^(\[|\d{4}/\d\d/\d\d \d\d:)")


def make_bad_input_files(tmp_path: Path) -> None:
    """The files the cases name: a plain file, broken checkpoints, broken search spaces."""
    (tmp_path / "afile").write_text("a file, not a directory\n")
    (tmp_path / "garbage.db").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "empty_run").mkdir()
    state = {"trainer": {"step": 10, "weights": torch.randn(100)}, "config": {"seed": 0}}
    good = checkpoint.save(state, tmp_path / "ckpt", 10)
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:200])
    torch.save({"model": torch.zeros(3)}, tmp_path / "foreign.pt")
    for name, text in SPACES.items():
        (tmp_path / f"{name}.yaml").write_text(f"objective: nll_ebm\ndirection: minimize\n{text}")


def make_kept_study(storage: str) -> list[tuple]:
    """A study with one finished trial; return what must survive a bad call."""
    import optuna

    study = optuna.create_study(study_name=KEPT_STUDY, storage=storage, direction="minimize")
    distribution = optuna.distributions.FloatDistribution(0.5, 0.8)
    trial = study.ask({"threshold.value": distribution})
    study.tell(trial, 1.25)
    return kept_trials(storage)


def kept_trials(storage: str) -> list[tuple]:
    import optuna

    study = optuna.load_study(study_name=KEPT_STUDY, storage=storage)
    return [(t.number, t.state.name, t.params, t.value, t.datetime_complete) for t in study.trials]


def recorded_runs(db: Path) -> list[tuple[str, str]]:
    """(run id, status) of every MLflow run, read straight from the SQLite file (no MLflow
    start-up, and a store that was never created stays uncreated)."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        if "runs" not in tables:
            return []
        return list(connection.execute("SELECT run_uuid, status FROM runs"))


BAD_INPUTS = [
    pytest.param("run.py", args, message, id=name) for name, args, message in RUN_BAD_INPUTS
] + [pytest.param(TUNE, args, message, id=name) for name, args, message in SWEEP_BAD_INPUTS]


@pytest.mark.parametrize(("script", "args", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_and_leaves_every_store_as_it_was(tmp_path, script, args, message):
    make_bad_input_files(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    message = message.replace("{tmp}", str(tmp_path))
    store = tmp_path / "mlflow.db"
    defaults = {"tracking.uri": f"sqlite:///{store}"}
    if script == TUNE:
        storage = f"sqlite:///{tmp_path / 'optuna.db'}"
        kept = make_kept_study(storage)
        defaults |= {"sweep.storage": storage, "sweep.study_name": KEPT_STUDY}
    else:
        defaults["hydra.run.dir"] = str(tmp_path / "outputs" / "run")
    given = {a.split("=", 1)[0] for a in args}
    extra = [f"{k}={v}" for k, v in defaults.items() if k not in given]

    started = time.monotonic()
    result = run_cli([*extra, *args], cwd=tmp_path, timeout=120, script=script)
    elapsed = time.monotonic() - started

    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, output
    assert lines[-1].startswith("error: ") and message in lines[-1], output
    assert all(LOG_RECORD.match(line) for line in lines[:-1]), output  # only log records before
    assert elapsed < 30, f"{elapsed:.1f}s to report bad input"  # no minutes of retries
    assert recorded_runs(store) == []  # none left RUNNING: none was even created
    assert not list(tmp_path.rglob("*.tmp")), "a partial checkpoint was left"
    assert [p.name for p in tmp_path.rglob("step_*.pt")] == ["step_0000010.pt"]  # the fixture's
    if script == TUNE:
        assert kept_trials(storage) == kept
        with sqlite3.connect(tmp_path / "optuna.db") as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
