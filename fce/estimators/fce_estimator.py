"""Flow contrastive estimation: the EBM and the flow play the classifier's game in turns.

References:
    Gao et al., "Flow Contrastive Estimation of Energy-Based Models", arXiv:1912.00589.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fce.estimators.base import Estimator, Players, StepOutput
from fce.objective import fce_accuracy, fce_value


class FCE(Estimator):
    """Ascend V over the EBM (theta, c) or descend it over the flow, as the rule says.

    The game starts with the EBM; after each step the rule sees the batch accuracy and picks
    the next player (the reference: the flow iff accuracy > threshold).
    """

    name = "fce"
    objective = "value"
    signals = ("value", "acc", "trained_ebm")

    def __init__(self, players: Players, name: str) -> None:
        super().__init__(players, name)
        self.rule = players.rule
        self.opt_ebm = players.optimizers.for_ebm(self.ebm)
        self.opt_flow = players.optimizers.for_flow(self.flow)
        self.optimizers = {"opt_ebm": self.opt_ebm, "opt_flow": self.opt_flow}
        self.train_ebm_next = True

    def step(self, x: Tensor, z: Tensor | None) -> StepOutput:
        assert z is not None
        if self.train_ebm_next:
            value, accuracy = self.ebm_step(x, z)
        else:
            value, accuracy = self.flow_step(x, z)
        trained_ebm = self.train_ebm_next
        return StepOutput(
            {"value": value, "acc": accuracy},
            self.ebm if trained_ebm else self.flow,
            trained_ebm,
        )

    def ebm_step(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Gradient ascent on V over (theta, c); the flow is a fixed contrast here."""
        return ebm_ascent(self.ebm, self.opt_ebm, self.frozen_flow(), x, z)

    def flow_step(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Gradient descent on V over alpha, through the samples x~ = g(z) and log q."""
        with torch.no_grad():
            log_p_data = self.ebm(x)
        passes = self.flow.folded()  # Glow folds its weights once for both passes
        log_q_data = passes.log_prob(x)
        x_noise, log_q_noise = passes.transform_noise(z)
        # The EBM only passes gradients through to x~: no weight gradients are computed.
        self.ebm.requires_grad_(False)
        try:
            log_p_noise = self.ebm(x_noise)
        finally:
            self.ebm.requires_grad_(True)
        value = fce_value(log_p_data, log_q_data, log_p_noise, log_q_noise)
        self.opt_flow.zero_grad(set_to_none=True)
        value.backward()
        self.opt_flow.step()
        self._frozen = None
        return value.detach(), fce_accuracy(log_p_data, log_q_data, log_p_noise, log_q_noise)

    @torch.no_grad()
    def score(self, x: Tensor, z: Tensor) -> tuple[float, float]:
        """(V, accuracy) of the current models on data ``x`` and noise ``z``, no step taken."""
        x_noise, log_q_noise = self.flow.transform_noise(z)
        args = (self.ebm(x), self.flow.log_prob(x), self.ebm(x_noise), log_q_noise)
        return fce_value(*args).item(), fce_accuracy(*args).item()

    def observe(self, signals: dict[str, float]) -> None:
        self.train_ebm_next = not self.rule.train_flow_next(signals["acc"])

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule.state_dict(), "train_ebm_next": self.train_ebm_next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rule.load_state_dict(state["rule"])
        self.train_ebm_next = state["train_ebm_next"]


def ebm_ascent(
    ebm: torch.nn.Module, optimizer: torch.optim.Optimizer, noise_model: Any, x: Tensor, z: Tensor
) -> tuple[Tensor, Tensor]:
    """One step of gradient ascent on V over the EBM against a fixed noise model (FCE's EBM
    step, and NCE's only step); returns (V, accuracy) of the batch before the step."""
    log_q_data = noise_model.log_prob(x)
    x_noise, log_q_noise = noise_model.transform_noise(z)
    # Data and noise in one batch: one pass through the EBM instead of two.
    log_p_data, log_p_noise = ebm(torch.cat([x, x_noise])).split([x.shape[0], z.shape[0]])
    value = fce_value(log_p_data, log_q_data, log_p_noise, log_q_noise)
    optimizer.zero_grad(set_to_none=True)
    (-value).backward()
    optimizer.step()
    return value.detach(), fce_accuracy(log_p_data, log_q_data, log_p_noise, log_q_noise)
