"""Shared helpers of the end-to-end tests: run the real commands against a temp MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A run of a few seconds that still exercises every part: evals, panels, checkpoints.
TINY = [
    "dataset.n_samples=5000",
    "train.batch_size=100",
    "train.max_steps=60",
    "train.eval_every=20",
    "train.plot_every=40",
    "train.checkpoint_every=20",
    "eval.n_points=1000",
    "eval.grid_cells=32",
    "ebm.hidden=[32,32]",
    "progress=log",
]
# Tiny runs with the default flow and EBM sizes, so that a grid over flows stays valid.
GRID_TINY = [a for a in TINY if not a.startswith("ebm.")] + ["train.max_steps=30"]
TINY_FLOW = {
    "glow": ["flow.n_steps=2", "flow.width=16"],
    "maf": ["flow.n_blocks=2", "flow.hidden=16"],
    "spline": ["flow.n_layers=2", "flow.hidden=16"],
}


def make_trainer(
    estimator: str,
    ebm,
    flow,
    data,
    evaluator,
    settings,
    lr_ebm: float = 1e-3,
    lr_flow: float = 1e-3,
    rule=None,
    tracker=None,
    callbacks=None,
    **options,
):
    """A trainer built in code, as a library user would: the estimator by its option's class."""
    from fce.estimators import Players
    from fce.factory import option_class
    from fce.optim import Optimizers
    from fce.threshold import FixedThreshold
    from fce.trainer import Trainer

    optimizers = Optimizers(
        name="adam",
        lr_ebm=lr_ebm,
        lr_flow=lr_flow,
        betas=(0.9, 0.999),
        weight_decay=0.0,
        fused=False,
    )
    players = Players(
        ebm=ebm,
        flow=flow,
        optimizers=optimizers,
        rule=rule if rule is not None else FixedThreshold(value=0.6),
        train_data=data,
        seed=settings.seed,
    )
    model = option_class("estimator", estimator)(players, **options)
    return Trainer(model, data, evaluator, settings, tracker=tracker, callbacks=callbacks)


def flow_classes() -> dict[str, type]:
    """Every flow option's class, by name."""
    from fce.config import FLOW_NAMES
    from fce.factory import option_class

    return {name: option_class("flow", name) for name in FLOW_NAMES}


def store_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


# A guard against a hung command, not a speed check: the commands the tests run are bounded by
# their steps and points, and a machine loaded by other processes only makes them slower.
HANG_GUARD_S = 1800


def run_cli(
    args: list[str], cwd: Path, timeout: float = HANG_GUARD_S, script: str = "run.py"
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def start_cli(
    args: list[str], cwd: Path, script: str = "run.py", new_session: bool = False
) -> subprocess.Popen:
    """Start a command; ``new_session`` makes it lead its own process group, as a command
    typed in a terminal does (so that a test can send Ctrl-C's SIGINT to the group)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=new_session,
    )


def runs(uri: str, experiment: str = "fce"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return client, []
    return client, client.search_runs([found.experiment_id], max_results=1000)


def checkpoints_in_memory(every: int):
    """A Checkpoints callback that keeps each checkpoint's bytes, by step, in a dict."""
    import io

    import torch

    from fce.callbacks import Checkpoints

    saved: dict[int, bytes] = {}

    def keep(trainer) -> None:
        buffer = io.BytesIO()
        torch.save(trainer.state_dict(), buffer)
        saved[trainer.step] = buffer.getvalue()

    return saved, Checkpoints(keep, every=every)


# --- processes, as /proc shows them (tests that kill a parent check what became of its children)


def proc_stat(pid: int) -> list[str]:
    """Fields 3 onwards of /proc/<pid>/stat: state first, start time at index 19."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to reap it."""
    try:
        return proc_stat(pid)[0] != "Z"
    except OSError:
        return False


def proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    """Waits up to ``seconds`` for ``pids`` to end; those still alive then."""
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if alive(p)]
