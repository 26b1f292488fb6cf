"""A flow's no-grad passes fused by ``torch.compile``, and when fusing them pays.

FCE's EBM step and NCE's step against a flow score the data batch and draw the noise batch
through a flow that is not being trained. The spline flow's passes are dozens of small
elementwise operations (its bin search, gathers and rational-quadratic formulas) whose cost is
their dispatch; compiled into a few fused kernels they take less than half the time (about
4.4 against 1.9 ms at the truth recipe's batch, one thread; docs/performance.md). Compiling costs
seconds to tens of seconds per process (less with inductor's cache warm: it lives in
``$TORCHINDUCTOR_CACHE_DIR``, by default one per user under the system's temp directory, so a
sweep's workers on one machine share it; on a cluster, point it at a shared directory).

``FusedPasses`` compiles the live flow's passes once: the parameters are the graph's inputs,
updated in place by the flow's optimizer, so a flow step does not compile again. Where the
compiler fails (no C++ compiler, an unsupported operation) it says so in one log line and runs
the passes eager from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fce.flows.base import Flow

log = logging.getLogger(__name__)

# ``train.compile=auto`` compiles only runs at least this long, and only flows whose
# ``compile_pays``: the spline's frozen passes save about 2.5 ms a step (4.4 -> 1.9 ms, one
# thread) and compiling them took about 35 s wall with inductor's cache cold and 5 s with it
# warm (benchmarks/results/speed_truth_compiled_*.json), so a run of 15,000 steps gains even
# on a machine that has never compiled them.
AUTO_MIN_STEPS = 15_000


def should_compile(mode: bool | str, flow: Flow, total_steps: int, makes_passes: bool) -> bool:
    """Whether ``train.compile=mode`` fuses the frozen passes of ``flow`` for a run of
    ``total_steps`` whose estimator makes them (``makes_passes``)."""
    if mode == "auto":
        return makes_passes and flow.compile_pays and total_steps >= AUTO_MIN_STEPS
    return bool(mode) and makes_passes


class FusedPasses:
    """``log_prob`` and ``transform_noise`` of ``flow`` under ``torch.no_grad``, compiled.

    Args:
        flow: the flow whose passes are fused; its parameters are read as they are at each
            call (a fused pass is never stale, unlike ``FrozenFlow``'s snapshot).
        backend: ``torch.compile``'s backend (tests pass one that fails).
    """

    def __init__(self, flow: Flow, backend: str | Callable[..., Any] = "inductor") -> None:
        self.flow = flow
        options = {"backend": backend, "dynamic": False, "fullgraph": True}
        self._compiled = {
            name: torch.compile(getattr(flow, name), **options)
            for name in ("log_prob", "transform_noise")
        }
        self.fallback: str | None = None  # why the passes run eager, once they do

    def _call(self, name: str, x: Tensor) -> Any:
        with torch.no_grad():
            if self.fallback is None:
                try:
                    return self._compiled[name](x)
                except Exception as error:  # the compiler's, whatever it is: eager decides
                    self.fallback = first_line(error)
                    log.warning(
                        "train.compile: the %s flow's passes could not be compiled (%s); "
                        "running them eager",
                        self.flow.name,
                        self.fallback[:200],
                    )
            return getattr(self.flow, name)(x)

    def log_prob(self, x: Tensor) -> Tensor:
        return self._call("log_prob", x)

    def transform_noise(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._call("transform_noise", z)


def first_line(error: BaseException) -> str:
    """The compiler's error in one line: the backend's own exception where torch wraps it."""
    cause = getattr(error, "inner_exception", None) or error.__cause__ or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"
