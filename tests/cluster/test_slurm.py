"""Jobs on the one-node SLURM cluster: a Hydra grid through `hydra/launcher=slurm` (submitit),
and study workers as an sbatch array, all logging to the tracking server."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from tests.cluster.helpers import (
    children_by_trial,
    finish,
    mlflow_runs,
    start,
    study_args,
    trials,
)
from tests.helpers import GRID_TINY, ROOT

pytestmark = pytest.mark.cluster


def watch_queue(proc: subprocess.Popen, env: dict[str, str], job_name: str) -> set[str]:
    """The ids of ``job_name``'s jobs (array tasks as <job>_<task>) that squeue showed RUNNING
    while ``proc`` ran."""
    running = set()
    while proc.poll() is None:
        listed = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i %j %T"], env=env, capture_output=True, text=True
        )
        assert listed.returncode == 0, listed.stderr
        for line in listed.stdout.splitlines():
            job, name, state = line.split()
            if name == job_name and state == "RUNNING":
                running.add(job)
        time.sleep(0.5)
    return running


def test_a_hydra_grid_runs_as_slurm_jobs_and_logs_to_the_tracking_server(cluster, name, tmp_path):
    sweep_dir = tmp_path / "grid"
    args = [
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=15",
        f"hydra.launcher.name={name}",
        f"hydra.sweep.dir={sweep_dir}",
        "seed=0,1,2,3",
        *GRID_TINY,
        f"tracking.uri={cluster.tracking_uri}",
        f"tracking.experiment={name}",
    ]
    env = cluster.env()
    proc = start(args, tmp_path, env, script="run.py")
    running = watch_queue(proc, env, name)
    finish(proc)

    assert len(running) == 4 and all(re.fullmatch(r"\d+_[0-3]", j) for j in running), running
    _, found = mlflow_runs(cluster, name)
    assert sorted(int(r.data.params["seed"]) for r in found) == [0, 1, 2, 3]
    assert {r.info.status for r in found} == {"FINISHED"}
    assert {r.data.tags["sweep_id"] for r in found} == {str(sweep_dir)}
    # Each run was made by one of those SLURM jobs: its id is in that job's log.
    logs = {
        path.name.split("_log")[0].rsplit("_", 1)[0]: path.read_text()
        for path in sweep_dir.glob(".submitit/*/*_log.out")
    }
    assert set(logs) == running, (set(logs), running)
    for run in found:
        assert sum(run.info.run_id in text for text in logs.values()) == 1, run.info.run_id


def test_study_workers_submitted_as_a_slurm_array_share_one_study(cluster, name, tmp_path):
    env = cluster.env(FCE_ROOT=str(ROOT), FCE_PYTHON=sys.executable)
    command = [
        "sbatch",
        "--wait",
        "--array=0-1",
        f"--job-name={name}",
        "--mem=1G",
        f"--chdir={tmp_path}",
        f"--output={tmp_path}/worker-%a.out",
        str(ROOT / "sweeps" / "cluster" / "tune-array.sbatch"),
        *study_args(cluster, name, "sweep.n_trials=6"),
    ]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    running = watch_queue(proc, env, name)
    output = proc.communicate()[0].decode()
    outputs = [(tmp_path / f"worker-{k}.out").read_text() for k in (0, 1)]
    assert proc.returncode == 0, output + "\n".join(o[-3000:] for o in outputs)

    assert len(running) == 2, running
    done = trials(cluster, name)
    assert sorted(t.number for t in done) == list(range(6))
    assert {t.state.name for t in done} == {"COMPLETE"}
    _, found = mlflow_runs(cluster, name)
    assert len([r for r in found if r.info.run_name == f"study-{name}"]) == 1
    by_trial = children_by_trial(found)
    assert sorted(by_trial) == list(range(6))
    # Both tasks ran trials: each trial's MLflow run id is in the log of exactly one task.
    ran = [{n for n, (r,) in by_trial.items() if r.info.run_id in text} for text in outputs]
    assert ran[0] and ran[1] and not ran[0] & ran[1] and ran[0] | ran[1] == set(range(6)), ran
