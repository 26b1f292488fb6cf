"""The FCE game: the EBM and the flow alternate by the classifier's accuracy.

Plain PyTorch, no Hydra, no MLflow: metrics leave through a ``Tracker``. One step reads
top to bottom: take a batch and noise, score both models, step the one whose turn it is,
decide whose turn is next, and now and then evaluate on fixed held-out points.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fce.data import stream_seed
from fce.ebm import EBM
from fce.flows import Flow
from fce.metrics import Evaluator
from fce.objective import fce_accuracy, fce_value
from fce.plots import PanelRow, density_panel, training_curves
from fce.threshold import FixedThreshold
from fce.tracking import MemoryTracker, NullTracker, Tracker

PANEL_SAMPLES = 100_000


class DivergenceError(RuntimeError):
    """A non-finite quantity appeared; the message names the step and the quantity."""

    def __init__(self, step: int, quantity: str) -> None:
        super().__init__(f"diverged at step {step}: {quantity} is not finite")
        self.step = step
        self.quantity = quantity


class StopRun(Exception):
    """Raised by an ``on_eval`` callback to end a run early (e.g. a pruned sweep trial)."""


@dataclass(frozen=True)
class LoopSettings:
    """How long and how often.

    Args:
        batch_size: data points per step; the flow draws as many samples.
        epochs: passes over the training set (each reshuffled; an incomplete last batch is
            dropped, so every step sees ``batch_size`` points).
        max_steps: cap on the total steps; ``None`` for no cap.
        eval_every: steps between evaluations (also at step 0 and at the end).
        plot_every: steps between density panels (also at the end); 0 for the end only.
        seed: the run's seed, from which the shuffling and noise streams derive.
    """

    batch_size: int = 1000
    epochs: int = 10
    max_steps: int | None = None
    eval_every: int = 250
    plot_every: int = 0
    seed: int = 42


class FCETrainer:
    """Holds the two models, their optimisers and the alternation state; ``run`` plays the game.

    Randomness is counter-based: the permutation of epoch e and the noise of step t come from
    generators seeded by (seed, e) and (seed, t). So the state to resume from is just the
    models, the optimisers, the step and the rule's state, and a resumed run is bit-identical
    to an uninterrupted one on CPU.
    """

    def __init__(
        self,
        ebm: EBM,
        flow: Flow,
        opt_ebm: torch.optim.Optimizer,
        opt_flow: torch.optim.Optimizer,
        train_data: Tensor,
        evaluator: Evaluator,
        settings: LoopSettings,
        rule: FixedThreshold | None = None,
        tracker: Tracker | None = None,
    ) -> None:
        if settings.batch_size > train_data.shape[0]:
            raise ValueError(
                f"train.batch_size={settings.batch_size} is larger than the training set "
                f"({train_data.shape[0]} points); use at most dataset.n_samples"
            )
        self.ebm, self.flow = ebm, flow
        self.opt_ebm, self.opt_flow = opt_ebm, opt_flow
        self.data = train_data
        self.evaluator = evaluator
        self.settings = settings
        self.rule = rule if rule is not None else FixedThreshold()
        self.tracker = tracker if tracker is not None else NullTracker()
        self.device = train_data.device
        self.batches_per_epoch = train_data.shape[0] // settings.batch_size
        total = settings.epochs * self.batches_per_epoch
        self.total_steps = total if settings.max_steps is None else min(total, settings.max_steps)
        # Alternation and progress state (all of it goes into checkpoints).
        self.step = 0
        self.train_ebm_next = True  # the game starts with the EBM
        self.flow_steps = 0
        self.flow_initialised = False
        self.last_metrics: dict[str, float] = {}
        # Per-step signals, kept whole for the curves figure, flushed to the tracker in batches.
        self.history = MemoryTracker()
        self._pending: dict[str, list[float]] = {"value": [], "acc": [], "trained_ebm": []}
        self._pending_steps: list[int] = []
        self._permutation: Tensor | None = None
        self._epoch_of_permutation = -1
        self._generator = torch.Generator(device=self.device)
        self._on_eval: Callable[[int, dict[str, float]], None] | None = None
        # Wall time spent outside the training steps, for the speed benchmark and the logs.
        self.seconds = {"eval": 0.0, "plots": 0.0}

    # --- randomness ---------------------------------------------------------------------------

    def _seeded(self, stream: str) -> torch.Generator:
        self._generator.manual_seed(stream_seed(self.settings.seed, stream))
        return self._generator

    def _batch(self, step: int) -> Tensor:
        epoch, index = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch_of_permutation:
            n = self.data.shape[0]
            gen = self._seeded(f"shuffle/{epoch}")
            self._permutation = torch.randperm(n, generator=gen, device=self.device)
            self._epoch_of_permutation = epoch
        size = self.settings.batch_size
        return self.data[self._permutation[index * size : (index + 1) * size]]

    def _noise(self, step: int, like: Tensor) -> Tensor:
        gen = self._seeded(f"noise/{step}")
        return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)

    # --- the two moves ------------------------------------------------------------------------

    def _ebm_step(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Gradient ascent on V over (theta, c); the flow is a fixed contrast here."""
        with torch.no_grad():
            log_q_data = self.flow.log_prob(x)
            x_noise, log_q_noise = self.flow.transform_noise(z)
        # Data and noise in one batch: one pass through the EBM instead of two.
        log_p_data, log_p_noise = self.ebm(torch.cat([x, x_noise])).split([x.shape[0], z.shape[0]])
        value = fce_value(log_p_data, log_q_data, log_p_noise, log_q_noise)
        self.opt_ebm.zero_grad(set_to_none=True)
        (-value).backward()
        self.opt_ebm.step()
        return value.detach(), fce_accuracy(log_p_data, log_q_data, log_p_noise, log_q_noise)

    def _flow_step(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Gradient descent on V over alpha, through the samples x~ = g(z) and log q."""
        with torch.no_grad():
            log_p_data = self.ebm(x)
        log_q_data = self.flow.log_prob(x)
        x_noise, log_q_noise = self.flow.transform_noise(z)
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
        return value.detach(), fce_accuracy(log_p_data, log_q_data, log_p_noise, log_q_noise)

    @torch.no_grad()
    def score(self, x: Tensor, z: Tensor) -> tuple[float, float]:
        """(V, accuracy) of the current models on data ``x`` and noise ``z``, no step taken."""
        x_noise, log_q_noise = self.flow.transform_noise(z)
        args = (self.ebm(x), self.flow.log_prob(x), self.ebm(x_noise), log_q_noise)
        return fce_value(*args).item(), fce_accuracy(*args).item()

    # --- the game -----------------------------------------------------------------------------

    def run(
        self,
        on_checkpoint: Callable[[FCETrainer], None] | None = None,
        checkpoint_every: int = 0,
        on_step: Callable[[int, float, float], None] | None = None,
        on_eval: Callable[[int, dict[str, float]], None] | None = None,
    ) -> dict[str, float]:
        """Play from ``self.step`` to ``self.total_steps``; return the final metrics.

        Args:
            on_checkpoint: called with the trainer every ``checkpoint_every`` steps and at the
                end, after the per-step history has been flushed.
            on_step: called with (step, value, accuracy) after every step.
            on_eval: called with (step, metrics) after every evaluation; may raise
                ``StopRun`` to end the run early.
        """
        self._on_eval = on_eval
        if not self.flow_initialised:
            self.flow.data_init(self._batch(0))
            self.flow_initialised = True
        if self.step == 0:
            self._evaluate()
        settings = self.settings
        while self.step < self.total_steps:
            x = self._batch(self.step)
            z = self._noise(self.step, x)
            trained_ebm = self.train_ebm_next
            if trained_ebm:
                value, accuracy = self._ebm_step(x, z)
            else:
                value, accuracy = self._flow_step(x, z)
                self.flow_steps += 1
            self.step += 1
            # One host sync per step: the rule needs the accuracy to choose the next move.
            value_f, accuracy_f = torch.stack([value, accuracy.to(value.dtype)]).tolist()
            if not math.isfinite(value_f):
                raise DivergenceError(self.step, "the FCE value")
            self.train_ebm_next = not self.rule.train_flow_next(accuracy_f)
            self._pending_steps.append(self.step)
            self._pending["value"].append(value_f)
            self._pending["acc"].append(accuracy_f)
            self._pending["trained_ebm"].append(float(trained_ebm))
            if on_step is not None:
                on_step(self.step, value_f, accuracy_f)

            last = self.step == self.total_steps
            if last or self.step % settings.eval_every == 0:
                self._evaluate()
            if not last and settings.plot_every and self.step % settings.plot_every == 0:
                self._log_panel()
            if on_checkpoint is not None and (
                last or (checkpoint_every and self.step % checkpoint_every == 0)
            ):
                self._flush()  # a checkpoint carries every step logged before it
                on_checkpoint(self)
        if self.step == self.total_steps:
            self._flush()
            self._log_panel()
            self.tracker.log_figure(training_curves(self.history.history), "curves.png")
        return {**self.last_metrics, "flow_step_share": self.flow_step_share}

    @property
    def flow_step_share(self) -> float:
        return self.flow_steps / self.step if self.step else 0.0

    def _flush(self) -> None:
        if self._pending_steps:
            self.tracker.log_history(self._pending_steps, self._pending)
            self.history.log_history(self._pending_steps, self._pending)
            self._pending_steps = []
            self._pending = {name: [] for name in self._pending}

    def _evaluate(self) -> None:
        started = time.perf_counter()
        metrics = self.evaluator(self.ebm, self.flow)
        self.seconds["eval"] += time.perf_counter() - started
        for name, value in metrics.items():
            if not math.isfinite(value):
                raise DivergenceError(self.step, f"the evaluation metric {name}")
        metrics["flow_step_share"] = self.flow_step_share
        self._flush()
        self.tracker.log_metrics(metrics, step=self.step)
        self.history.log_metrics(metrics, step=self.step)
        self.last_metrics = metrics
        if self._on_eval is not None:
            self._on_eval(self.step, metrics)

    def _log_panel(self) -> None:
        started = time.perf_counter()
        log_q, log_p = self.evaluator.grid_log_densities(self.ebm, self.flow)
        row = PanelRow(self.evaluator.dataset.name, self.data[:PANEL_SAMPLES], log_q, log_p)
        figure = density_panel([row], limit=self.evaluator.grid.limit)
        self.tracker.log_figure(figure, f"densities/step_{self.step:07d}.png")
        self.seconds["plots"] += time.perf_counter() - started

    # --- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "ebm": self.ebm.state_dict(),
            "flow": self.flow.state_dict(),
            "opt_ebm": self.opt_ebm.state_dict(),
            "opt_flow": self.opt_flow.state_dict(),
            "rule": self.rule.state_dict(),
            "step": self.step,
            "train_ebm_next": self.train_ebm_next,
            "flow_steps": self.flow_steps,
            "flow_initialised": self.flow_initialised,
            "history": {k: (list(s), list(v)) for k, (s, v) in self.history.history.items()},
            "last_metrics": dict(self.last_metrics),
            # Data and noise come from counter-based streams; the global RNG is saved anyway
            # so that anything drawing from it later (dropout, a new sampler) resumes exactly.
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ebm.load_state_dict(state["ebm"])
        self.flow.load_state_dict(state["flow"])
        self.opt_ebm.load_state_dict(state["opt_ebm"])
        self.opt_flow.load_state_dict(state["opt_flow"])
        self.rule.load_state_dict(state["rule"])
        self.step = state["step"]
        self.train_ebm_next = state["train_ebm_next"]
        self.flow_steps = state["flow_steps"]
        self.flow_initialised = state["flow_initialised"]
        self.history = MemoryTracker()
        for name, (steps, values) in state["history"].items():
            self.history.history[name] = (list(steps), list(values))
        self.last_metrics = dict(state["last_metrics"])
        if "torch_rng" in state:  # absent from checkpoints of fce before 0.1.0's release
            torch.set_rng_state(state["torch_rng"])
