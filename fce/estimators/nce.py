"""Noise contrastive estimation: FCE's value function with the noise model fixed.

References:
    Gutmann and Hyvärinen, "Noise-contrastive estimation: a new estimation principle for
    unnormalized statistical models", AISTATS 2010.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fce.estimators.base import Estimator, Players, StepOutput
from fce.flows import Flow, Gaussian
from fce.flows.widened import WidenedFlow
from fce.objective import ebm_ascent


class NCE(Estimator):
    """Only the EBM steps, against a noise model that never moves.

    Args:
        noise: ``gaussian``, a Gaussian with the training set's mean and covariance; or
            ``flow``, the players' flow, frozen.
        noise_checkpoint: where that flow was trained (a run's checkpoint or directory);
            the factory loads it into the players' flow before NCE is built
            (``fce.factory.load_noise_flow``). None: the flow as given (built in code).
        base_scale: T, the base of that flow widened to N(0, T^2 I) (``WidenedFlow``): a
            noise that covers more of the plane than the flow trained on the data.
    """

    name = "nce"
    makes_passes = True
    objective = "value"
    signals = ("value", "acc", "trained_ebm")
    panel_titles = ("Noise (fixed)", "EBM")

    def __init__(
        self,
        players: Players,
        noise: str,
        noise_checkpoint: str | None = None,
        base_scale: float = 1.0,
    ) -> None:
        super().__init__(players)
        self.flow = noise_model(players, noise, base_scale)
        if self.ebm.base == "noise":  # the energy on top of this noise (fce.ebm.EBM)
            self.ebm.attach_base(self.flow)
        self.opt_ebm = players.optimizers.for_ebm(self.ebm)
        self.optimizers = {"opt_ebm": self.opt_ebm}

    @classmethod
    def model_label(cls, settings: Any, flow: str) -> str:
        if settings.noise == "gaussian":
            return "nce-gaussian"
        widened = settings.get("base_scale", 1.0) != 1
        return f"nce-{flow}" + (f"-T{settings.base_scale:g}" if widened else "")

    def start(self, first_batch: Tensor) -> None:
        pass  # the noise is fixed: fitted or loaded as it is

    def step(self, x: Tensor, z: Tensor | None) -> StepOutput:
        assert z is not None
        value, accuracy = ebm_ascent(self.ebm, self.opt_ebm, self.frozen_flow(), x, z)
        return StepOutput({"value": value, "acc": accuracy}, self.ebm, trained_ebm=True)


def noise_model(players: Players, noise: str, base_scale: float = 1.0) -> Flow:
    """NCE's fixed noise: a Gaussian fitted to the training set, or the players' flow frozen
    (trained already when the factory loaded it from ``noise_checkpoint``), on its base
    widened by ``base_scale`` when that is not 1."""
    if noise == "gaussian":
        return Gaussian.fit(players.train_data)
    players.flow.requires_grad_(False)
    return players.flow if base_scale == 1 else WidenedFlow(players.flow, base_scale)
