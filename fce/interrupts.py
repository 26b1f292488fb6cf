"""SIGINT and SIGTERM: noted at once, acted on at a safe point; and processes whose parent died.

Raising from the signal handler itself could land inside an MLflow/SQLite/Optuna write and
leave a store locked, a trial RUNNING or a run without its status; so the handler only records
the signal (``SignalRecorder``): a run's ``StopOnSignal`` callback raises ``RunInterrupted``
after the step, a study's driver and workers look between trials and at every evaluation.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from fce.callbacks import Callback
from fce.signals import SignalRecorder

if TYPE_CHECKING:
    from fce.trainer import Trainer


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; carries the exit code the shell expects (130 or 143).

    A KeyboardInterrupt, so that callers treating Ctrl-C specially (Optuna marks the trial
    FAIL and stops the study) treat SIGTERM the same way.
    """

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


class StopOnSignal(SignalRecorder, Callback):
    """A run's recorder: raises ``RunInterrupted`` at the step boundary after a signal."""

    def check(self) -> None:
        if self() is not None:
            raise RunInterrupted(128 + self.signum)

    def on_step(self, trainer: Trainer, signals: dict[str, float]) -> None:
        self.check()


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[StopOnSignal]:
    """While inside, SIGINT/SIGTERM are noted, not raised (main thread only: elsewhere
    signals never arrive)."""
    stop = StopOnSignal()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    previous = {sig: signal.signal(sig, stop.record) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


_watching = False
running = threading.Event()  # set while this process trains a run (fce.cli.run_job)


def when_orphaned(act: Callable[[], None], interval_s: float = 1.0) -> None:
    """Call ``act`` once, from a daemon thread, when the process that started this one has
    died (SIGKILL, the out-of-memory killer, a lost session): an orphan is adopted by another
    process, so its parent's pid changes. Polled: no signal tells a child its parent died.
    One watcher a process; later calls are ignored."""
    global _watching
    if _watching:
        return
    _watching = True
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        act()

    threading.Thread(target=watch, name="when-orphaned", daemon=True).start()


def stop_when_orphaned(interval_s: float = 1.0, grace_s: float = 60.0) -> None:
    """In a worker process of a multirun (joblib's loky workers): when the process that
    launched the grid dies, stop too, instead of training on and then idling for ever. The
    run in progress gets SIGTERM (it stops at its next step boundary: a checkpoint, KILLED);
    the process exits once it has, or after ``grace_s`` at the latest."""

    def stop() -> None:
        if running.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while running.is_set() and time.monotonic() < deadline:
            time.sleep(0.2)
        os._exit(128 + signal.SIGTERM)

    when_orphaned(stop, interval_s)


def sigterm_when_orphaned(interval_s: float = 2.0) -> None:
    """A sweep worker whose driver died: SIGTERM to itself, which its handler turns into the
    worker's own orderly stop (the trial in progress failed, its run KILLED)."""
    when_orphaned(lambda: os.kill(os.getpid(), signal.SIGTERM), interval_s)
