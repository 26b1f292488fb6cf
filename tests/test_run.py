"""run.py end to end, in a temp dir against a temp MLflow store: what was logged, not only
the exit code."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from fce.tracking.housekeeping import store_lock
from tests.helpers import TINY, TINY_FLOW, run_cli, runs, start_cli, store_uri


def tiny(tmp_path: Path, flow: str = "glow", *extra: str) -> list[str]:
    return [f"flow={flow}", *TINY, *TINY_FLOW[flow], f"tracking.uri={store_uri(tmp_path)}", *extra]


@pytest.mark.parametrize("flow", ["glow", "maf"])
def test_run_logs_params_metrics_artifacts_and_finishes(tmp_path, flow):
    result = run_cli(tiny(tmp_path, flow, "dataset=checkerboard"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    client, found = runs(store_uri(tmp_path))
    assert len(found) == 1
    run = found[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["dataset.name"] == "checkerboard"
    assert params["flow.name"] == flow
    assert params["threshold.value"] == "0.6"
    assert params["optimizer.lr_ebm"] == "0.001"
    assert params["train.max_steps"] == "60"
    assert run.data.tags["git_commit"]
    assert "dataset=checkerboard" in run.data.tags["overrides"]

    def history(name):
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]

    assert [s for s, _ in history("value")] == list(range(1, 61))
    assert len(history("acc")) == len(history("trained_ebm")) == 60
    assert history("trained_ebm")[0] == (1, 1.0)  # the game starts with the EBM
    for name in ("nll_ebm", "nll_flow", "logz_gap", "mse_logp", "kl_data_ebm"):
        assert [s for s, _ in history(name)] == [0, 20, 40, 60], name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curves.png", "densities", "checkpoints"} <= artifacts
    panels = {a.path for a in client.list_artifacts(run.info.run_id, "densities")}
    assert panels == {"densities/step_0000040.png", "densities/step_0000060.png"}
    ckpts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert ckpts == ["checkpoints/step_0000060.pt"]


def test_every_dataset_logs_the_metrics_against_its_density(tmp_path):
    result = run_cli(tiny(tmp_path, "glow", "dataset=spiral"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _, (run,) = runs(store_uri(tmp_path))
    metrics = run.data.metrics
    for name in ("kl_data_ebm", "kl_data_flow", "tv_ebm", "mse_logp", "mse_logp_centered"):
        assert name in metrics, name
    assert metrics["kl_data_ebm"] == pytest.approx(metrics["nll_ebm"] - metrics["nll_data"])
    assert 0 <= metrics["tv_ebm"] <= 1


def _run_dir(tmp_path: Path) -> Path:
    (run_dir,) = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    return run_dir


def _wait_for(path_glob, root: Path, proc, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = sorted(root.glob(path_glob))
        if hits:
            return hits[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{path_glob} never appeared")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_marks_killed_writes_a_checkpoint_and_exits_128_plus_signal(tmp_path, sig, code):
    args = [*tiny(tmp_path), "train.max_steps=100000", "train.epochs=100000"]
    proc = start_cli([*args, "train.checkpoint_every=0"], tmp_path)
    _wait_for("outputs/*/*/config.yaml", tmp_path, proc)
    while True:  # until the tracked run exists (under the lock that guards a new store)
        with store_lock(store_uri(tmp_path)):
            if runs(store_uri(tmp_path))[1]:
                break
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    _, (run,) = runs(store_uri(tmp_path))
    assert run.info.status == "KILLED"
    assert list((_run_dir(tmp_path) / "checkpoints").glob("step_*.pt"))


def test_resume_rejects_a_checkpoint_of_another_run(tmp_path):
    assert run_cli(tiny(tmp_path), cwd=tmp_path).returncode == 0
    run_dir = _run_dir(tmp_path)
    result = run_cli([*tiny(tmp_path), "seed=7", f"train.resume={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "the checkpoint has seed=42, this run seed=7" in result.stderr
    _, found = runs(store_uri(tmp_path))
    assert [r.info.status for r in found] == ["FINISHED"]
