"""Locks every process of a study shares: on its schema while a storage is opened, and on
the study while a trial is counted and created."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator

import optuna

from fce.filelock import sqlite_lock

log = logging.getLogger("fce.sweep")


# The lock file beside a SQLite storage (its own: not the tracking store's, which a sweep opens
# while it holds this one).
STUDY_LOCK = ".study-lock"


@contextlib.contextmanager
def schema_lock(url: str) -> Iterator[None]:
    """Held while a storage is opened (and its tables made, the first time): SQLite, the
    lock file beside it; PostgreSQL, a session advisory lock on a connection of its own."""
    if not url.startswith("postgresql"):
        with sqlite_lock(url, STUDY_LOCK):
            yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            key = int.from_bytes(hashlib.sha256(b"fce-schema").digest()[:8], "big", signed=True)
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, url: str, study_name: str) -> Iterator[None]:
    """Hold the study's lock, shared by every process that runs it (workers and drivers).

    Counting a study's trials and starting one, or finding and creating its parent run, is
    then one step: two drivers on one study neither overshoot ``n_trials`` nor make two
    parent runs. SQLite lives on one machine: a lock file beside it. PostgreSQL and MySQL:
    the server's advisory lock, held by one connection (released if the process dies).
    """
    if url.startswith("sqlite:///"):
        with sqlite_lock(url, STUDY_LOCK):
            yield
        return
    import sqlalchemy

    key = f"fce-study:{study_name}"
    dialect = storage.engine.dialect.name
    if dialect == "postgresql":
        number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
        take, give, args = "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)", number
    elif dialect in ("mysql", "mariadb"):
        take, give, args = "SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)", key[:64]
    else:
        log.warning("no study lock for %s storages: parallel drivers may overshoot", dialect)
        yield
        return
    with storage.engine.connect() as connection:
        connection.execute(sqlalchemy.text(take), {"k": args})
        try:
            yield
        finally:
            connection.execute(sqlalchemy.text(give), {"k": args})
