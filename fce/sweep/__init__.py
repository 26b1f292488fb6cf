"""Optuna studies whose trials are FCE runs, each a tracked child run of one parent run.

Optuna itself (5.x) drives the study; Hydra only composes each trial's config (the
hydra-optuna-sweeper plugin is not used: it pins optuna < 3 and cannot prune). Trials report
the objective at every evaluation so that a pruner can stop poor ones; the study lives in an
RDB storage (SQLite by default, PostgreSQL or MySQL to share it between machines), so rerunning
the command continues it and parallel workers, and parallel drivers, cooperate through it.
"""

from __future__ import annotations

import warnings

import optuna

# Heartbeats are "experimental" in Optuna 5 but are the documented way to fail dead trials.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# Trials are run with ask and tell (to count them under the study lock first) and beat with
# ``heartbeat``, as ``optimize`` would.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")

from fce.sweep.driver import SweepError, run_study  # noqa: E402
from fce.sweep.worker import run_worker  # noqa: E402

__all__ = ["SweepError", "run_study", "run_worker"]
