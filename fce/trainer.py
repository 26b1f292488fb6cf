"""The training loop: plain PyTorch, no Hydra, no MLflow; metrics leave through a ``Tracker``
(``fce.recording``), everything else through a ``Callback``.

One step reads top to bottom: take a batch (and noise), let the estimator step, check and
record its signals, evaluate now and then on fixed held-out points, and let the callbacks
(figures, checkpoints, progress) do their part.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fce.averaging import WeightAverage
from fce.data import stream_seed
from fce.ebm import EBM
from fce.estimators import Estimator
from fce.flows import Flow
from fce.metrics import MAY_BE_INFINITE, Evaluator
from fce.recording import MemoryTracker, NullTracker, Tracker
from fce.schedule import Constant, Schedule

# A finite blow-up is a divergence too: a loss, value or test NLL beyond this many nats (the
# models' numbers are a few nats; a run whose EBM NLL reaches 1e4 has left the data).
DIVERGENCE_BOUND = 1e4


class DivergenceError(RuntimeError):
    """A non-finite (or absurdly large) quantity appeared; the message names the step and it."""

    def __init__(self, step: int, quantity: str, reason: str = "is not finite") -> None:
        super().__init__(f"diverged at step {step}: {quantity} {reason}")


class StopRun(Exception):
    """Raised by a callback to end a run early (e.g. a pruned sweep trial)."""


class Callback:
    """What the loop calls besides the estimator: no-op hooks, subclasses override the ones
    they need. Defined here, with the loop; the callbacks themselves live above it
    (``fce.callbacks``, ``fce.progress``, ``fce.interrupts``)."""

    def on_start(self, trainer: Trainer) -> None:
        pass

    def on_step(self, trainer: Trainer, signals: dict[str, float]) -> None:
        pass

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def on_end(self, trainer: Trainer) -> None:
        pass


@dataclass(frozen=True)
class LoopSettings:
    """How long and how often.

    Args:
        batch_size: data points per step; the flow draws as many samples.
        epochs: passes over the training set (each reshuffled; an incomplete last batch is
            dropped, so every step sees ``batch_size`` points).
        max_steps: cap on the total steps; ``None`` for no cap.
        eval_every: steps between evaluations (also at step 0 and at the end).
        seed: the run's seed, from which the shuffling and noise streams derive.
        ema_decay: > 0: evaluate an exponential moving average of the EBM's weights
            (``fce.averaging``) instead of the weights; 0: the weights, as the reference.
    """

    batch_size: int
    epochs: int
    max_steps: int | None
    eval_every: int
    seed: int
    ema_decay: float = 0.0

    def total_steps(self, n_data: int) -> int:
        """The steps of a run on ``n_data`` training points."""
        total = self.epochs * (n_data // self.batch_size)
        return total if self.max_steps is None else min(total, self.max_steps)


class Trainer:
    """Plays the estimator's game from ``step`` to ``total_steps`` and keeps its state.

    Randomness is counter-based: the permutation of epoch e and the noise of step t come from
    generators seeded by (seed, e) and (seed, t). So the state to resume from is just the
    models, the optimisers, the step and the estimator's state, and a resumed run is
    bit-identical to an uninterrupted one on CPU.
    """

    def __init__(
        self,
        estimator: Estimator,
        train_data: Tensor,
        evaluator: Evaluator,
        settings: LoopSettings,
        tracker: Tracker | None = None,
        callbacks: list[Callback] | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        self.estimator = estimator
        self.data = train_data
        self.evaluator = evaluator
        self.settings = settings
        self.tracker = tracker if tracker is not None else NullTracker()
        self.callbacks = list(callbacks or [])
        self.schedule = schedule if schedule is not None else Constant()
        self.average = (
            WeightAverage(estimator.ebm, settings.ema_decay) if settings.ema_decay > 0 else None
        )
        self.device = train_data.device
        self.batches_per_epoch = train_data.shape[0] // settings.batch_size
        self.total_steps = settings.total_steps(train_data.shape[0])
        # Progress state (all of it goes into checkpoints, with the estimator's).
        self.step = 0
        self.started = False
        self.last_metrics: dict[str, float] = {}
        # Per-step signals, kept whole for the curves figure, flushed to the tracker in batches.
        self.history = MemoryTracker()
        self._pending: dict[str, list[float]] = {name: [] for name in estimator.signals}
        self._pending_steps: list[int] = []
        self._permutation: Tensor | None = None
        self._epoch_of_permutation = -1
        self._generator = torch.Generator(device=self.device)
        # Wall time spent evaluating, for the speed benchmark and the logs.
        self.seconds = {"eval": 0.0}

    @property
    def ebm(self) -> EBM:
        return self.estimator.ebm

    @property
    def flow(self) -> Flow:
        return self.estimator.flow

    @property
    def evaluated_ebm(self) -> EBM:
        """The EBM that evaluation and figures score: the weights' moving average when
        ``ema_decay`` > 0, else the weights themselves."""
        return self.average.model if self.average is not None else self.ebm

    # --- randomness ---------------------------------------------------------------------------

    def _seeded(self, stream: str) -> torch.Generator:
        self._generator.manual_seed(stream_seed(self.settings.seed, stream))
        return self._generator

    def batch(self, step: int) -> Tensor:
        """The data batch of ``step``: epoch ``step // batches_per_epoch``'s permutation."""
        epoch, index = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch_of_permutation:
            n = self.data.shape[0]
            gen = self._seeded(f"shuffle/{epoch}")
            self._permutation = torch.randperm(n, generator=gen, device=self.device)
            self._epoch_of_permutation = epoch
        size = self.settings.batch_size
        return self.data[self._permutation[index * size : (index + 1) * size]]

    def noise(self, step: int, like: Tensor) -> Tensor:
        """The base noise z of ``step``, shaped like the batch."""
        gen = self._seeded(f"noise/{step}")
        return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> dict[str, float]:
        """Play from ``self.step`` to ``self.total_steps``; return the final metrics."""
        estimator = self.estimator
        for callback in self.callbacks:
            callback.on_start(self)
        if not self.started:
            estimator.start(self.batch(0))
            self.started = True
        if self.step == 0:
            self.evaluate()
        optimizers = list(estimator.optimizers.values())
        while self.step < self.total_steps:
            x = self.batch(self.step)
            z = self.noise(self.step, x) if estimator.uses_noise else None
            if not self.schedule.constant:  # the reference's constant rate: nothing to set
                self.schedule.apply(optimizers, self.step, self.total_steps)
            out = estimator.step(x, z)
            self.step += 1
            estimator.count(out)
            if out.trained_ebm and self.average is not None:
                self.average.update()
            signals = self._synced(out.signals, out.stepped)
            estimator.observe(signals)
            signals["trained_ebm"] = float(out.trained_ebm)
            self._record(signals)
            for callback in self.callbacks:
                callback.on_step(self, signals)
            if self.step == self.total_steps or self.step % self.settings.eval_every == 0:
                self.evaluate()
            for callback in self.callbacks:
                callback.after_step(self)
        if self.step == self.total_steps:
            self.flush()
            for callback in self.callbacks:
                callback.on_end(self)
        return {**self.last_metrics, **estimator.play(self.step)}

    def _synced(self, signals: dict[str, Tensor], stepped: torch.nn.Module) -> dict[str, float]:
        """The step's signals on the host, checked; one host sync per step.

        The sync brings the signals, the accuracy a rule needs to choose the next move, and the
        norm of the parameters just updated (so a NaN or Inf parameter is caught at the step
        that made it, even when the objective was still finite).
        """
        objective = self.estimator.objective
        names = [objective, *(n for n in signals if n != objective)]
        norm = torch.nn.utils.get_total_norm(stepped.parameters(), foreach=True)
        dtype = signals[objective].dtype
        values = torch.stack([norm.to(dtype), *(signals[n].to(dtype) for n in names)]).tolist()
        norm_f, *rest = values
        synced = dict(zip(names, rest, strict=True))
        value = synced[objective]
        if not math.isfinite(value) or abs(value) > DIVERGENCE_BOUND:
            label = f"the {self.estimator.name.upper()} {self.estimator.objective_label}"
            raise DivergenceError(self.step, label, _why(value))
        if not math.isfinite(norm_f):
            which = "EBM" if stepped is self.ebm else "flow" if stepped is self.flow else "models'"
            bad = next(
                (n for n, p in stepped.named_parameters() if not torch.isfinite(p).all()), "norm"
            )
            raise DivergenceError(self.step, f"the {which} parameter {bad}")
        return synced

    def _record(self, signals: dict[str, float]) -> None:
        self._pending_steps.append(self.step)
        for name, values in self._pending.items():
            values.append(signals[name])

    def flush(self) -> None:
        """Write the buffered per-step signals to the tracker (and the in-memory history)."""
        if self._pending_steps:
            self.tracker.log_history(self._pending_steps, self._pending)
            self.history.log_history(self._pending_steps, self._pending)
            self._pending_steps = []
            self._pending = {name: [] for name in self._pending}

    def metrics(self) -> dict[str, float]:
        """The metrics of the models as they stand, on the held-out points (not logged): the
        EBM evaluation scores (its weight average, when there is one), the flow if trained."""
        ebm = self.evaluated_ebm if self.estimator.evaluates_ebm else None
        if ebm is not None:
            self.estimator.before_evaluation(ebm)
        flow = self.flow if self.estimator.evaluates_flow else None
        return self.evaluator(ebm, flow)

    def evaluate(self) -> None:
        """The metrics of the models on the held-out points, logged at the current step."""
        started = time.perf_counter()
        metrics = self.metrics()
        self.seconds["eval"] += time.perf_counter() - started
        for name, value in metrics.items():
            # KL(model || p_d) is +inf wherever the model covers a zero of p_d: a property
            # of the data (checkerboard), not a divergence; it is logged as it is.
            if not math.isfinite(value) and not (value == math.inf and name in MAY_BE_INFINITE):
                raise DivergenceError(self.step, f"the evaluation metric {name}")
        for name in self.estimator.bounded_metrics:
            # (nll_ebm is not reported above 2-D where its log Z estimate is not trusted)
            if name in metrics and abs(metrics[name]) > DIVERGENCE_BOUND:
                raise DivergenceError(
                    self.step, f"the evaluation metric {name}", _why(metrics[name])
                )
        metrics.update(self.estimator.play(self.step))
        # In the history first: if the store fails now, a checkpoint still holds them.
        self.history.log_metrics(metrics, step=self.step)
        self.flush()
        self.tracker.log_metrics(metrics, step=self.step)
        self.last_metrics = metrics
        for callback in self.callbacks:
            callback.on_eval(self, metrics)

    # --- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, as it is now: a copy that training on leaves as it
        was (the modules' and optimizers' own state dicts are views of their live tensors).
        The buffered signals are flushed first."""
        self.flush()
        estimator = self.estimator
        state = {
            "ebm": self.ebm.state_dict(),
            "flow": self.flow.state_dict(),
            **{name: opt.state_dict() for name, opt in estimator.optimizers.items()},
            **estimator.state_dict(),
            **({"ebm_average": self.average.state_dict()} if self.average is not None else {}),
            "step": self.step,
            "flow_initialised": self.started,
            "history": {k: (list(s), list(v)) for k, (s, v) in self.history.history.items()},
            "last_metrics": dict(self.last_metrics),
            # Data and noise come from counter-based streams; the global RNG is saved anyway
            # so that anything drawing from it later (dropout, a new sampler) resumes exactly.
            "torch_rng": torch.get_rng_state(),
        }
        return copy.deepcopy(state)

    def attach(self, tracker: Tracker, callbacks: list[Callback]) -> None:
        """Log to ``tracker`` and call ``callbacks`` from now on (a run's trainer is built,
        and a resumed one loaded, before its tracked run is opened)."""
        self.tracker = tracker
        self.callbacks = list(callbacks)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        estimator = self.estimator
        self.ebm.load_state_dict(state["ebm"])
        self.flow.load_state_dict(state["flow"])
        for name, opt in estimator.optimizers.items():
            opt.load_state_dict(state[name])
        estimator.load_state_dict(state)
        if self.average is not None:
            self.average.load_state_dict(state["ebm_average"])
        self.step = state["step"]
        self.started = state["flow_initialised"]
        self.history = MemoryTracker()
        for name, (steps, values) in state["history"].items():
            self.history.history[name] = (list(steps), list(values))
        self.last_metrics = dict(state["last_metrics"])
        if "torch_rng" in state:  # absent from checkpoints of fce before 0.1.0's release
            torch.set_rng_state(state["torch_rng"])


def _why(value: float) -> str:
    if not math.isfinite(value):
        return "is not finite"
    return f"is {value:.3g}, beyond the bound of {DIVERGENCE_BOUND:g} (fce.trainer)"
