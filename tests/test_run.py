"""run.py end to end, in a temp dir against a temp MLflow store: what was logged, not only
the exit code."""

from __future__ import annotations

import math
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fce.data import DATASET_NAMES
from fce.tracking.housekeeping import store_lock
from tests.helpers import HANG_GUARD_S, TINY, TINY_FLOW, run_cli, runs, start_cli, store_uri


def tiny(tmp_path: Path, flow: str = "glow", *extra: str) -> list[str]:
    return [f"flow={flow}", *TINY, *TINY_FLOW[flow], f"tracking.uri={store_uri(tmp_path)}", *extra]


# The default suite's end-to-end smoke test of run.py (glow); every other test here that starts
# run.py is marked slow: `make test` and CI run them.
@pytest.mark.parametrize("flow", ["glow", pytest.param("maf", marks=pytest.mark.slow)])
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
    # The user's settings only: no Hydra internals in the params (they clutter comparisons).
    assert not [k for k in params if "_target_" in k or "_partial_" in k]
    # The experiment opens on runs and charts in MLflow 3's UI, not its GenAI view.
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # The last lines say where things went.
    said = result.stdout + result.stderr
    assert f"MLflow run {run.info.run_id}" in said
    assert f"mlflow ui --backend-store-uri {store_uri(tmp_path)}, then http" in said
    assert "?workflowType=machine_learning" in said
    # The run's own page too, in the same mode: the table's links into a run drop the mode.
    page = f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert f"{page}?workflowType=machine_learning (this run)" in said


