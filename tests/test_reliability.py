"""Reliability end to end: bad input, SIGKILL then resume, four processes on one store, and
determinism. Every test runs the real commands against temporary stores."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from fce import checkpoint
from tests.helpers import (
    HANG_GUARD_S,
    TINY,
    TINY_FLOW,
    children,
    proc_cmdline,
    proc_stat,
    run_cli,
    runs,
    start_cli,
    store_uri,
    wait_gone,
)

TUNE = "sweeps/tune.py"
A_SPACE = "sweep=threshold_lr"


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made: copied per test, it saves each test the
    seconds MLflow takes to create them."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def copy_store(template: Path, directory: Path) -> str:
    shutil.copyfile(template, directory / "mlflow.db")
    return store_uri(directory)


# --- bad input ----------------------------------------------------------------------------------

# {tmp} is the test's temporary directory. Run cases get a temp store and output directory
# unless they name their own; sweep cases address the study "kept", which holds one finished
# trial before the call and must hold it, intact, after.
RUN_BAD_INPUTS = [
    ("unknown-dataset", ["dataset=moons"], "dataset=moons: unknown dataset; choose one of"),
    (
        "unknown-flow",
        ["flow=realnvp"],
        "flow=realnvp: unknown flow; choose one of: glow, maf, spline",
    ),
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
    ("odd-dim", ["dataset.dim=5"], "dataset.dim=5: must be an even integer in [2, 64]"),
    ("dim-below-2", ["dataset.dim=0"], "dataset.dim=0: must be an even integer in [2, 64]"),
    (
        "energy-on-no-noise",
        ["ebm.base=noise"],
        "ebm.base=noise: puts the energy on the estimator's fixed noise, and estimator=fce",
    ),
    (
        "mle-above-2d",
        ["estimator=mle", "dataset.dim=4"],
        "dataset.dim=4: estimator=mle normalises the EBM on a 2-D grid",
    ),
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
    # Keys no schema knows, and settings removed with ~: refused, with or without Hydra's +.
    # Hydra's advice for a key it cannot override (append it with +) only led to "no such
    # setting": both forms say so at once, with the nearest key.
    (
        "unknown-key-no-plus",
        ["train.maxsteps=300"],
        "train.maxsteps: no such setting; did you mean train.max_steps?",
    ),
    (
        "unknown-key-plus",
        ["+train.maxsteps=300"],
        "train.maxsteps: no such setting; did you mean train.max_steps?",
    ),
    (
        "unknown-group-key",
        ["trian.max_steps=300"],
        "trian.max_steps: no such setting; did you mean train.max_steps?",
    ),
    ("unknown-top-key-plus", ["+lr=0.1"], "lr: no such setting"),
    ("removed-seed", ["~seed"], "seed: has no value (removed with ~seed?)"),
    ("removed-dataset", ["~dataset"], "(removed with ~dataset?)"),
    ("removed-train", ["~train"], "train: has no value (removed with ~train?)"),
    # A setting removed with ~ (one set, one null, one unknown): Hydra's errors differ and
    # span lines; one line says settings are set, never removed.
    ("removed-setting", ["~train.batch_size"], "~train.batch_size: a setting cannot be removed"),
    ("removed-null-setting", ["~train.max_steps"], "~train.max_steps: a setting cannot be"),
    ("removed-unknown", ["~train.nosuch"], "~train.nosuch: a setting cannot be removed, only"),
    # Values that passed validation and then crashed inside torch.
    ("seed-too-big", ["seed=1180591620717411303424"], "seed=1180591620717411303424: must be"),
    ("seed-negative", ["seed=-1"], "seed=-1: must be an integer in [0, 2**63 - 1]"),
    ("weight-decay-nan", ["optimizer.weight_decay=nan"], "optimizer.weight_decay=nan: must"),
    ("weight-decay-inf", ["optimizer.weight_decay=inf"], "optimizer.weight_decay=inf: must"),
    ("slope-nan", ["ebm.negative_slope=nan"], "ebm.negative_slope=nan: must be a finite"),
    ("log-z-inf", ["ebm.log_z_init=inf"], "ebm.log_z_init=inf: must be a finite number"),
    ("absurd-samples", ["dataset.n_samples=10000000000"], "must be at most 50,000,000"),
    ("absurd-eval-points", ["eval.n_points=1000000000"], "eval.n_points=1000000000: must be"),
    ("absurd-grid", ["eval.grid_cells=100000"], "eval.grid_cells=100000: must be at most"),
    ("absurd-width", ["ebm.hidden=[100000,128]"], "ebm.hidden=[100000, 128]: a non-empty"),
    ("absurd-threads", ["threads=1000000"], "threads=1000000: must be at most 256"),
    # A multirun checks every value of its lists before the first job starts.
    ("multirun-later-value", ["-m", "threshold.value=0.6,1.5"], "threshold.value=1.5: must be"),
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
    (
        "tracking-store-in-memory",
        ["tracking.uri=sqlite://"],
        "tracking.uri=sqlite://: an in-memory store loses every run when the process ends",
    ),
    (
        "tracking-store-a-directory",
        ["tracking.uri=sqlite:///{tmp}/empty_run"],
        "tracking.uri=sqlite:///{tmp}/empty_run: {tmp}/empty_run is a directory; name a",
    ),
    (
        "tracking-store-another-database",
        ["tracking.uri=sqlite:///{tmp}/notes.db"],
        "tracking.uri=sqlite:///{tmp}/notes.db: {tmp}/notes.db is a SQLite database but not "
        "an MLflow store (tables: notes); MLflow would add its tables to it",
    ),
    (
        "experiment-name-too-long",
        ["tracking.experiment=" + "x" * 600],
        f"tracking.experiment={'x' * 40}...: 600 characters; MLflow allows at most 500",
    ),
    (
        "checkpoint-dir-a-file",
        ["hydra.run.dir={tmp}/taken"],
        "{tmp}/taken/checkpoints: cannot write checkpoints there (a file, not a directory)",
    ),
]
SWEEP_BAD_INPUTS = [
    ("sweep-missing", [], "sweep=<space> is required once; choose one of:"),
    ("sweep-unknown", ["sweep=nosuch"], "sweep=nosuch: no search space"),
    ("n-trials-zero", [A_SPACE, "sweep.n_trials=0"], "sweep.n_trials=0: must be an integer >= 1"),
    (
        "n-trials-negative",
        [A_SPACE, "sweep.n_trials=-3"],
        "sweep.n_trials=-3: must be an integer >= 1",
    ),
    (
        "n-trials-type",
        [A_SPACE, "sweep.n_trials=abc"],
        "sweep.n_trials='abc': must be an integer >= 1",
    ),
    (
        "sweep-pruner",
        [A_SPACE, "sweep.pruner=magic"],
        "sweep.pruner='magic': choose one of: median",
    ),
    (
        "sweep-objective",
        [A_SPACE, "sweep.objective=accuracy"],
        "sweep.objective='accuracy': choose one",
    ),
    (
        "sweep-unknown-key",
        [A_SPACE, "sweep.bogus.key=1"],
        "sweep.bogus: unknown setting; the settings",
    ),
    (
        "sweep-run-dataset",
        [A_SPACE, "dataset=moons"],
        "dataset=moons: unknown dataset; choose one of",
    ),
    (
        "sweep-run-unknown-key",
        [A_SPACE, "train.maxsteps=300"],
        "train.maxsteps: no such setting; did you mean train.max_steps?",
    ),
    (
        "sweep-run-type",
        [A_SPACE, "train.batch_size=abc"],
        "train.batch_size=abc; Value 'abc' of type",
    ),
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
        [A_SPACE, "tracking.uri=http://127.0.0.1:9"],
        "tracking.uri=http://127.0.0.1:9: no MLflow server answers",
    ),
    (
        "sweep-storage-unknown-kind",
        [A_SPACE, "sweep.storage=nosuchdb://host/optuna"],
        "sweep.storage=nosuchdb://host/optuna: cannot open the Optuna storage (Can't load plugin",
    ),
    (
        "sweep-storage-under-a-file",
        [A_SPACE, "sweep.storage=sqlite:///{tmp}/afile/optuna.db"],
        "sweep.storage=sqlite:///{tmp}/afile/optuna.db: {tmp}/afile is a file, not a directory",
    ),
    ("sweep-seed-negative", [A_SPACE, "sweep.seed=-1"], "sweep.seed=-1: must be an integer in"),
    ("sweep-seed-text", [A_SPACE, "sweep.seed=abc"], "sweep.seed='abc': must be an integer in"),
    # Every value a space can produce is checked before the study starts, not when a trial
    # draws it: each choice, both ends of each range, under each choice of its group.
    (
        "space-unknown-choice",
        ["sweep={tmp}/unknown_choice.yaml"],
        "sweep=unknown_choice: params.flow: 'nosuch': unknown flow; choose one of: glow, maf, "
        "spline",
    ),
    (
        "space-group-by-int",
        ["sweep={tmp}/group_int.yaml"],
        "sweep=group_int: params.flow: 1: unknown flow; choose one of: glow, maf, spline",
    ),
    (
        "space-group-as-range",
        ["sweep={tmp}/group_range.yaml"],
        "sweep=group_range: params.threshold: threshold is a config group; search it with "
        "type: categorical over its options: ema, fixed",
    ),
    (
        "space-float-on-int-key",
        ["sweep={tmp}/float_on_int.yaml"],
        "sweep=float_on_int: params.train.eval_every can be 10.0: Error merging override "
        "train.eval_every=10.0",
    ),
    (
        "space-int-with-float-bounds",
        ["sweep={tmp}/int_float_bounds.yaml"],
        "params.train.eval_every: type int needs integer low and high, got 10.5, 20",
    ),
    (
        "space-out-of-range",
        ["sweep={tmp}/out_of_range.yaml"],
        "sweep=out_of_range: params.threshold.value can be 1.5: threshold.value=1.5: must be "
        "in (0, 1)",
    ),
    (
        "space-key-of-one-group-option",
        ["sweep={tmp}/one_flow_only.yaml"],
        "sweep=one_flow_only: params.flow.n_steps can be 2 with flow=maf: flow.n_steps: no such "
        "setting with flow=maf",
    ),
    (
        "space-categorical-out-of-range",
        ["sweep={tmp}/lr_zero.yaml"],
        "sweep=lr_zero: params.optimizer.lr_ebm can be 0.0: optimizer.lr_ebm=0.0: must be a "
        "positive number",
    ),
    # The study "kept" was run with threshold.value in [0.5, 0.8]; flow_arch searches other keys.
    (
        "space-differs-from-the-study",
        ["sweep=flow_arch", "sweep.n_trials=1"],
        "sweep=flow_arch: study kept in sqlite:///{tmp}/optuna.db was run with another search "
        "space (its params differ in: flow, threshold, threshold.value); use another "
        "sweep.study_name, or the same space",
    ),
    (
        "sweep-storage-is-the-tracking-store",
        [A_SPACE, "sweep.storage=sqlite:///{tmp}/mlflow.db"],
        "sweep.storage=sqlite:///{tmp}/mlflow.db: the MLflow store (tracking.uri) too; Optuna's",
    ),
    (
        "sweep-storage-an-mlflow-store",
        [A_SPACE, "sweep.storage=sqlite:///{tmp}/other_mlflow.db"],
        "sweep.storage=sqlite:///{tmp}/other_mlflow.db: {tmp}/other_mlflow.db is an MLflow store",
    ),
]
SPACES = {
    "low_high": "params:\n  optimizer.lr_ebm: {type: float, low: 1.0, high: 0.1}\n",
    "not_yaml": "params: [unclosed\n",
    "no_type": "params:\n  threshold.value: {low: 0.5, high: 0.7}\n",
    "unknown_key": "params:\n  train.bogus: {type: float, low: 0.5, high: 0.7}\n",
    "unknown_choice": "params:\n  flow: {type: categorical, choices: [glow, nosuch]}\n",
    "group_int": "params:\n  flow: {type: categorical, choices: [1, 2]}\n",
    "group_range": "params:\n  threshold: {type: int, low: 0, high: 1}\n",
    "float_on_int": "params:\n  train.eval_every: {type: float, low: 10, high: 20}\n",
    "int_float_bounds": "params:\n  train.eval_every: {type: int, low: 10.5, high: 20}\n",
    "out_of_range": "params:\n  threshold.value: {type: float, low: 0.5, high: 1.5}\n",
    "one_flow_only": (
        "params:\n  flow: {type: categorical, choices: [glow, maf]}\n"
        "  flow.n_steps: {type: int, low: 2, high: 4}\n"
    ),
    "lr_zero": "params:\n  optimizer.lr_ebm: {type: categorical, choices: [1.0e-3, 0.0]}\n",
}
KEPT_STUDY = "kept"
# Lines a failing command may print before its error: log records (Hydra's, MLflow's, Optuna's).
LOG_RECORD = re.compile(r"^(\[|\d{4}/\d\d/\d\d \d\d:)")


def make_bad_input_files(tmp_path: Path, mlflow_store: Path) -> None:
    """The files the cases name: a plain file, broken checkpoints, broken search spaces,
    another program's database, an MLflow store, a run directory whose checkpoints/ is a file."""
    (tmp_path / "afile").write_text("a file, not a directory\n")
    with sqlite3.connect(tmp_path / "notes.db") as connection:
        connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    shutil.copyfile(mlflow_store, tmp_path / "other_mlflow.db")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "checkpoints").write_text("a file where checkpoints would go\n")
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


