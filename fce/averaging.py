"""An exponential moving average of the EBM's weights, evaluated in place of the weights.

At a constant learning rate the game never settles: the EBM's weights keep chasing the flow
and its test KL oscillates by a few hundredths of a nat from one evaluation to the next. The
average of the recent weights is the model the run has converged to, and what evaluation
scores when ``train.ema_decay`` > 0 (Polyak and Juditsky 1992; the decay warm-up of
TensorFlow's ``ExponentialMovingAverage`` keeps the first updates from weighting the
initialisation).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """``model``'s weights averaged over its updates: avg <- d avg + (1 - d) w, with
    d = min(decay, (1 + n) / (10 + n)) at the n-th update."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.updates = 0
        self._source = list(model.parameters())
        self._target = list(self.model.parameters())

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average (after the model stepped)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._target, self._source, 1 - decay)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
