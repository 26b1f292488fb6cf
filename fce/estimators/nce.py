"""Noise contrastive estimation: FCE's value function with the noise model fixed.

References:
    Gutmann and Hyvärinen, "Noise-contrastive estimation: a new estimation principle for
    unnormalized statistical models", AISTATS 2010.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from fce import checkpoint
from fce.config import INTERNAL_KEYS, ConfigError, upgrade
from fce.estimators.base import Estimator, Players, StepOutput
from fce.estimators.fce_estimator import ebm_ascent
from fce.flows import Flow, Gaussian


class NCE(Estimator):
    """Only the EBM steps, against a noise model that never moves.

    Args:
        noise: ``gaussian``, a Gaussian with the training set's mean and covariance; or
            ``flow``, the players' flow, frozen: loaded from ``noise_checkpoint`` (a run's
            checkpoint or directory, whose flow must be the run's ``flow`` group's), or as
            given when there is none (a noise model built in code).
    """

    name = "nce"
    objective = "value"
    signals = ("value", "acc", "trained_ebm")
    panel_titles = ("Noise (fixed)", "EBM")

    def __init__(
        self, players: Players, name: str, noise: str, noise_checkpoint: str | None
    ) -> None:
        super().__init__(players, name)
        self.flow = noise_model(players, noise, noise_checkpoint)
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


def noise_model(players: Players, noise: str, noise_checkpoint: str | None) -> Flow:
    """NCE's fixed noise: a fitted Gaussian, or a trained flow loaded and frozen."""
    if noise == "gaussian":
        return Gaussian.fit(players.train_data)
    flow = players.flow
    flow.requires_grad_(False)
    if noise_checkpoint is None:
        return flow
    where = f"estimator.noise_checkpoint={noise_checkpoint}"
    try:
        _, state, _ = checkpoint.resolve(Path(str(noise_checkpoint)).expanduser())
    except checkpoint.CheckpointError as error:
        raise ConfigError(f"{where}: {error}") from None
    saved_flow = _settings(upgrade_flow(state["config"]))
    mine = _settings(players.flow_config)
    if saved_flow != mine:
        raise ConfigError(
            f"{where}: its flow is {saved_flow}, this run's flow={mine}; "
            "choose the same flow group and sizes"
        )
    flow.load_state_dict(state["trainer"]["flow"])
    return flow


def upgrade_flow(saved_config: dict[str, Any]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(upgrade(OmegaConf.create(saved_config)).flow)


def _settings(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k not in INTERNAL_KEYS}