# The bad inputs found only after torch loads or a store opens cost a full start each: slow
# (`make test` and CI run them); the rest, refused before torch loads, stay in the default suite.
SLOW_BAD_INPUTS = {
    "tracking-store-not-a-database",
    "experiment-name-too-long",
    "checkpoint-dir-a-file",
    "no-gpu",
    "resume-missing",
    "sweep-storage-unknown-kind",
}
BAD_INPUTS = [
    pytest.param(
        script,
        args,
        message,
        id=name,
        marks=[pytest.mark.slow] if name in SLOW_BAD_INPUTS else [],
    )
    for script, inputs in (("run.py", RUN_BAD_INPUTS), (TUNE, SWEEP_BAD_INPUTS))
    for name, args, message in inputs
]


@pytest.mark.parametrize(("script", "args", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_and_leaves_every_store_as_it_was(
    tmp_path, empty_store, script, args, message
):
    make_bad_input_files(tmp_path, empty_store)
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
    result = run_cli([*extra, *args], cwd=tmp_path, timeout=HANG_GUARD_S, script=script)
    elapsed = time.monotonic() - started

    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, output
    assert lines[-1].startswith("error: ") and message in lines[-1], output
    assert all(LOG_RECORD.match(line) for line in lines[:-1]), output  # only log records before
    # Generous for a loaded machine (torch loads in seconds when idle); a store retried with
    # backoff would take minutes.
    assert elapsed < 120, f"{elapsed:.1f}s to report bad input"
    assert recorded_runs(store) == []  # none left RUNNING: none was even created
    assert recorded_runs(tmp_path / "other_mlflow.db") == []
    with sqlite3.connect(tmp_path / "notes.db") as connection:  # no MLflow table added
        assert [r[0] for r in connection.execute("SELECT name FROM sqlite_master")] == ["notes"]
    assert not list(tmp_path.rglob("*.tmp")), "a partial checkpoint was left"
    assert [p.name for p in tmp_path.rglob("step_*.pt")] == ["step_0000010.pt"]  # the fixture's
    if script == TUNE:
        assert kept_trials(storage) == kept
        with sqlite3.connect(tmp_path / "optuna.db") as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# --- SIGKILL, then resume -----------------------------------------------------------------------

# Default model sizes at batch 1000: tens of steps a second, so each kill point below is a window
# of a second or more, which the watcher hits reliably.
KILL_RUN = [
    "dataset.n_samples=20000",
    "train.batch_size=1000",
    "train.max_steps=150",
    "train.eval_every=25",
    "train.plot_every=0",
    "train.checkpoint_every=50",
    "eval.n_points=1000",
    "eval.grid_cells=32",
    "progress=log",
]


class Watched:
    """A command whose output is read as it comes, so that a test can act at a point of it."""

    def __init__(self, args: list[str], cwd: Path, script: str = "run.py") -> None:
        self.proc = start_cli(args, cwd, script)
        self.lines: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(stream,), daemon=True)
            for stream in (self.proc.stdout, self.proc.stderr)
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def last_step(self) -> int:
        steps = [int(m.group(1)) for line in self.lines if (m := re.search(r"step (\d+)/", line))]
        return max(steps, default=0)

    def wait_until(self, condition, timeout: float = HANG_GUARD_S) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, "".join(self.lines)
            assert time.monotonic() < deadline, "".join(self.lines)
            time.sleep(0.005)

    def kill(self) -> str:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=HANG_GUARD_S)
        for reader in self.readers:
            reader.join(timeout=10)
        return "".join(self.lines)


