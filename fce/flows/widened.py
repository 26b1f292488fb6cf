"""A flow on a wider base: x = g(T z), z ~ N(0, I), i.e. the base N(0, T^2 I).

log q_T(x) = log N(u / T; 0, I) - d log T + log|det du/dx| with u = f(x) (change of
variables); at a sample, log q_T(g(T z)) = log N(z; 0, I) - d log T - log|det dg/dw| at
w = T z. T > 1 spreads the flow's samples beyond the data: a contrast for FCE's EBM
(``estimator.base_scale``) and a fixed noise for NCE that covers more of the plane.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from fce.flows.base import Flow


class WidenedFlow(Flow):
    """``flow`` (shared, not copied) on the base N(0, T^2 I). Differentiable in the flow's
    parameters when grad is enabled; uses the flow's own ``forward``/``inverse`` (a folded
    form need not expose the base point)."""

    def __init__(self, flow: Flow, scale: float) -> None:
        if not scale > 0:
            raise ValueError(f"WidenedFlow: scale={scale}: must be positive")
        super().__init__([], dim=flow.dim)
        self.flow = flow
        self.scale = float(scale)
        self.log_scale_total = flow.dim * math.log(self.scale)
        self.name = flow.name
        self.compile_pays = flow.compile_pays

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u, log_det = self.flow.forward(x)
        return u / self.scale, log_det - self.log_scale_total

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x, log_det = self.flow.inverse(z * self.scale)
        return x, log_det + self.log_scale_total

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The flow's own: a run whose model is a widened flow (NCE's noise) saves the flow as
        trained, which any run can then load as its ``estimator.noise_checkpoint``."""
        return self.flow.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        return self.flow.load_state_dict(state_dict, *args, **kwargs)
