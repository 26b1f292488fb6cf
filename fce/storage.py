"""The Optuna storage of a study shared by many workers (processes, machines, SLURM jobs).

Optuna's RDB storage as it is, plus what sharing one study through a database server needs:

- bounded connections: each process holds at most ``POOL_SIZE + POOL_OVERFLOW`` connections
  (the trial's thread, the heartbeat's, the study lock's), so a server's ``max_connections``
  caps workers predictably instead of failing with "too many connections";
- connections that survive the server: a pooled connection is pinged before use (servers and
  firewalls drop idle ones, PostgreSQL restarts drop all), and a new connection is retried for
  up to ``CONNECT_RETRY_S`` while the server comes back.

The study's total of trials and its one parent run hold across independent drivers through
the study lock of ``fce.sweep``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import optuna
import sqlalchemy

from fce.errors import first_line

log = logging.getLogger("fce.sweep")

POOL_SIZE = 1  # kept open between uses: the worker's main thread
# Opened when needed, closed after: the heartbeat's beat, and the study lock's connection
# (a PostgreSQL advisory lock is held by one connection while the trial is created).
POOL_OVERFLOW = 2
POOL_RECYCLE_S = 1800  # replace connections older than this, before idle timeouts drop them
CONNECT_RETRY_S = 60.0  # how long a new connection is retried while the server is down
APPLICATION_NAME = "fce-sweep"


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
            log.warning(
                "database unreachable (%s); retrying in %.1fs", first_line(error, 200), delay
            )
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


class StudyStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage with bounded connections that survive a server restart.

    Args:
        url: SQLAlchemy URL (``sqlite:///...``, ``postgresql+psycopg://...``, ``mysql+...``).
        **kwargs: passed to ``optuna.storages.RDBStorage`` (heartbeat settings).
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, engine_kwargs=engine_options(url), **kwargs)
        if not url.startswith("sqlite"):
            sqlalchemy.event.listen(self.engine, "do_connect", _retry_connect)
