"""Maximum likelihood of the flow alone: the baseline for the flow FCE trains."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fce.estimators.base import Estimator, Players, StepOutput


class FlowMLE(Estimator):
    """Gradient descent on the flow's negative log-likelihood of each batch; no EBM."""

    name = "flow_mle"
    objective = "loss"
    objective_label = "loss (-log q)"
    signals = ("loss",)
    uses_noise = False
    evaluates_ebm = False  # the EBM is never trained: its numbers would mean nothing
    bounded_metrics = ("nll_flow",)
    score_metric = "nll_flow"
    panel_titles = ("Flow (MLE)", "EBM (not trained)")
    curves = ("loss", "nll_flow", "kl_data_flow")

    @classmethod
    def model_label(cls, settings: Any, flow: str) -> str:
        return f"mle-{flow}"

    def __init__(self, players: Players) -> None:
        super().__init__(players)
        self.opt_flow = players.optimizers.for_flow(self.flow)
        self.optimizers = {"opt_flow": self.opt_flow}

    def step(self, x: Tensor, z: Tensor | None) -> StepOutput:
        loss = -self.flow.log_prob(x).mean()
        self.opt_flow.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_flow.step()
        self._frozen = None
        return StepOutput({"loss": loss.detach()}, self.flow, trained_ebm=False)
