"""The cluster's servers, and workers on its "machines": separate working directories, only the
database and the tracking server shared."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

from tests.helpers import HANG_GUARD_S, ROOT, TINY

CLUSTER_SH = ROOT / "sweeps" / "cluster" / "cluster.sh"
STUDY_TINY = [*TINY, "flow.n_steps=2", "flow.width=16"]


@dataclass(frozen=True)
class Cluster:
    state: Path
    storage: str  # Optuna's database (postgresql+psycopg://...)
    tracking_uri: str  # the MLflow tracking server (http://...)
    slurm_conf: str
    pg_admin: str

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a process on a "machine" of this cluster."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SLURM_CONF": self.slurm_conf}
        env.pop("MLFLOW_RUN_ID", None)
        env.update(extra)
        return env

    def script(self, *args: str, timeout: float = HANG_GUARD_S) -> str:
        result = subprocess.run(
            [str(CLUSTER_SH), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.env(), "FCE_CLUSTER_DIR": str(self.state), "FCE_PYTHON": sys.executable},
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def connections(self, database: str, application: str | None = None) -> int:
        """Client connections to ``database`` now (pg_stat_activity), of ``application`` only
        if given."""
        import psycopg

        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
            "AND backend_type = 'client backend'"
        )
        params: tuple = (database,)
        if application is not None:
            query += " AND application_name = %s"
            params += (application,)
        with psycopg.connect(self.pg_admin, autocommit=True) as conn:
            return int(conn.execute(query, params).fetchone()[0])


def read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            values[key] = value
    return values


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def study_args(cluster: Cluster, name: str, *extra: str) -> list[str]:
    return [
        "sweep=threshold_lr",
        f"sweep.storage={cluster.storage}",
        f"sweep.study_name={name}",
        "sweep.pruner=none",
        "sweep.heartbeat_s=2",
        f"tracking.uri={cluster.tracking_uri}",
        f"tracking.experiment={name}",
        *STUDY_TINY,
        *extra,
    ]


def machine(tmp_path: Path, label: str) -> Path:
    directory = tmp_path / label
    directory.mkdir(exist_ok=True)
    return directory


def start(
    args: list[str], cwd: Path, env: dict[str, str], script: str = "sweeps/tune.py"
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = HANG_GUARD_S) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-4000:]
    return output


def trials(cluster: Cluster, name: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials; none before a driver has created it."""
    try:
        return optuna.load_study(study_name=name, storage=cluster.storage).trials
    except KeyError:
        return []


def mlflow_runs(cluster: Cluster, name: str):
    client = MlflowClient(tracking_uri=cluster.tracking_uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name} on {cluster.tracking_uri}"
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def children_by_trial(found) -> dict[int, list]:
    by_trial: dict[int, list] = {}
    for run in found:
        if "optuna.trial" in run.data.tags:
            by_trial.setdefault(int(run.data.tags["optuna.trial"]), []).append(run)
    return by_trial
