"""Learning-rate schedules: the ``schedule`` config node, a factor of the step.

A schedule multiplies every optimizer's base learning rate by ``factor(step, total)``. It is a
pure function of the step and the run's length, like the data and noise streams
(``fce.trainer``), so a resumed run sets the same rates as an uninterrupted one; the base
rates are kept in the optimizers' parameter groups (``base_lr``), saved with their state. The
reference trains at a constant rate: ``schedule=constant`` is the default and touches nothing.
"""

from __future__ import annotations

import math

import torch


class Schedule:
    """The rate at ``step`` of ``total`` is ``factor(step, total)`` times the base rate."""

    name = "schedule"
    constant = False

    def factor(self, step: int, total: int) -> float:
        raise NotImplementedError

    def apply(self, optimizers: list[torch.optim.Optimizer], step: int, total: int) -> None:
        """Set each parameter group's rate for ``step``; the base rate is kept in the group
        (``base_lr``, saved with the optimizer's state) the first time it is seen."""
        if self.constant:
            return
        factor = self.factor(step, total)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                base = group.setdefault("base_lr", group["lr"])
                group["lr"] = base * factor


class Constant(Schedule):
    """The reference: the base rate throughout."""

    name = "constant"
    constant = True

    def factor(self, step: int, total: int) -> float:
        return 1.0


class Cosine(Schedule):
    """Half a cosine from 1 to ``min_factor`` over the run, after ``warmup`` steps rising
    linearly from 0 (Loshchilov and Hutter, "SGDR", arXiv:1608.03983, without restarts)."""

    name = "cosine"

    def __init__(self, min_factor: float, warmup: int) -> None:
        self.min_factor = min_factor
        self.warmup = warmup

    def factor(self, step: int, total: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(total - self.warmup, 1)
        progress = min((step - self.warmup) / span, 1.0)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


class StepDecay(Schedule):
    """The rate times ``gamma`` at each of ``milestones`` (fractions of the run's steps)."""

    name = "step"

    def __init__(self, milestones: list[float], gamma: float) -> None:
        self.milestones = sorted(milestones)
        self.gamma = gamma

    def factor(self, step: int, total: int) -> float:
        passed = sum(step >= m * total for m in self.milestones)
        return self.gamma**passed
