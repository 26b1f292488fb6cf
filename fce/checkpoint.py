"""Checkpoints written atomically and found again: a crash never leaves a half-written file.

Files are ``<dir>/step_<N>.pt``; each is written to a temporary file in the same directory,
flushed to disk, then renamed over its final name (atomic on POSIX). The two newest are kept,
so that if the newest is unreadable the one before it is still there. A temporary file left by
a writer killed mid-save is removed by the next save.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from fce.errors import first_line

FORMAT = "fce-checkpoint/1"
KEEP = 2
_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not an FCE checkpoint."""


def save(state: dict[str, Any], directory: Path, step: int) -> Path:
    """Write ``state`` as ``directory/step_<step>.pt`` atomically; prune to the newest KEEP."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:07d}.pt"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".step_", suffix=".pt.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in list_checkpoints(directory)[:-KEEP]:
        old.unlink(missing_ok=True)
    # A writer killed with SIGKILL mid-save leaves its temporary file; one process writes a
    # run's checkpoints, so any other temporary file here is such a leftover.
    for leftover in directory.glob(".step_*.pt.tmp"):
        leftover.unlink(missing_ok=True)
    return path


def check_writable(directory: Path) -> None:
    """Fail now, not at the first save minutes into a run, when ``directory`` cannot hold
    checkpoints (it is a file, on a read-only or full file system, not ours)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, prefix=".step_probe_"):
            pass
    except OSError as error:
        reason = "a file, not a directory" if directory.is_file() else error.strerror or error
        raise CheckpointError(f"{directory}: cannot write checkpoints there ({reason})") from None


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


# The last checkpoint read, by (path, inode, size, mtime): a resume reads its file once, though the
# command line's check (its saved settings) and the run (its state) both ask for it.
_last: tuple[tuple[str, int, int, int], dict[str, Any]] | None = None


def load(path: Path) -> dict[str, Any]:
    """Read one checkpoint file; ``CheckpointError`` if it is unreadable or foreign. Each
    caller gets its own copy (an optimizer's loaded state may alias the tensors it is given,
    and then moves them)."""
    global _last
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if _last is None or _last[0] != key:
        _last = (key, _read(path))
    return copy.deepcopy(_last[1])


def _read(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, not a torch file, unpickling refused...
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(error)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an FCE checkpoint (expected format {FORMAT})")
    return state


def resolve(target: Path) -> tuple[Path, dict[str, Any], list[str]]:
    """The checkpoint to resume from ``target`` (a file, a run directory or its checkpoints/).

    For a directory, the newest readable checkpoint wins; unreadable newer ones are skipped
    and reported in the returned warnings.
    """
    if target.is_file():
        return target, load(target), []
    if not target.is_dir():
        raise CheckpointError(f"{target}: no such checkpoint file or run directory")
    directory = target / "checkpoints" if (target / "checkpoints").is_dir() else target
    candidates = list_checkpoints(directory)
    if not candidates:
        raise CheckpointError(f"{target}: no checkpoint (step_*.pt) in {directory}")
    warnings: list[str] = []
    for path in reversed(candidates):
        try:
            return path, load(path), warnings
        except CheckpointError as error:
            warnings.append(f"skipped unreadable checkpoint {error}")
    raise CheckpointError(f"{target}: every checkpoint in {directory} is unreadable")
