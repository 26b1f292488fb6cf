"""Progress of a run on the terminal: a tqdm bar, or plain log lines, or nothing."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import TYPE_CHECKING

from fce.callbacks import Callback

if TYPE_CHECKING:
    from fce.trainer import Trainer

log = logging.getLogger("fce")


class Progress(Callback):
    """``mode``: bar, log, none, or auto (a bar on a terminal, log lines otherwise)."""

    def __init__(self, mode: str) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self.bar = None

    def on_start(self, trainer: Trainer) -> None:
        self.total = trainer.total_steps
        self.every = max(1, self.total // 20)
        self.last_time = time.perf_counter()
        self.last_step = trainer.step
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total, initial=trainer.step, unit="step", dynamic_ncols=True
            )

    def on_step(self, trainer: Trainer, signals: dict[str, float]) -> None:
        step = trainer.step
        # The estimator's own signals (FCE's value and acc, flow_mle's loss, mle's value and
        # log_z), in its order; which model stepped is no news on a terminal.
        shown = {n: signals[n] for n in trainer.estimator.signals if n != "trained_ebm"}
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0:
                self.bar.set_postfix({n: f"{v:.4f}" for n, v in shown.items()}, refresh=False)
        elif self.mode == "log" and (step % self.every == 0 or step == self.total):
            now = time.perf_counter()
            rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else math.inf
            text = "  ".join(f"{n} {v:.4f}" for n, v in shown.items())
            log.info("step %d/%d  %s  %.0f steps/s  eta %.0fs", step, self.total, text, rate, eta)
            self.last_time, self.last_step = now, step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
