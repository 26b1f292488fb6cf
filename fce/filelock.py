"""The one file lock of the package: an exclusive lock among the processes of this machine.

Low in the layers (no fce imports), so that the tracking layer (first contact with a SQLite
MLflow store) and the sweep layer (a SQLite Optuna storage) take their locks the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``path`` (made, with its folder, where missing); waits for it.

    The kernel drops the lock when the process dies, so a crash leaves none behind. Not
    re-entrant: each ``open`` is a lock of its own, so a process that already holds one on
    ``path`` waits for ever; locks of different purposes take different files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def sqlite_lock(url: str, suffix: str) -> Iterator[None]:
    """``file_lock`` on the file ``<database><suffix>`` beside a ``sqlite:///`` database; a
    no-op for any other URL (a database server orders its own clients)."""
    if not url.startswith("sqlite:///"):
        yield
        return
    with file_lock(url.removeprefix("sqlite:///") + suffix):
        yield
