"""Noise contrastive estimation: FCE's value function with the noise model fixed.

References:
    Gutmann and Hyvärinen, "Noise-contrastive estimation: a new estimation principle for
    unnormalized statistical models", AISTATS 2010.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fce.estimators.base import Estimator, Players, StepOutput
from fce.estimators.fce_estimator import ebm_ascent
from fce.flows import Flow, Gaussian


class NCE(Estimator):
    """Only the EBM steps, against a noise model that never moves.

    Args:
        noise: ``gaussian``, a Gaussian with the training set's mean and covariance; or
            ``flow``, the players' flow, frozen.
        noise_checkpoint: where that flow was trained (a run's checkpoint or directory);
            the factory loads it into the players' flow before NCE is built
            (``fce.factory.load_noise_flow``). None: the flow as given (built in code).
    """

    name = "nce"
    objective = "value"
    signals = ("value", "acc", "trained_ebm")
    panel_titles = ("Noise (fixed)", "EBM")

    def __init__(
        self, players: Players, name: str, noise: str, noise_checkpoint: str | None = None
    ) -> None:
        super().__init__(players, name)
        self.flow = noise_model(players, noise)
        self.opt_ebm = players.optimizers.for_ebm(self.ebm)
        self.optimizers = {"opt_ebm": self.opt_ebm}

    @classmethod
    def model_label(cls, settings: Any, flow: str) -> str:
        return f"nce-{'gaussian' if settings.noise == 'gaussian' else flow}"

    def start(self, first_batch: Tensor) -> None:
        pass  # the noise is fixed: fitted or loaded as it is

    def step(self, x: Tensor, z: Tensor | None) -> StepOutput:
        assert z is not None
        value, accuracy = ebm_ascent(self.ebm, self.opt_ebm, self.frozen_flow(), x, z)
        return StepOutput({"value": value, "acc": accuracy}, self.ebm, trained_ebm=True)


def noise_model(players: Players, noise: str) -> Flow:
    """NCE's fixed noise: a Gaussian fitted to the training set, or the players' flow frozen
    (trained already when the factory loaded it from ``noise_checkpoint``)."""
    if noise == "gaussian":
        return Gaussian.fit(players.train_data)
    players.flow.requires_grad_(False)
    return players.flow
