"""Faults mid-run, end to end: a full disk under the run or under the store, a store locked by
another writer, a tracking server that dies, checkpoints that cannot be written. Each ends in
one line naming the fault and a non-zero exit, within a bounded wait, with the run FAILED
where the store can still be written and every step kept, in the store or in a checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fce import checkpoint
from tests.helpers import HANG_GUARD_S, TINY, run_cli, runs, start_cli, store_uri

# About 5,000 steps if left alone (tens of seconds): a fault ends it long before.
LONG = [*TINY, "train.max_steps=5000", "train.epochs=100", "train.plot_every=0"]
FIRST_CHECKPOINT = "checkpoints/step_0000020.pt"


@contextlib.contextmanager
def small_disk(path: Path, size: str = "32m") -> Iterator[Path]:
    """A file system of its own at ``path`` (a tmpfs), so that a test can fill it."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"a full disk is simulated with a tmpfs, which needs root: {mounted.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write zeros in ``directory`` until its file system is full."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def start_and_wait_for(args: list[str], cwd: Path, path: Path) -> subprocess.Popen:
    """Start a run and return once ``path`` exists (the run is mid-way)."""
    proc = start_cli(args, cwd)
    deadline = time.monotonic() + 180
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return proc


def ended(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The output of a process that must end within ``timeout`` seconds of now."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"still running {timeout}s after the fault:\n{stdout[-2000:]}{stderr[-2000:]}")


def assert_one_line_fault(proc: subprocess.Popen, stdout: str, stderr: str, *names: str) -> str:
    output = stdout + stderr
    assert proc.returncode == 1, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), output[-4000:]
    assert all(name in last for name in names), last
    return last


def newest_checkpoint(run_dir: Path) -> tuple[int, dict]:
    path = checkpoint.list_checkpoints(run_dir / "checkpoints")[-1]
    return int(path.stem.split("_")[1]), checkpoint.load(path)


def steps_logged(uri: str, run_id: str, name: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, name))


