"""The servers of `make cluster-up`, as the cluster tests reach them.

`make test-cluster` starts them and sets FCE_CLUSTER_DIR; the tests read its `env` file. Without
a running cluster every test here errors (it is not skipped): run them through the Makefile.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.cluster.helpers import CLUSTER_SH, Cluster, read_env
from tests.helpers import ROOT


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    state = Path(os.environ.get("FCE_CLUSTER_DIR", ROOT / ".cluster"))
    env_file = state / "env"
    if not env_file.is_file():
        pytest.fail(f"no cluster at {state}: run `make test-cluster` (or `make cluster-up`)")
    values = read_env(env_file)
    found = Cluster(
        state=state,
        storage=values["FCE_OPTUNA_STORAGE"],
        tracking_uri=values["FCE_TRACKING_URI"],
        slurm_conf=values["SLURM_CONF"],
        pg_admin=values["FCE_PG_ADMIN"],
    )
    status = subprocess.run(
        [str(CLUSTER_SH), "status"],
        capture_output=True,
        text=True,
        env={**os.environ, "FCE_CLUSTER_DIR": str(state)},
    ).stdout
    if "down" in status:
        pytest.fail(f"the cluster is not fully up:\n{status}run `make cluster-up`")
    return found


@pytest.fixture
def name() -> str:
    """A study and MLflow experiment name of this test alone (the servers are shared)."""
    return f"t-{uuid.uuid4().hex[:10]}"
