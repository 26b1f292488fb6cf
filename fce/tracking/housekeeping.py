"""Housekeeping of MLflow stores: a lock for first contact with SQLite, what a SQLite file
holds, and the liveness of the processes behind RUNNING runs (so a run whose process died is
marked KILLED, not left RUNNING).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
from pathlib import Path
from typing import Any

from fce.filelock import sqlite_lock

# Tables every MLflow store has (an Optuna storage has neither).
MLFLOW_TABLES = frozenset({"experiments", "runs"})


def store_lock(uri: str) -> contextlib.AbstractContextManager[None]:
    """Serialise first contact with a SQLite store across processes.

    The first client of a new SQLite file creates MLflow's tables; two processes doing it at
    once (a parallel grid, sweep workers) fail with "table already exists". Other stores
    handle their own concurrency. Its lock file is its own: a sweep may hold its study's lock
    while it opens the store.
    """
    return sqlite_lock(uri, ".lock")


def sqlite_tables(path: Path) -> set[str] | None:
    """The tables of the SQLite file ``path``, read without writing; None when the file is
    not a SQLite database (or cannot be read now)."""
    uri = f"{Path(path).absolute().as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as connection:
            rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            return {row[0] for row in rows}
    except sqlite3.Error:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, from Linux's /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def process_identity() -> dict[str, str]:
    """Run tags that let a later process tell whether this one is still alive."""
    stat = _proc_stat(os.getpid())
    return {
        "fce.host": socket.gethostname(),
        "fce.pid": str(os.getpid()),
        "fce.pid_start": stat[1] if stat else "",
    }


def process_gone(pid: int, started: str) -> bool:
    """True when ``pid`` has exited (a zombie counts) or now names another process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    stat = _proc_stat(pid)
    if stat is None:
        return False  # no /proc here: trust the signal check
    state, start = stat
    return state == "Z" or (bool(started) and start != started)


def reconcile_dead_runs(client: Any) -> list[str]:
    """Mark KILLED the RUNNING runs of this host, in every experiment of the store, whose
    process is gone; return their ids.

    A run killed with SIGKILL (or by the out-of-memory killer, or a lost node) never ends its
    MLflow run; without this it would stay RUNNING for ever. Only runs of this host can be
    checked: a pid means nothing elsewhere.
    """
    host = socket.gethostname()
    experiment_ids = [e.experiment_id for e in _all_pages(client.search_experiments)]
    if not experiment_ids:
        return []
    found = _all_pages(
        client.search_runs,
        experiment_ids,
        filter_string=f"attributes.status = 'RUNNING' and tags.`fce.host` = '{host}'",
    )
    ended = []
    for run in found:
        pid, started = run.data.tags.get("fce.pid"), run.data.tags.get("fce.pid_start", "")
        if not pid or not pid.isdigit() or int(pid) == os.getpid():
            continue
        if not process_gone(int(pid), started):
            continue
        now = client.get_run(run.info.run_id)  # a resume may have taken it over meanwhile
        if now.info.status != "RUNNING" or now.data.tags.get("fce.pid") != pid:
            continue
        client.set_tag(run.info.run_id, "fce.ended_by", f"process {pid} gone; reconciled")
        client.set_terminated(run.info.run_id, status="KILLED")
        ended.append(run.info.run_id)
    return ended


def _all_pages(search: Any, *args: Any, **kwargs: Any) -> list[Any]:
    """Every result of an MLflow ``search_*`` call, page by page."""
    found, token = [], None
    while True:
        page = search(*args, max_results=1000, page_token=token, **kwargs)
        found.extend(page)
        token = page.token
        if not token:
            return found