@pytest.mark.slow
@pytest.mark.parametrize("under", ["run directory", "store"])
def test_a_disk_that_fills_mid_run_ends_it_in_one_line_and_keeps_its_checkpoints(tmp_path, under):
    with small_disk(tmp_path / "disk") as disk:
        run_dir = (disk if under == "run directory" else tmp_path) / "run"
        uri = store_uri(disk if under == "store" else tmp_path)
        args = [*LONG, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"]
        proc = start_and_wait_for(args, tmp_path, run_dir / FIRST_CHECKPOINT)
        filler = fill(disk)
        started = time.monotonic()
        stdout, stderr = ended(proc, timeout=HANG_GUARD_S)
        waited = time.monotonic() - started
        fault = "No space left on device" if under == "run directory" else "disk is full"
        line = assert_one_line_fault(proc, stdout, stderr, fault, "stopped at step")
        assert waited < 30, f"{waited:.0f}s between the full disk and the end of the run"
        assert not list(run_dir.rglob("*.tmp")), "a partial checkpoint was left"
        step, state = newest_checkpoint(run_dir)
        assert f"step_{step:07d}.pt" in line
        if under == "store":
            # The store took no more writes: the checkpoint, written at the fault, holds
            # every step trained so far.
            assert step > 20 and state["trainer"]["step"] == step
            assert len(state["trainer"]["history"]["value"][0]) == step
            outcome = json.loads((run_dir / "metrics.json").read_text())
            assert outcome["status"] == "FAILED" and outcome["step"] == step
        filler.unlink()
        _, (run,) = runs(uri)
        if under == "run directory":  # the store can still be written: the run is FAILED
            assert run.info.status == "FAILED"
            assert steps_logged(uri, run.info.run_id, "value")[-1] >= step
        else:  # it could not be ended then; the next open of the store ends it
            assert run.info.status == "RUNNING"
            from fce.tracking import MLflowTracker

            MLflowTracker(uri, "another")
            assert runs(uri)[1][0].info.status == "KILLED"


@pytest.mark.slow
def test_a_store_locked_by_another_writer_ends_the_run_and_a_resume_loses_no_step(tmp_path):
    """While another process holds the SQLite store's write lock, the run stops after MLflow's
    20 s busy timeout (and 20 s more trying to record FAILED) with a checkpoint of every step;
    resumed later, its MLflow run holds each step exactly once."""
    uri, run_dir = store_uri(tmp_path), tmp_path / "run"
    args = [*LONG, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"]
    proc = start_and_wait_for(args, tmp_path, run_dir / FIRST_CHECKPOINT)
    locker = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None, timeout=HANG_GUARD_S)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        stdout, stderr = ended(proc, timeout=HANG_GUARD_S)
        waited = time.monotonic() - started
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert_one_line_fault(proc, stdout, stderr, "database is locked", "stopped at step")
    assert waited < 60, f"{waited:.0f}s between the lock and the end of the run"
    step, state = newest_checkpoint(run_dir)
    assert step > 20 and len(state["trainer"]["history"]["value"][0]) == step
    _, (run,) = runs(uri)
    assert run.info.status == "RUNNING"  # locked to the end: nothing could end it

    more = [*args, f"train.resume={run_dir}", f"train.max_steps={step + 20}"]
    resumed = run_cli(more, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    _, (run,) = runs(uri)
    assert run.info.status == "FINISHED"
    assert steps_logged(uri, run.info.run_id, "value") == list(range(1, step + 21))
    assert steps_logged(uri, run.info.run_id, "nll_ebm") == list(range(0, step + 21, 20))


@pytest.mark.slow
def test_a_resume_that_cannot_write_checkpoints_is_refused_and_the_run_stays_finished(tmp_path):
    uri = store_uri(tmp_path)
    args = [*TINY, f"tracking.uri={uri}"]
    first = run_cli([*args, f"hydra.run.dir={tmp_path / 'first'}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    _, (finished,) = runs(uri)
    assert finished.info.status == "FINISHED"
    bare = tmp_path / "bare.pt"
    shutil.copyfile(checkpoint.list_checkpoints(tmp_path / "first" / "checkpoints")[-1], bare)
    (tmp_path / "second").mkdir()
    (tmp_path / "second" / "checkpoints").write_text("a file where checkpoints would go\n")

    more = [*args, f"train.resume={bare}", "train.max_steps=120"]
    result = run_cli([*more, f"hydra.run.dir={tmp_path / 'second'}"], cwd=tmp_path)

    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: {tmp_path / 'second' / 'checkpoints'}: cannot write checkpoints there "
        "(a file, not a directory)"
    )
    _, (after,) = runs(uri)
    assert after.info.status == "FINISHED"
    assert after.info.end_time == finished.info.end_time
    assert steps_logged(uri, after.info.run_id, "value") == list(range(1, 61))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_tracking_server_that_dies_mid_run_ends_it_within_a_bounded_wait(tmp_path):
    """MLflow's own retries would hold the run for about 8 minutes; the suite's bounds (2
    retries, 15 s per request) end it in seconds, with a checkpoint of every step."""
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            store_uri(tmp_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri, run_dir = f"http://127.0.0.1:{port}", tmp_path / "run"
    try:
        deadline = time.monotonic() + 180
        while subprocess.run(["curl", "-sf", f"{uri}/health"], capture_output=True).returncode:
            assert server.poll() is None and time.monotonic() < deadline, "no server"
            time.sleep(0.5)
        args = [*LONG, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"]
        proc = start_and_wait_for(args, tmp_path, run_dir / FIRST_CHECKPOINT)
        os.killpg(server.pid, 9)
        server.wait()
        started = time.monotonic()
        stdout, stderr = ended(proc, timeout=HANG_GUARD_S)
        waited = time.monotonic() - started
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 9)
            server.wait()
    assert_one_line_fault(proc, stdout, stderr, f"MLflow store {uri}", "stopped at step")
    assert waited < 60, f"{waited:.0f}s between the server's death and the end of the run"
    step, state = newest_checkpoint(run_dir)
    assert step > 20 and len(state["trainer"]["history"]["value"][0]) == step
    outcome = json.loads((run_dir / "metrics.json").read_text())
    assert outcome["status"] == "FAILED" and outcome["step"] == step


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` made read-only for everyone, root too (a read-only bind mount of the file)."""
    commands = [
        ["mount", "--bind", str(path), str(path)],
        ["mount", "-o", "remount,bind,ro", str(path)],
    ]
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", str(path)], capture_output=True, check=False)
            pytest.skip(f"a read-only file is simulated with a bind mount: {done.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_a_read_only_store_is_refused_in_one_line_naming_the_file(tmp_path):
    from mlflow.tracking import MlflowClient

    uri, database = store_uri(tmp_path), tmp_path / "mlflow.db"
    MlflowClient(tracking_uri=uri).search_experiments()  # an MLflow store, with its tables
    with read_only(database):
        args = [*TINY, f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'run'}"]
        result = run_cli(args, cwd=tmp_path, timeout=HANG_GUARD_S)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"error: tracking.uri={uri}: {database} is read-only (Read-only file system); "
        "make it writable or choose another store"
    )
    assert runs(uri)[1] == []
