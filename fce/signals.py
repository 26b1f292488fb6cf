"""The one recorder of SIGINT and SIGTERM: the handler notes the signal, the code acts on it at
a safe point (a run after its step, a study between trials). Torch-free, at the bottom of the
package: a study's driver installs it before any heavy import.
"""

from __future__ import annotations

import os
import signal
from typing import Any


class SignalRecorder:
    """The first SIGINT or SIGTERM, recorded by its handler (``record``); calling the
    instance returns its number, or None.

    ``install`` makes it the process's handler, with a wakeup fd: a signal that another
    handler took meanwhile (a run's own, installed while it trains, after its last look as
    it ended) is still seen by the next call.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._wakeup: int | None = None

    def record(self, signum: int, _frame: Any = None) -> None:
        if self.signum is None:
            self.signum = signum

    def install(self) -> SignalRecorder:
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._wakeup = read
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.record)
        return self

    def __call__(self) -> int | None:
        if self.signum is None and self._wakeup is not None:
            try:
                received = os.read(self._wakeup, 512)
            except BlockingIOError:
                received = b""
            stops = [s for s in received if s in (signal.SIGINT, signal.SIGTERM)]
            self.signum = stops[0] if stops else None
        return self.signum