def histories(uri: str, run_id: str) -> dict[str, dict[int, set[float]]]:
    """Every metric of a run, step by step (a step logged twice, before a kill and after the
    resume, must have had the same value both times: then its set holds one value)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    names = [n for n in client.get_run(run_id).data.metrics if n != "wall_time_s"]
    found: dict[str, dict[int, set[float]]] = {}
    for name in names:
        for metric in client.get_metric_history(run_id, name):
            found.setdefault(name, {}).setdefault(metric.step, set()).add(metric.value)
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, empty_store) -> tuple[Path, dict]:
    """One store for the module, and the metrics of the run left alone."""
    root = tmp_path_factory.mktemp("kills")
    uri = copy_store(empty_store, root)
    args = [*KILL_RUN, f"tracking.uri={uri}", "tracking.experiment=uninterrupted"]
    result = run_cli([*args, f"hydra.run.dir={root / 'uninterrupted'}"], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    _, (run,) = runs(uri, "uninterrupted")
    return root, histories(uri, run.info.run_id)


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [
        int(p.stem.split("_")[1]) for p in checkpoint.list_checkpoints(run_dir / "checkpoints")
    ]


# (kill when, newest checkpoint on disk at the kill)
KILL_POINTS = {
    "before-the-first-checkpoint": (lambda w, d: w.saw("ready in"), None),
    "between-checkpoints": (lambda w, d: 50 in checkpoint_steps(d) and w.last_step() > 55, 50),
    "right-after-a-checkpoint": (lambda w, d: 100 in checkpoint_steps(d), 100),
    "during-the-final-logging": (lambda w, d: 150 in checkpoint_steps(d), 150),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_ends_with_the_uninterrupted_metrics(uninterrupted, point):
    root, expected = uninterrupted
    uri, experiment = store_uri(root), f"killed-{point}"
    args = [*KILL_RUN, f"tracking.uri={uri}", f"tracking.experiment={experiment}"]
    run_dir = root / point / "run"
    when, newest = KILL_POINTS[point]

    watched = Watched([*args, f"hydra.run.dir={run_dir}"], cwd=root)
    watched.wait_until(lambda: when(watched, run_dir))
    output = watched.kill()
    assert watched.proc.returncode == -signal.SIGKILL, output
    steps = checkpoint_steps(run_dir)
    assert (steps[-1] if steps else None) == newest, (steps, output)  # killed where intended
    client, (killed,) = runs(uri, experiment)
    assert killed.info.status == "RUNNING"  # nothing could end it: SIGKILL is not catchable

    resume = [*args, f"train.resume={run_dir}", f"hydra.run.dir={root / point / 'resume'}"]
    result = run_cli(resume, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not list(run_dir.rglob("*.tmp"))
    _, found = runs(uri, experiment)
    if newest is None:
        # No checkpoint yet: the run starts again from step 0 in its directory, as a new
        # MLflow run; the killed one is reconciled to KILLED when the store is next opened.
        assert "has no checkpoint yet: starting again from step 0" in result.stdout
        by_id = {r.info.run_id: r for r in found}
        assert by_id.pop(killed.info.run_id).info.status == "KILLED"
        (resumed,) = by_id.values()
        assert client.get_run(killed.info.run_id).data.tags["fce.ended_by"].startswith("process")
    else:
        (resumed,) = found  # the same MLflow run goes on
        assert resumed.info.run_id == killed.info.run_id
    assert resumed.info.status == "FINISHED"
    assert checkpoint_steps(run_dir)[-1] == 150
    assert histories(uri, resumed.info.run_id) == expected


def test_runs_whose_process_is_gone_are_marked_killed_by_the_next_start(tmp_path, empty_store):
    """Host and pid are run tags; a new run against the store ends the dead ones, in every
    experiment of the store."""
    from mlflow.tracking import MlflowClient

    from fce.tracking import MLflowTracker
    from fce.tracking.housekeeping import process_identity

    uri = copy_store(empty_store, tmp_path)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("fce")
    other = client.create_experiment("another")
    exited = subprocess.Popen(["true"])
    exited.wait()
    zombie = subprocess.Popen(["true"])  # exits, and stays unreaped while we hold it
    alive = subprocess.Popen(["sleep", "60"])
    try:
        while proc_stat(zombie.pid)[0] != "Z":
            time.sleep(0.01)
        alive_identity = {"fce.host": socket.gethostname(), "fce.pid": str(alive.pid)}
        stat = proc_stat(alive.pid)
        tags = {
            "exited": {**alive_identity, "fce.pid": str(exited.pid)},
            "zombie": {**alive_identity, "fce.pid": str(zombie.pid)},
            "alive": {**alive_identity, "fce.pid_start": stat[19]},
            "pid reused": {**alive_identity, "fce.pid_start": str(int(stat[19]) - 1)},
            "other host": {**alive_identity, "fce.host": "elsewhere", "fce.pid": str(exited.pid)},
            "untagged": {},
        }
        ids = {k: client.create_run(experiment, tags=t).info.run_id for k, t in tags.items()}
        elsewhere = {"fce.host": socket.gethostname(), "fce.pid": str(exited.pid)}
        ids["exited, another experiment"] = client.create_run(other, tags=elsewhere).info.run_id

        tracker = MLflowTracker(uri, "fce", run_name="next")

        status = {k: client.get_run(i).info.status for k, i in ids.items()}
        assert status == {
            "exited": "KILLED",
            "exited, another experiment": "KILLED",
            "zombie": "KILLED",
            "alive": "RUNNING",
            "pid reused": "KILLED",
            "other host": "RUNNING",
            "untagged": "RUNNING",
        }
        mine = client.get_run(tracker.run_id).data.tags
        assert {k: mine[k] for k in process_identity()} == process_identity()
    finally:
        alive.kill()
        alive.wait()
        zombie.wait()


# --- four processes on one store ----------------------------------------------------------------


@pytest.mark.slow
def test_four_processes_on_one_store_record_every_run_and_trial(tmp_path, empty_store):
    """Two runs and a two-worker study at once, on one MLflow and one Optuna SQLite file, with
    frequent writes: every run and trial ends with its status, no "database is locked"."""
    import optuna

    uri, storage = copy_store(empty_store, tmp_path), f"sqlite:///{tmp_path / 'optuna.db'}"
    busy = [*TINY, *TINY_FLOW["glow"], "train.eval_every=5", "train.checkpoint_every=10"]
    busy = [*busy, f"tracking.uri={uri}"]
    commands = [
        ([*busy, "seed=0", f"hydra.run.dir={tmp_path / 'run0'}"], "run.py"),
        ([*busy, "seed=1", f"hydra.run.dir={tmp_path / 'run1'}"], "run.py"),
        (
            [
                "sweep=threshold_lr",
                *busy,
                f"sweep.storage={storage}",
                "sweep.study_name=together",
                "sweep.n_trials=4",
                "sweep.n_jobs=2",
                "sweep.sampler=random",
                "sweep.pruner=none",
            ],
            TUNE,
        ),
    ]
    procs = [start_cli(args, tmp_path, script) for args, script in commands]
    outputs = [p.communicate(timeout=HANG_GUARD_S) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
        assert "database is locked" not in stdout + stderr
        assert "Traceback" not in stdout + stderr

    study = optuna.load_study(study_name="together", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    _, found = runs(uri)
    assert len(found) == 2 + 1 + 4  # two runs, the study's parent run and four trials
    assert {r.info.status for r in found} == {"FINISHED"}
    trials = {r.data.tags.get("optuna.trial") for r in found} - {None}
    assert trials == {"0", "1", "2", "3"}
    for run in found:  # every run has its whole history, nothing dropped by a busy store
        if "optuna.study" in run.data.tags and "optuna.trial" not in run.data.tags:
            continue  # the parent
        assert len(runs_history(uri, run.info.run_id, "value")) == 60
        assert sorted(runs_history(uri, run.info.run_id, "nll_ebm")) == list(range(0, 61, 5))


def runs_history(uri: str, run_id: str, name: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, name)]


# --- determinism --------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_and_config_give_identical_metrics_in_two_processes(tmp_path, empty_store):
    """On CPU, bit for bit: every logged value at every step, and the final parameters."""
    uri = copy_store(empty_store, tmp_path)
    args = [*TINY, *TINY_FLOW["maf"], "flow=maf", "train.plot_every=0", f"tracking.uri={uri}"]
    procs = [
        start_cli(
            [*args, f"tracking.experiment=twin{k}", f"hydra.run.dir={tmp_path / str(k)}"], tmp_path
        )
        for k in (0, 1)
    ]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    (first,), (second,) = runs(uri, "twin0")[1], runs(uri, "twin1")[1]
    assert first.info.run_id != second.info.run_id
    first_history = histories(uri, first.info.run_id)
    assert {"value", "acc", "nll_ebm", "nll_flow"} <= set(first_history)
    assert first_history == histories(uri, second.info.run_id)
    states = [
        checkpoint.load(checkpoint.list_checkpoints(tmp_path / str(k) / "checkpoints")[-1])
        for k in (0, 1)
    ]
    for part in ("ebm", "flow"):
        a, b = states[0]["trainer"][part], states[1]["trainer"][part]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), part


# --- a study's driver stopped or killed ----------------------------------------------------------


def start_two_worker_study(
    tmp_path: Path, n_trials: int = 2, steps: int = 1000000, new_session: bool = False
) -> tuple[subprocess.Popen, list[int]]:
    """A 2-worker study (long trials by default), returned once both workers are training."""
    args = [
        "sweep=threshold_lr",
        f"sweep.n_trials={n_trials}",
        "sweep.n_jobs=2",
        f"sweep.storage=sqlite:///{tmp_path / 'optuna.db'}",
        f"tracking.uri={store_uri(tmp_path)}",
        *[a for a in TINY if not a.startswith("train.max_steps")],
        *TINY_FLOW["glow"],
        f"train.max_steps={steps}",
        "train.epochs=1000000",
    ]
    driver = start_cli(args, tmp_path, script="sweeps/tune.py", new_session=new_session)
    deadline = time.monotonic() + 180
    # Until both trials' MLflow runs exist (a run writes its config.yaml before it opens
    # its MLflow run, and a signal before that ends the trial with no run to end).
    while trials_with_runs(tmp_path / "optuna.db") < 2:
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline, "the workers never started training"
        time.sleep(0.2)
    workers = [p for p in children(driver.pid) if "spawn_main" in proc_cmdline(p)]
    assert len(workers) == 2
    return driver, workers


def trials_with_runs(db: Path) -> int:
    """Trials of an Optuna SQLite storage whose MLflow run exists (read without Optuna)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as connection:
            query = "SELECT COUNT(*) FROM trial_user_attributes WHERE key = 'mlflow_run_id'"
            return connection.execute(query).fetchone()[0]
    except sqlite3.OperationalError:  # its tables not made yet
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_or_killed_driver_takes_its_workers_with_it(tmp_path, sig):
    """SIGTERM ends the study like Ctrl-C (exit 143); even after SIGKILL no worker is left
    training as an orphan: each notices, stops at a step boundary and marks its run KILLED."""
    driver, workers = start_two_worker_study(tmp_path)
    driver.send_signal(sig)
    driver.communicate(timeout=HANG_GUARD_S)
    assert driver.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
    assert wait_gone(workers, 60) == []
    _, found = runs(store_uri(tmp_path))
    trials = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == 2 and {r.info.status for r in trials} == {"KILLED"}
    if sig == signal.SIGTERM:  # the driver lived to end its parent run too
        assert {r.info.status for r in found} == {"KILLED"}