@pytest.mark.slow
def test_a_run_logs_only_the_settings_it_uses(tmp_path):
    """NCE against a fitted Gaussian trains no flow: its flow's sizes, learning rate and the
    threshold that alternates two players are not its params (each group's name stays)."""
    result = run_cli(tiny(tmp_path, "glow", "estimator=nce"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _, (run,) = runs(store_uri(tmp_path))
    params = run.data.params
    assert params["estimator.noise"] == "gaussian"
    assert params["flow.name"] == "glow" and params["threshold.name"] == "fixed"
    unused = [k for k in params if k.startswith(("flow.", "threshold.", "optimizer.lr_flow"))]
    assert sorted(unused) == ["flow.name", "threshold.name"]
    assert params["optimizer.lr_ebm"] == "0.001" and params["ebm.hidden"] == "[32, 32]"


@pytest.mark.slow
def test_every_dataset_logs_the_metrics_against_its_density(tmp_path):
    # Every dataset of the registry, as one multirun: one process, a short run each.
    short = {"train.max_steps": "20", "train.plot_every": "0", "train.checkpoint_every": "0"}
    args = [a for a in tiny(tmp_path, "glow") if a.split("=")[0] not in short]
    args += [f"{k}={v}" for k, v in short.items()]
    result = run_cli(["-m", f"dataset={','.join(DATASET_NAMES)}", *args], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _, found = runs(store_uri(tmp_path))
    by_dataset = {run.data.params["dataset.name"]: run for run in found}
    assert sorted(by_dataset) == sorted(DATASET_NAMES) and len(found) == len(DATASET_NAMES)
    for dataset, run in by_dataset.items():
        assert run.info.status == "FINISHED", dataset
        metrics = run.data.metrics
        for name in ("kl_data_ebm", "kl_data_flow", "tv_ebm", "mse_logp", "mse_logp_centered"):
            assert math.isfinite(metrics.get(name, math.nan)), (dataset, name)
        kl = metrics["nll_ebm"] - metrics["nll_data"]
        assert metrics["kl_data_ebm"] == pytest.approx(kl), dataset
        assert 0 <= metrics["tv_ebm"] <= 1, dataset


def _run_dir(tmp_path: Path) -> Path:
    (run_dir,) = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    return run_dir


def _wait_for(path_glob, root: Path, proc, timeout: float = HANG_GUARD_S) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = sorted(root.glob(path_glob))
        if hits:
            return hits[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{path_glob} never appeared")


@pytest.mark.slow
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
    _, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == code, stderr
    _, (run,) = runs(store_uri(tmp_path))
    assert run.info.status == "KILLED"
    assert list((_run_dir(tmp_path) / "checkpoints").glob("step_*.pt"))


@pytest.mark.slow
def test_resume_rejects_a_checkpoint_of_another_run(tmp_path):
    assert run_cli(tiny(tmp_path), cwd=tmp_path).returncode == 0
    run_dir = _run_dir(tmp_path)
    result = run_cli([*tiny(tmp_path), "seed=7", f"train.resume={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "the checkpoint has seed=42, this run seed=7" in result.stderr
    _, found = runs(store_uri(tmp_path))
    assert [r.info.status for r in found] == ["FINISHED"]


def test_tracking_none_needs_no_store_and_leaves_the_outcome_in_the_run_dir(tmp_path):
    import json

    args = [a for a in tiny(tmp_path) if not a.startswith("tracking.")]
    result = run_cli([*args, "tracking=none"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob("*.db"))
    outcome = json.loads((_run_dir(tmp_path) / "metrics.json").read_text())
    assert outcome["status"] == "FINISHED" and outcome["step"] == 60 and outcome["error"] is None
    assert outcome["nll_ebm"] > 0 and "not tracked" in result.stdout + result.stderr


@pytest.mark.slow
def test_mlflow_tracking_uri_from_the_environment_is_honoured_and_the_setting_wins(tmp_path):
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    env_store = f"sqlite:///{tmp_path / 'env.db'}"
    args = [a for a in tiny(tmp_path) if not a.startswith("tracking.")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": env_store}
    for n, extra in enumerate(([], [f"tracking.uri={store_uri(tmp_path)}"])):
        done = subprocess.run(
            [sys.executable, str(ROOT / "run.py"), *args, *extra, f"hydra.run.dir={tmp_path}/{n}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=HANG_GUARD_S,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    assert len(runs(env_store)[1]) == 1  # no tracking.uri: the environment's store
    assert len(runs(store_uri(tmp_path))[1]) == 1  # tracking.uri set: it wins


@pytest.mark.slow
def test_resume_refuses_a_changed_learning_rate_in_one_line(tmp_path):
    assert run_cli(tiny(tmp_path), cwd=tmp_path).returncode == 0
    run_dir = _run_dir(tmp_path)
    more = ["train.max_steps=80", f"train.resume={run_dir}"]
    result = run_cli([*tiny(tmp_path), *more, "optimizer.lr_ebm=0.01"], cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "optimizer=" in line and "they must match" in line
    # A longer run is a change that is allowed, applied, and recorded on the run.
    result = run_cli([*tiny(tmp_path), *more], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    client, (run,) = runs(store_uri(tmp_path))
    assert run.data.tags["fce.resumed_at_step_60"] == "train.max_steps: 60 -> 80"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "value")]
    assert steps == list(range(1, 81))


@pytest.mark.slow
def test_resume_from_a_bare_checkpoint_file_writes_into_its_own_directory(tmp_path):
    import shutil

    assert run_cli(tiny(tmp_path), cwd=tmp_path).returncode == 0
    checkpoint = sorted((_run_dir(tmp_path) / "checkpoints").glob("step_*.pt"))[-1]
    bare = tmp_path / "saved" / "model.pt"
    bare.parent.mkdir()
    shutil.copy(checkpoint, bare)
    new_dir = tmp_path / "continued"
    more = ["train.max_steps=80", f"train.resume={bare}", f"hydra.run.dir={new_dir}"]
    result = run_cli([*tiny(tmp_path), *more], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (new_dir / "checkpoints").glob("*.pt")) == ["step_0000080.pt"]
    assert sorted(p.name for p in bare.parent.iterdir()) == ["model.pt"]  # nothing beside it
    assert not (tmp_path / "checkpoints").exists()  # nor in its grandparent


@pytest.mark.slow
def test_a_second_process_on_a_live_run_is_refused(tmp_path):
    args = [*tiny(tmp_path), "train.max_steps=100000", "train.epochs=100000"]
    proc = start_cli([*args, "train.checkpoint_every=20"], tmp_path)
    try:
        _wait_for("outputs/*/*/checkpoints/step_*.pt", tmp_path, proc)
        run_dir = _run_dir(tmp_path)
        second = run_cli([*args, f"train.resume={run_dir}"], cwd=tmp_path)
        assert second.returncode == 2
        (line,) = second.stderr.strip().splitlines()
        live = f"error: {run_dir}: this run is live in pid {proc.pid}"
        assert line == f"{live}; wait for it or stop it first"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=HANG_GUARD_S)
    _, (run,) = runs(store_uri(tmp_path))
    assert run.info.status == "KILLED"


def test_bad_input_found_after_torch_loads_leaves_no_folder(tmp_path):
    result = run_cli([*tiny(tmp_path), f"train.resume={tmp_path}/nothing.pt"], cwd=tmp_path)
    assert result.returncode == 2
    assert "no such checkpoint file" in result.stderr
    assert not list((tmp_path / "outputs").glob("*/*"))


@pytest.mark.slow
def test_ctrl_c_then_resume_logs_every_step_exactly_once(tmp_path):
    args = [*tiny(tmp_path), "train.max_steps=100000", "train.epochs=100000"]
    proc = start_cli([*args, "train.checkpoint_every=20", "train.eval_every=7"], tmp_path)
    _wait_for("outputs/*/*/checkpoints/step_*.pt", tmp_path, proc)
    time.sleep(1.5)  # well past the checkpoint: steps are buffered since the last flush
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 130, stderr
    run_dir = _run_dir(tmp_path)
    client, (run,) = runs(store_uri(tmp_path))
    interrupted_at = max(m.step for m in client.get_metric_history(run.info.run_id, "value"))
    total = interrupted_at + 30
    more = [f"train.max_steps={total}", "train.checkpoint_every=20", "train.eval_every=7"]
    result = run_cli([*tiny(tmp_path), *more, f"train.resume={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("value", "acc", "trained_ebm"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert sorted(steps) == list(range(1, total + 1)), name


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_is_refused_and_the_run_stays_finished(tmp_path):
    import torch

    assert run_cli(tiny(tmp_path), cwd=tmp_path).returncode == 0
    run_dir = _run_dir(tmp_path)
    newest = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    state = torch.load(newest, weights_only=True)
    broken = {
        "missing-key": lambda s: s["trainer"].pop("opt_flow"),
        "wrong-shape": lambda s: s["trainer"]["ebm"].update({"log_z": torch.zeros(3)}),
        "absurd-step": lambda s: s["trainer"].update({"step": 10**12}),
    }
    for name, damage in broken.items():
        copy = {**state, "trainer": {**state["trainer"], "ebm": dict(state["trainer"]["ebm"])}}
        damage(copy)
        path = tmp_path / f"{name}.pt"
        torch.save(copy, path)
        result = run_cli([*tiny(tmp_path), f"train.resume={path}"], cwd=tmp_path)
        assert result.returncode == 2, (name, result.stderr)
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: train.resume={path}: the checkpoint"), line
    # Fewer steps than the checkpoint has done: said before anything runs.
    fewer = [*tiny(tmp_path), "train.max_steps=40", f"train.resume={run_dir}"]
    result = run_cli(fewer, cwd=tmp_path)
    assert result.returncode == 2
    assert "is at step 60, beyond this run's 40 steps" in result.stderr
    _, (run,) = runs(store_uri(tmp_path))
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_runs_started_at_once_each_get_their_own_directory(tmp_path):
    import torch

    procs = [start_cli([*tiny(tmp_path), f"seed={s}"], tmp_path) for s in range(3)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode == 0, stderr
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 3
    _, found = runs(store_uri(tmp_path))
    by_id = {r.info.run_id: r for r in found}
    for run_dir in run_dirs:
        newest = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
        state = torch.load(newest, weights_only=True)
        run = by_id[state["tracker_run_id"]]  # each checkpoint names its own run ...
        assert run.data.tags["output_dir"] == str(run_dir)  # ... and that run its directory
        assert str(state["config"]["seed"]) == run.data.params["seed"]


@pytest.mark.slow
def test_a_new_run_never_writes_into_another_runs_directory(tmp_path):
    fixed = [*tiny(tmp_path), f"hydra.run.dir={tmp_path / 'same'}"]
    assert run_cli(fixed, cwd=tmp_path).returncode == 0
    again = run_cli([*fixed, "seed=3"], cwd=tmp_path)
    assert again.returncode == 2
    assert f"{tmp_path / 'same'}: already holds a run" in again.stderr
    _, found = runs(store_uri(tmp_path))
    assert len(found) == 1


@pytest.mark.slow
def test_killed_in_the_first_seconds_then_resumed_in_place(tmp_path):
    proc = start_cli(tiny(tmp_path), tmp_path)
    _wait_for("outputs/*/*/.hydra/config.yaml", tmp_path, proc)
    proc.send_signal(signal.SIGINT)  # before (or while) the run sets itself up
    _, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted")
    run_dir = _run_dir(tmp_path)
    result = run_cli([*tiny(tmp_path), f"train.resume={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()] == [run_dir]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))[-1] == "step_0000060.pt"
    _, found = runs(store_uri(tmp_path))
    assert [r.info.status for r in found if r.info.status != "KILLED"] == ["FINISHED"]


@pytest.mark.slow
def test_a_run_refused_for_a_malformed_store_leaves_nothing_behind(tmp_path):
    """Its directory is gone, so the same command against a good store is not refused as
    "already holds a run"."""
    (tmp_path / "garbage.db").write_bytes(bytes(range(256)) * 8)
    run_dir = tmp_path / "run"
    args = [*tiny(tmp_path), f"hydra.run.dir={run_dir}"]
    bad = run_cli([*args, f"tracking.uri=sqlite:///{tmp_path / 'garbage.db'}"], cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert "cannot open the MLflow store" in bad.stderr.strip().splitlines()[-1]
    assert not run_dir.exists()
    good = run_cli(args, cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    _, (run,) = runs(store_uri(tmp_path))
    assert run.info.status == "FINISHED"


def grid(tmp_path: Path, *sweep: str) -> subprocess.CompletedProcess:
    args = [*tiny(tmp_path), "train.max_steps=30", f"hydra.sweep.dir={tmp_path / 'grid'}"]
    return run_cli(["-m", *args, *sweep], cwd=tmp_path)


@pytest.mark.slow
def test_a_grid_counts_its_jobs_and_exits_1_when_one_diverged(tmp_path):
    result = grid(tmp_path, "optimizer.lr_ebm=1e-3,1e30")
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: grid of 2 jobs in {tmp_path / 'grid'}: ")
    assert "1 finished, 0 failed, 1 diverged" in last
    # Diverged at step 1, before any checkpoint: no "last good checkpoint" to point at.
    said = result.stdout + result.stderr
    assert "diverged at step 1" in said and "no checkpoint before it" in said
    assert "last good checkpoint" not in said
    # The two jobs differ by the swept rate alone: so do their names.
    _, found = runs(store_uri(tmp_path))
    assert sorted(r.info.status for r in found) == ["FAILED", "FINISHED"]
    for run in found:
        rate = run.data.params["optimizer.lr_ebm"]
        assert run.info.run_name == f"8gaussians-glow-s42 optimizer.lr_ebm={rate}"


@pytest.mark.slow
def test_a_parallel_grid_whose_every_job_diverged_exits_1(tmp_path):
    result = grid(tmp_path, "hydra/launcher=joblib", "seed=0,1", "optimizer.lr_ebm=1e30")
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.endswith("0 finished, 0 failed, 2 diverged; each job's metrics.json says why")
    _, found = runs(store_uri(tmp_path))
    assert sorted(r.info.status for r in found) == ["FAILED", "FAILED"]
    # A grid of finished jobs says so, and exits 0.
    result = grid(tmp_path, "seed=3,4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 finished, 0 failed, 0 diverged" in result.stdout + result.stderr


@pytest.mark.slow
def test_resume_with_the_run_directory_alone_continues_the_saved_run(tmp_path):
    """Its settings come from the run (here dataset=pinwheel and the temp store), not from
    the command line; what may change on resume still does."""
    import shutil

    assert run_cli(tiny(tmp_path, "glow", "dataset=pinwheel"), cwd=tmp_path).returncode == 0
    run_dir = _run_dir(tmp_path)
    record = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    result = run_cli([f"train.resume={run_dir}", "train.max_steps=80"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client, (run,) = runs(store_uri(tmp_path))  # the same MLflow run, in the run's own store
    assert run.data.params["dataset.name"] == "pinwheel"
    assert run.data.tags["fce.resumed_at_step_60"] == "train.max_steps: 60 -> 80"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "value")] == list(
        range(1, 81)
    )
    # A setting given that differs from the saved run's is refused in one line, as before.
    more = [f"train.resume={run_dir}", "train.max_steps=100"]
    refused = run_cli([*more, "dataset=8gaussians"], cwd=tmp_path)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "the checkpoint has dataset=" in line and "they must match" in line
    assert run_cli([*more, "estimator=nce"], cwd=tmp_path).returncode == 2
    # Neither a resume nor a refused one rewrites Hydra's record of the run, so a refused
    # setting never becomes the run's: the directory alone still continues it.
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == record
    result = run_cli([f"train.resume={run_dir}", "train.max_steps=90"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # Without Hydra's record of the run's overrides, from the checkpoint's config alone.
    shutil.rmtree(run_dir / ".hydra")
    result = run_cli(more, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _, (run,) = runs(store_uri(tmp_path))
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "value")] == list(
        range(1, 101)
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))[-1] == "step_0000100.pt"


@pytest.mark.slow
def test_a_run_whose_directory_is_deleted_mid_run_says_so_and_keeps_its_config(tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    args = [*tiny(tmp_path), "train.max_steps=400", "train.checkpoint_every=100"]
    proc = start_cli([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    _wait_for("run/checkpoints/step_*.pt", tmp_path, proc)
    time.sleep(0.3)  # past the save, between two checkpoints
    shutil.rmtree(run_dir)
    stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 0, stderr[-3000:]
    warned = [line for line in (stdout + stderr).splitlines() if "while the run trained" in line]
    assert len(warned) == 1 and "run.log and config.yaml" in warned[0], stdout + stderr
    saved = (run_dir / "config.yaml").read_text()  # written again, as the run had it
    assert "max_steps: 400" in saved
    assert list((run_dir / "checkpoints").glob("step_0000400.pt"))


def test_a_resume_in_process_loads_its_checkpoint_once_and_ends_as_the_whole_run(
    tmp_path, monkeypatch
):
    """The run's own trainer takes the checkpoint (no probe trainer loads it first), and the
    run resumed from step 40 ends with the metrics of the run that was never stopped."""
    from fce.compose import compose
    from fce.config import validate
    from fce.train import RunContext, run
    from fce.trainer import Trainer

    settings = [*TINY, "tracking=none", "train.checkpoint_every=20"]

    def job(name: str, *extra: str) -> dict[str, float]:
        cfg = compose([*settings, *extra])
        validate(cfg)
        return run(cfg, RunContext(output_dir=tmp_path / name, project_root=tmp_path))

    whole = job("whole")
    job("stopped", "train.max_steps=40")
    loads = []
    original = Trainer.load_state_dict
    monkeypatch.setattr(
        Trainer, "load_state_dict", lambda self, state: loads.append(1) or original(self, state)
    )
    resumed = job("stopped", f"train.resume={tmp_path / 'stopped'}")
    assert len(loads) == 1
    assert resumed == whole
