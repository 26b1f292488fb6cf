"""The Optuna storage of a study shared by many workers (processes, machines, SLURM jobs).

Optuna's RDB storage as it is, plus what sharing one study through a database server needs:

- bounded connections: each process holds at most ``POOL_SIZE + POOL_OVERFLOW`` connections
  (the trial's thread and the heartbeat's), so a server's ``max_connections`` caps workers
  predictably instead of failing with "too many connections";
- connections that survive the server: a pooled connection is pinged before use (servers and
  firewalls drop idle ones, PostgreSQL restarts drop all), and a new connection is retried for
  up to ``CONNECT_RETRY_S`` while the server comes back;
- a total that holds across independent drivers: no trial is created past ``max_trials``,
  checked in the transaction that creates it, under the lock Optuna takes on the study's row;
- one value per study for "the first one sets it" attributes (the MLflow parent run).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import optuna
import sqlalchemy
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session

log = logging.getLogger("fce.sweep")

POOL_SIZE = 1  # kept open between uses: the worker's main thread
POOL_OVERFLOW = 1  # opened when needed, closed after: the heartbeat's beat during a write
POOL_RECYCLE_S = 1800  # replace connections older than this, before idle timeouts drop them
CONNECT_RETRY_S = 60.0  # how long a new connection is retried while the server is down
APPLICATION_NAME = "fce-sweep"

# The cap below hooks into this Optuna internal; fail at import, not silently, if it moves.
if not hasattr(optuna.storages.RDBStorage, "_get_prepared_new_trial"):
    raise ImportError(f"optuna {optuna.__version__}: RDBStorage._get_prepared_new_trial is gone")


class StudyFull(Exception):
    """The study has its total of trials: the worker that wanted another one stops."""


def engine_options(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options for a storage URL."""
    if url.startswith("sqlite"):
        # One file, local processes: wait for the write lock rather than fail.
        return {"connect_args": {"timeout": 60}}
    options: dict[str, Any] = {
        "pool_size": POOL_SIZE,
        "max_overflow": POOL_OVERFLOW,
        "pool_pre_ping": True,
        "pool_recycle": POOL_RECYCLE_S,
        "pool_timeout": CONNECT_RETRY_S,
    }
    if url.startswith("postgresql"):
        # Names the sweep's connections in pg_stat_activity, for whoever counts them.
        options["connect_args"] = {"application_name": APPLICATION_NAME}
    return options


def _retry_connect(dialect: Any, _record: Any, cargs: tuple, cparams: dict) -> Any:
    """A new connection, retried with a bound while the server restarts."""
    deadline = time.monotonic() + CONNECT_RETRY_S
    delay = 0.5
    while True:
        try:
            return dialect.connect(*cargs, **cparams)
        except dialect.loaded_dbapi.OperationalError as error:
            if time.monotonic() + delay > deadline:
                raise
            reason = (str(error).strip().splitlines() or ["?"])[0][:200]
            log.warning("database unreachable (%s); retrying in %.1fs", reason, delay)
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


class StudyStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage with bounded, resilient connections and a cap on trials.

    Args:
        url: SQLAlchemy URL (``sqlite:///...``, ``postgresql+psycopg://...``, ``mysql+...``).
        max_trials: no trial is created once the study holds this many (any state).
        **kwargs: passed to ``optuna.storages.RDBStorage`` (heartbeat settings).
    """

    def __init__(self, url: str, max_trials: int | None = None, **kwargs: Any) -> None:
        self.max_trials = max_trials
        super().__init__(url, engine_kwargs=engine_options(url), **kwargs)
        if not url.startswith("sqlite"):
            sqlalchemy.event.listen(self.engine, "do_connect", _retry_connect)

    def _get_prepared_new_trial(self, study_id: int, template_trial: Any, session: Any) -> Any:
        # Runs inside Optuna's trial-creating transaction, after it locked the study's row
        # (SELECT ... FOR UPDATE; SQLite serialises writers): two workers cannot both take
        # the last slot.
        if self.max_trials is not None:
            count = (
                session.query(sqlalchemy.func.count(models.TrialModel.trial_id))
                .filter(models.TrialModel.study_id == study_id)
                .scalar()
            )
            if count >= self.max_trials:
                raise StudyFull(f"the study has its {self.max_trials} trials")
        return super()._get_prepared_new_trial(study_id, template_trial, session)

    def claim_study_user_attr(self, study_id: int, key: str, make: Callable[[], Any]) -> Any:
        """The study's user attribute ``key``: read it, or set it to ``make()`` if absent.

        Under a write lock on the study's row, so among workers starting at once exactly one
        calls ``make`` and all get its value.
        """
        with _create_scoped_session(self.scoped_session) as session:
            # A no-op UPDATE takes the row's write lock on every backend (SQLite: the file's).
            session.execute(
                sqlalchemy.update(models.StudyModel)
                .where(models.StudyModel.study_id == study_id)
                .values(study_name=models.StudyModel.study_name)
            )
            study = models.StudyModel.find_or_raise_by_id(study_id, session)
            found = models.StudyUserAttributeModel.find_by_study_and_key(study, key, session)
            if found is not None:
                return json.loads(found.value_json)
            value = make()
            session.add(
                models.StudyUserAttributeModel(
                    study_id=study_id, key=key, value_json=json.dumps(value)
                )
            )
            return value
