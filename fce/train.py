"""The FCE game: the EBM and the flow alternate by the classifier's accuracy.

Plain PyTorch, no Hydra, no MLflow: metrics leave through a ``Tracker``. One step reads
top to bottom: take a batch and noise, score both models, step the one whose turn it is,
decide whose turn is next, and now and then evaluate on fixed held-out points.

The two baselines FCE is compared with run in the same loop, so they share the data stream,
the evaluation and the logging: ``nce`` steps only the EBM against a fixed noise model (the
"flow" it is given, frozen), and ``flow_mle`` steps only the flow, by maximum likelihood.
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
from fce.flows import Flow, FrozenFlow
from fce.metrics import Evaluator
from fce.objective import fce_accuracy, fce_value
from fce.plots import PanelRow, density_panel, training_curves
from fce.threshold import FixedThreshold
from fce.tracking import MemoryTracker, NullTracker, Tracker

PANEL_SAMPLES = 100_000
ESTIMATORS = ("fce", "nce", "flow_mle")


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
        estimator: str = "fce",
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator={estimator!r}: choose one of {', '.join(ESTIMATORS)}")
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
        self.estimator = estimator
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
        signals = ("loss",) if estimator == "flow_mle" else ("value", "acc", "trained_ebm")
        self._pending: dict[str, list[float]] = {name: [] for name in signals}
        self._pending_steps: list[int] = []
        self._permutation: Tensor | None = None
        self._epoch_of_permutation = -1
        self._generator = torch.Generator(device=self.device)
        self._frozen: FrozenFlow | None = None  # see _frozen_flow
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
        noise_model = self._frozen_flow()
        log_q_data = noise_model.log_prob(x)
        x_noise, log_q_noise = noise_model.transform_noise(z)
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

    def _mle_step(self, x: Tensor) -> Tensor:
        """Gradient descent on the flow's negative log-likelihood of the batch."""
        loss = -self.flow.log_prob(x).mean()
        self.opt_flow.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_flow.step()
        self._frozen = None
        return loss.detach()

    def _frozen_flow(self) -> FrozenFlow:
        """The flow as the EBM's step sees it: fixed, so folded once and reused until the flow
        steps again (85% of Glow's steps are EBM steps, most of them in a row)."""
        if self._frozen is None:
            self._frozen = self.flow.frozen()
        return self._frozen

    def _check_parameters(self, model: torch.nn.Module, total: float, name: str) -> None:
        """Raise naming the first non-finite parameter, if ``total`` (their norm) is not finite."""
        if math.isfinite(total):
            return
        bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), "norm")
        raise DivergenceError(self.step, f"the {name} parameter {bad}")

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
            if self.estimator != "nce":  # NCE's noise is fixed: fitted or loaded as it is
                self.flow.data_init(self._batch(0))
                self._frozen = None
            self.flow_initialised = True
        if self.step == 0:
            self._evaluate()
        settings = self.settings
        while self.step < self.total_steps:
            x = self._batch(self.step)
            if self.estimator == "flow_mle":
                trained_ebm = False
                value, accuracy = self._mle_step(x), None
            else:
                z = self._noise(self.step, x)
                trained_ebm = self.estimator == "nce" or self.train_ebm_next
                step = self._ebm_step if trained_ebm else self._flow_step
                value, accuracy = step(x, z)
            stepped = self.ebm if trained_ebm else self.flow
            if not trained_ebm:
                self.flow_steps += 1
            self.step += 1
            # One host sync per step, for the signal, the accuracy the rule needs to choose the
            # next move, and the norm of the parameters just updated (a NaN or Inf parameter
            # is caught at the step that made it, even when the loss was still finite).
            param_norm = torch.nn.utils.get_total_norm(stepped.parameters(), foreach=True)
            synced = [value, param_norm.to(value.dtype)]
            if accuracy is not None:
                synced.append(accuracy.to(value.dtype))
            value_f, norm_f, *rest = torch.stack(synced).tolist()
            accuracy_f = rest[0] if rest else math.nan
            if not math.isfinite(value_f):
                quantity = "loss (-log q)" if self.estimator == "flow_mle" else "value"
                raise DivergenceError(self.step, f"the {self.estimator.upper()} {quantity}")
            self._check_parameters(stepped, norm_f, "EBM" if trained_ebm else "flow")
            if self.estimator == "fce":
                self.train_ebm_next = not self.rule.train_flow_next(accuracy_f)
            self._pending_steps.append(self.step)
            if self.estimator == "flow_mle":
                self._pending["loss"].append(value_f)
            else:
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
            self._log_curves()
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
        # flow_mle never trains the EBM: its numbers would mean nothing, so none are computed.
        metrics = self.evaluator(None if self.estimator == "flow_mle" else self.ebm, self.flow)
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
        titles = {
            "fce": ("Flow", "EBM"),
            "nce": ("Noise (fixed)", "EBM"),
            "flow_mle": ("Flow (MLE)", "EBM (not trained)"),
        }[self.estimator]
        figure = density_panel(
            [row], limit=self.evaluator.grid.limit, flow_title=titles[0], ebm_title=titles[1]
        )
        self.tracker.log_figure(figure, f"densities/step_{self.step:07d}.png")
        self.seconds["plots"] += time.perf_counter() - started

    def _log_curves(self) -> None:
        started = time.perf_counter()
        names = (
            ("loss", "nll_flow", "kl_data_flow")
            if self.estimator == "flow_mle"
            else ("value", "acc", "mse_logp", "nll_ebm", "nll_flow", "logz_gap")
        )
        curves = training_curves(self.history.history, names=names)
        self.tracker.log_figure(curves, "curves.png")
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
        self._frozen = None
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