@pytest.mark.slow
def test_ctrl_c_on_a_two_worker_study_is_one_line_and_leaves_nothing_running(tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the driver and both workers at once."""
    import optuna

    driver, workers = start_two_worker_study(tmp_path, new_session=True)
    os.killpg(driver.pid, signal.SIGINT)
    stdout, stderr = driver.communicate(timeout=HANG_GUARD_S)
    assert driver.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    said = [line for line in stderr.splitlines() if line.strip() and not LOG_RECORD.match(line)]
    assert said == ["interrupted: finished trials are kept; rerun the command to continue"]
    assert wait_gone(workers, 30) == []
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.load_study(study_name="threshold_lr-8gaussians-glow", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert {t.user_attrs["error"] for t in study.trials} <= {
        "interrupted by SIGINT",
        "interrupted by SIGTERM",  # the driver's, if it came first
    }
    _, found = runs(store_uri(tmp_path))
    trial_runs = [r for r in found if "optuna.trial" in r.data.tags]
    assert len(trial_runs) == 2
    assert {(r.info.status, r.data.tags["optuna.state"]) for r in trial_runs} == {
        ("KILLED", "FAIL")
    }
    (parent,) = [r for r in found if "optuna.trial" not in r.data.tags]
    assert parent.info.status == "KILLED"


@pytest.mark.slow
def test_a_worker_killed_alone_fails_its_trial_and_the_others_finish_the_study(tmp_path):
    """As the out-of-memory killer would: SIGKILL to one worker. The driver fails its trial
    at once (it does not count toward n_trials), the other worker runs the study to n_trials
    finished trials, and the driver exits 1 saying so."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    driver, workers = start_two_worker_study(tmp_path, n_trials=3, steps=1000)
    study = optuna.load_study(study_name="threshold_lr-8gaussians-glow", storage=storage)
    running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    victim = max(running, key=lambda t: t.datetime_start)  # the one furthest from its end
    pid = int(victim.user_attrs["fce.worker"]["fce.pid"])
    assert pid in workers
    os.kill(pid, signal.SIGKILL)
    _, stderr = driver.communicate(timeout=HANG_GUARD_S)

    assert driver.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: worker ") and f"(pid {pid}) was killed by SIGKILL" in last
    assert f"its trial {victim.number} marked FAIL" in last and "has 3 of 3 trials" in last
    done = optuna.load_study(study_name=study.study_name, storage=storage).trials
    assert len(done) == 4  # three finished, and the killed one
    for trial in done:
        assert trial.state.name == ("FAIL" if trial.number == victim.number else "COMPLETE")
    assert "SIGKILL" in done[victim.number].user_attrs["error"]
    _, found = runs(store_uri(tmp_path))
    by_trial = {r.data.tags["optuna.trial"]: r for r in found if "optuna.trial" in r.data.tags}
    assert by_trial.pop(str(victim.number)).info.status == "KILLED"
    assert {r.info.status for r in by_trial.values()} == {"FINISHED"}
    (parent,) = [r for r in found if "optuna.trial" not in r.data.tags]
    assert parent.info.status == "FAILED"
