"""What an estimator is: what a step trains, the step itself, its signals, its metrics.

The training loop (``fce.trainer``) is generic: it draws the batch and the noise, calls
``step``, checks and logs the signals the step returns, and evaluates. Which model moves, and
by which objective, is the estimator's alone; the loop never asks which estimator it runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fce.ebm import EBM
from fce.flows import Flow, FrozenFlow
from fce.flows.fused import FusedPasses
from fce.optim import Optimizers
from fce.threshold import FixedThreshold


@dataclass
class Players:
    """What the factory built for a run, handed to the estimator to pick what it trains.

    Args:
        ebm: the energy model (built for every run, so a seed initialises the flow alike
            whatever the estimator).
        flow: the flow of the ``flow`` group, freshly initialised.
        optimizers: makes an optimizer for a model, with the player's learning rate.
        rule: the alternation rule of the ``threshold`` group.
        train_data: the training set (NCE fits its Gaussian noise to it).
        seed: the run's seed, from which an estimator's own random streams derive (the
            loop's come from it too: ``fce.data.stream_seed``).
    """

    ebm: EBM
    flow: Flow
    optimizers: Optimizers
    rule: FixedThreshold
    train_data: Tensor
    seed: int


@dataclass
class StepOutput:
    """What one step did: its per-step signals (0-dim tensors, not yet synced to the host),
    and which model it moved (``trained_flow`` defaults to ``not trained_ebm``: one player a
    step; a step that moves both says so)."""

    signals: dict[str, Tensor]
    stepped: nn.Module
    trained_ebm: bool
    trained_flow: bool | None = None

    def __post_init__(self) -> None:
        if self.trained_flow is None:
            self.trained_flow = not self.trained_ebm


class Estimator(ABC):
    """An objective, the models it moves, and the order it moves them in.

    Class attributes:
        name: its option's name (``estimator=<name>``), in run names and figures.
        objective: the signal that must stay finite; ``objective_label`` names it in errors.
        signals: the per-step signals ``step`` returns, as logged.
        uses_noise: whether ``step`` needs a draw of base noise z.
        uses_rule: whether the threshold group's rule picks its moves.
        evaluates_ebm: whether the EBM's metrics mean anything (is it trained?).
        evaluates_flow: whether the flow's metrics mean anything (is it trained, or a chosen
            noise?).
        makes_passes: whether ``step`` runs the flow as a fixed contrast (``frozen_flow``),
            the passes ``train.compile`` fuses.
        bounded_metrics: evaluation metrics of the trained model that mark a divergence when
            beyond ``fce.trainer.DIVERGENCE_BOUND`` (finite, but absurd).
        panel_titles: (flow, EBM) titles of the density panels.
        curves: the signals and metrics of the end-of-run curves figure.
        score_metric: the evaluation metric a grid's job returns (lower is better): the
            test NLL of the model it trains, the EBM's where it trains one.
    """

    name: ClassVar[str]
    objective: ClassVar[str]
    objective_label: ClassVar[str] = "value"
    signals: ClassVar[tuple[str, ...]]
    uses_noise: ClassVar[bool] = True
    uses_rule: ClassVar[bool] = False
    evaluates_ebm: ClassVar[bool] = True
    evaluates_flow: ClassVar[bool] = True
    makes_passes: ClassVar[bool] = False
    # (mse_logp_centered needs no normaliser: above 2-D, where the other two are withheld
    # when their log Z estimate is not trusted, it still catches a diverging energy)
    bounded_metrics: ClassVar[tuple[str, ...]] = ("nll_ebm", "logz_gap", "mse_logp_centered")
    score_metric: ClassVar[str] = "nll_ebm"
    panel_titles: ClassVar[tuple[str, str]] = ("Flow", "EBM")
    curves: ClassVar[tuple[str, ...]] = (
        "value",
        "acc",
        "mse_logp",
        "nll_ebm",
        "nll_flow",
        "logz_gap",
    )

    def __init__(self, players: Players) -> None:
        self.ebm = players.ebm
        self.flow = players.flow
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._frozen: FrozenFlow | None = None
        self._fused: FusedPasses | None = None
        self.flow_steps = 0  # steps that moved the flow (``StepOutput.trained_flow``)

    @classmethod
    def model_label(cls, settings: Any, flow: str) -> str:
        """What a run of this estimator trains, for run names: the flow's name for FCE."""
        return flow

    @abstractmethod
    def step(self, x: Tensor, z: Tensor | None) -> StepOutput:
        """One training step on the data batch ``x`` (and noise ``z`` if ``uses_noise``)."""

    def start(self, first_batch: Tensor) -> None:
        """Before the first step of a new run: the flow's data-dependent initialisation."""
        self.flow.data_init(first_batch)
        self._frozen = None

    def observe(self, signals: dict[str, float]) -> None:
        """After each step, its signals on the host: a rule may choose the next move."""
        return None

    def count(self, out: StepOutput) -> None:
        """After each step, what it moved: the flow's steps are counted for ``play``."""
        if out.trained_flow:
            self.flow_steps += 1

    def play(self, step: int) -> dict[str, float]:
        """What the estimator reports of its own play after ``step`` steps, beside each
        evaluation's metrics: the share of the steps that moved the flow (FCE's alternation;
        0 or 1 for an estimator that trains one model)."""
        return {"flow_step_share": self.flow_steps / step if step else 0.0}

    def before_evaluation(self, ebm: EBM) -> None:
        """Before each evaluation of ``ebm`` (the EBM or its weight average): settle what the
        metrics read of it (mle sets its c)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The estimator's own state beyond the models and optimizers (for checkpoints)."""
        return {"flow_steps": self.flow_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` from a checkpoint, whose models are loaded already."""
        self._frozen = None
        self.flow_steps = state["flow_steps"]

    def fuse_passes(self, backend: str | Any = "inductor") -> None:
        """From now on, run ``frozen_flow``'s passes compiled (``train.compile``): one graph of
        the live flow, never stale, so never remade."""
        self._fused = FusedPasses(self.flow, backend)

    def frozen_flow(self) -> FrozenFlow | FusedPasses:
        """The flow as a fixed contrast: folded once and reused until the flow moves again
        (most of an FCE game's steps are EBM steps, many in a row); or, fused, the live
        flow's compiled passes."""
        if self._fused is not None:
            return self._fused
        if self._frozen is None:
            self._frozen = self.flow.frozen()
        return self._frozen
