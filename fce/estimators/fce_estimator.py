"""Flow contrastive estimation: the EBM and the flow play the classifier's game in turns.

The defaults are the paper's: the EBM is contrasted against the flow itself, the flow
descends the value V, and the threshold group's rule picks each step's player. Options
(docs/method.md): what the EBM is contrasted against (``contrast``, ``base_scale``,
``mixture_weight``; ``fce.contrast``), what the flow's step optimises (``flow_objective``,
``nll_weight``) and who moves when (``updates``).

References:
    Gao et al., "Flow Contrastive Estimation of Energy-Based Models", arXiv:1912.00589.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fce.contrast import CONTRASTS, make_contrast
from fce.estimators.base import Estimator, Players, StepOutput
from fce.flows import Gaussian
from fce.flows.base import NoGradPasses
from fce.objective import ebm_ascent, fce_accuracy, fce_value

FLOW_OBJECTIVES = ("value", "nll")
UPDATES = ("alternate", "simultaneous", "controlled")
# The controller's bound on the flow's learning-rate factor, either way: it can slow the flow
# to a hundredth of its rate or speed it up a hundredfold, no further (a bound keeps a long
# stretch on one side of the target from winding the factor up without limit).
CONTROLLER_MAX_FACTOR = 100.0


class FCE(Estimator):
    """Ascend V over the EBM (theta, c) or descend it over the flow, as the rule says.

    The game starts with the EBM; after each step the rule sees the batch accuracy and picks
    the next player (the reference: the flow iff accuracy > threshold).

    Args (each default is the paper's, and computes exactly what FCE computed before them):
        contrast: what the EBM's classifier tells the data from: ``flow`` (the paper's),
            ``mixture`` (``mixture_weight`` w of the flow, 1 - w of the Gaussian fitted to
            the training set), ``gaussian`` (that Gaussian alone: NCE's noise, with the
            flow trained beside it).
        base_scale: T, the flow's base N(0, T^2 I) inside the contrast (1: the flow itself);
            the flow that is evaluated and trained by NLL keeps its N(0, I) base.
        mixture_weight: w in (0, 1), the flow's share of ``contrast=mixture``.
        flow_objective: ``value``: the flow descends V + ``nll_weight`` * NLL, V computed with
            the contrast's log-density and samples as functions of the flow's parameters (the
            paper's game, played through the contrast); ``nll``: the flow descends its
            negative log-likelihood of the batch alone (maximum likelihood, the contrast
            trails it).
        nll_weight: lambda >= 0 of ``flow_objective=value``.
        updates: ``alternate`` (the ``threshold`` group's rule picks each step's player: the
            paper's); ``simultaneous`` (each step moves the EBM, then the flow, on the same
            batch and noise); ``controlled`` (as simultaneous, with the flow's learning rate
            times a factor e^s, s += controller_gain * (accuracy - accuracy_target) after
            each step, within a factor of ``CONTROLLER_MAX_FACTOR`` either way).
        accuracy_target, controller_gain: the controller's (``updates=controlled``).
    """

    name = "fce"
    uses_rule = True
    makes_passes = True
    objective = "value"
    signals = ("value", "acc", "trained_ebm")

    def __init__(
        self,
        players: Players,
        contrast: str = "flow",
        base_scale: float = 1.0,
        mixture_weight: float = 0.5,
        flow_objective: str = "value",
        nll_weight: float = 0.0,
        updates: str = "alternate",
        accuracy_target: float = 0.6,
        controller_gain: float = 0.01,
    ) -> None:
        super().__init__(players)
        for key, value, allowed in (
            ("contrast", contrast, CONTRASTS),
            ("flow_objective", flow_objective, FLOW_OBJECTIVES),
            ("updates", updates, UPDATES),
        ):
            if value not in allowed:
                raise ValueError(f"{key}={value!r}: unknown; choose one of: {', '.join(allowed)}")
        if contrast == "gaussian" and flow_objective == "value":
            raise ValueError("contrast=gaussian: V is constant in the flow; flow_objective=nll")
        self.rule = players.rule
        self.opt_ebm = players.optimizers.for_ebm(self.ebm)
        self.opt_flow = players.optimizers.for_flow(self.flow)
        self.optimizers = {"opt_ebm": self.opt_ebm, "opt_flow": self.opt_flow}
        self.train_ebm_next = True
        self.contrast = contrast
        self.base_scale = float(base_scale)
        self.mixture_weight = float(mixture_weight)
        self.flow_objective = flow_objective
        self.nll_weight = float(nll_weight)
        self.updates = updates
        self.accuracy_target = float(accuracy_target)
        self.controller_gain = float(controller_gain)
        self.log_lr_factor = 0.0  # s of updates=controlled
        # The paper's game (today's code path, bit for bit) or one of the options.
        self.contrast_is_flow = contrast == "flow" and self.base_scale == 1.0
        # Fitted from the training set as NCE's noise is (no random numbers drawn).
        self.gaussian = (
            Gaussian.fit(players.train_data).to(next(self.flow.parameters()).device)
            if contrast != "flow"
            else None
        )
        self._frozen_contrast: tuple[object, Any] | None = None
        # What a step of both moves (its parameters' norm is checked for a divergence).
        self._both = torch.nn.ModuleDict({"ebm": self.ebm, "flow": self.flow})
        if updates != "alternate":
            extra = ("flow_loss", "flow_lr_factor") if updates == "controlled" else ("flow_loss",)
            self.signals = (*type(self).signals, *extra)

    def step(self, x: Tensor, z: Tensor | None) -> StepOutput:
        assert z is not None
        if self.updates != "alternate":
            return self.both_step(x, z)
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

    def both_step(self, x: Tensor, z: Tensor) -> StepOutput:
        """``updates=simultaneous`` or ``controlled``: the EBM's step, then the flow's, on the
        same batch and noise; the signals are the EBM step's V and accuracy (before it) and
        the flow step's loss."""
        value, accuracy = self.ebm_step(x, z)
        signals = {"value": value, "acc": accuracy}
        if self.updates == "controlled":
            factor = math.exp(self.log_lr_factor)
            rates = [group["lr"] for group in self.opt_flow.param_groups]
            # The factor scales the rate of this step only: a schedule keeps setting the base.
            for group in self.opt_flow.param_groups:
                group["lr"] = group["lr"] * factor
            try:
                signals["flow_loss"] = self.flow_update(x, z)
            finally:
                for group, rate in zip(self.opt_flow.param_groups, rates, strict=True):
                    group["lr"] = rate
            signals["flow_lr_factor"] = value.new_tensor(factor)
        else:
            signals["flow_loss"] = self.flow_update(x, z)
        return StepOutput(signals, self._both, trained_ebm=True, trained_flow=True)

    def flow_update(self, x: Tensor, z: Tensor) -> Tensor:
        """One step of the flow by ``flow_objective``; its loss."""
        if self.flow_objective == "nll":
            return self.nll_step(x)
        value, _ = self.flow_step(x, z)
        return value

    def nll_step(self, x: Tensor) -> Tensor:
        """Gradient descent on the flow's -mean log q(x) of the batch (its own N(0, I) base)."""
        loss = -self.flow.log_prob(x).mean()
        self.opt_flow.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_flow.step()
        self._frozen = None
        return loss.detach()

    def frozen_contrast(self) -> Any:
        """The contrast as the EBM's step sees it: fixed, gradient-free, remade only when the
        flow has moved."""
        frozen = self.frozen_flow()
        if self.contrast_is_flow:
            return frozen
        if self._frozen_contrast is None or self._frozen_contrast[0] is not frozen:
            contrast = make_contrast(
                self.contrast,
                frozen,
                self.flow,
                self.base_scale,
                self.gaussian,
                self.mixture_weight,
            )
            self._frozen_contrast = (frozen, NoGradPasses(contrast))
        return self._frozen_contrast[1]

    def ebm_step(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Gradient ascent on V over (theta, c); the contrast is fixed here."""
        return ebm_ascent(self.ebm, self.opt_ebm, self.frozen_contrast(), x, z)

    def flow_step(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Gradient descent on V (+ lambda NLL) over alpha, through the samples x~ and log q
        of the contrast (the flow itself by default); with ``flow_objective=nll``, one step on
        the NLL alone, and V and the accuracy of the models after it."""
        if self.flow_objective == "nll":
            self.nll_step(x)
            with torch.no_grad():
                contrast = self.frozen_contrast()
                log_q_data = contrast.log_prob(x)
                x_noise, log_q_noise = contrast.transform_noise(z)
                args = (self.ebm(x), log_q_data, self.ebm(x_noise), log_q_noise)
                return fce_value(*args), fce_accuracy(*args)
        with torch.no_grad():
            log_p_data = self.ebm(x)
        passes = self.flow.folded()  # Glow folds its weights once for both passes
        if not self.contrast_is_flow:
            passes = make_contrast(
                self.contrast, passes, self.flow, self.base_scale, self.gaussian,
                self.mixture_weight,
            )  # fmt: skip
        log_q_data = passes.log_prob(x)
        x_noise, log_q_noise = passes.transform_noise(z)
        # The EBM only passes gradients through to x~: no weight gradients are computed.
        self.ebm.requires_grad_(False)
        try:
            log_p_noise = self.ebm(x_noise)
        finally:
            self.ebm.requires_grad_(True)
        value = fce_value(log_p_data, log_q_data, log_p_noise, log_q_noise)
        loss = value
        if self.nll_weight > 0:
            # The flow's own likelihood (N(0, I) base), whatever the contrast.
            log_q_flow = log_q_data if self.contrast_is_flow else self.flow.log_prob(x)
            loss = value - self.nll_weight * log_q_flow.mean()
        self.opt_flow.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_flow.step()
        self._frozen = None
        return value.detach(), fce_accuracy(log_p_data, log_q_data, log_p_noise, log_q_noise)

    def observe(self, signals: dict[str, float]) -> None:
        if self.updates == "controlled":
            bound = math.log(CONTROLLER_MAX_FACTOR)
            step = self.controller_gain * (signals["acc"] - self.accuracy_target)
            self.log_lr_factor = min(bound, max(-bound, self.log_lr_factor + step))
        elif self.updates == "alternate":
            self.train_ebm_next = not self.rule.train_flow_next(signals["acc"])

    def state_dict(self) -> dict[str, Any]:
        state = {
            **super().state_dict(),
            "rule": self.rule.state_dict(),
            "train_ebm_next": self.train_ebm_next,
        }
        if self.updates == "controlled":
            state["log_lr_factor"] = self.log_lr_factor
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._frozen_contrast = None
        self.rule.load_state_dict(state["rule"])
        self.train_ebm_next = state["train_ebm_next"]
        if self.updates == "controlled":
            self.log_lr_factor = state["log_lr_factor"]
