"""Bad input and failures as one line: the error type, the exit codes and the one helper that
makes a message of an exception.

Pure Python, at the bottom of the package: every layer may raise ``ConfigError`` or report
``first_line(error)``, and the edges turn them into ``error: ...`` and an exit code.
"""

from __future__ import annotations

import sys
from typing import NoReturn

EXIT_FAILED = 1  # a run that diverged or failed mid-run, a grid or study with failed jobs
EXIT_BAD_INPUT = 2


class ConfigError(ValueError):
    """Bad user input, reported as one line that names the key and what is allowed."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception as one line: its first non-empty line, at most ``limit`` characters.

    MLflow and SQLAlchemy append SQL and parameters below the message, SQLAlchemy may put a
    line of its own above it, torch appends advice: the first line names what went wrong.
    """
    lines = [
        line.strip()
        for line in str(error).splitlines()
        if line.strip() and not line.startswith("(raised as a result of")
    ]
    return (lines or [type(error).__name__])[0][:limit]


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """``error: <message>`` on stderr, then exit with ``code``."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
