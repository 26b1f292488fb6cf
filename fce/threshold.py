"""Alternation rules: after each step, decide whether the next step trains the flow or the EBM.

FCE trains the EBM while the classifier is weak and the flow once it is strong enough
(accuracy above a threshold), keeping the game near equilibrium. The values come from
conf/threshold/ and are range-checked by ``fce.config.validate``.
"""

from __future__ import annotations

from typing import Any


class FixedThreshold:
    """The reference rule: train the flow next iff this batch's accuracy > ``value``.

    Args:
        value: the threshold, in (0, 1).
    """

    name = "fixed"

    def __init__(self, *, value: float) -> None:
        self.value = value

    def train_flow_next(self, accuracy: float) -> bool:
        return accuracy > self.value

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class EMAThreshold(FixedThreshold):
    """Compare an exponential moving average of the accuracy with ``value``.

    The per-batch accuracy of 2,000 points has a standard deviation of about 0.011 near 0.6,
    so the fixed rule flips on noise. The EMA with ``decay`` d averages about (1+d)/(1-d)
    batches (19 at d = 0.9), which cuts that noise by about 4x and makes the flow and EBM take
    runs of steps instead of flickering. It starts at the first observed accuracy.
    """

    name = "ema"

    def __init__(self, *, value: float, decay: float) -> None:
        super().__init__(value=value)
        self.decay = decay
        self.average: float | None = None

    def train_flow_next(self, accuracy: float) -> bool:
        if self.average is None:
            self.average = accuracy
        else:
            self.average = self.decay * self.average + (1 - self.decay) * accuracy
        return self.average > self.value

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average = state["average"]
