"""What leaves the loop besides metrics: density figures and checkpoints, as callbacks (the
``Callback`` protocol is the loop's own, ``fce.trainer``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fce.trainer import Callback, Trainer

__all__ = ["Callback", "Checkpoints", "Figures", "OnEval"]

PANEL_SAMPLES = 100_000  # data points drawn in a density panel's first column


class Figures(Callback):
    """Density panels (Data | flow | EBM) every ``plot_every`` steps and at the end, and the
    training curves at the end, logged to the trainer's tracker."""

    def __init__(self, plot_every: int) -> None:
        self.plot_every = plot_every

    def after_step(self, trainer: Trainer) -> None:
        step = trainer.step
        if step < trainer.total_steps and self.plot_every and step % self.plot_every == 0:
            self.log_panel(trainer)

    def on_end(self, trainer: Trainer) -> None:
        self.log_panel(trainer)
        self.log_curves(trainer)

    def log_panel(self, trainer: Trainer) -> None:
        from fce.plots import PanelRow, density_panel

        evaluator = trainer.evaluator
        data = trainer.data[:PANEL_SAMPLES]
        rows = evaluator.panel_rows(trainer.evaluated_ebm, trainer.flow, data)
        flow_title, ebm_title = trainer.estimator.panel_titles
        if evaluator.grid is None:  # above 2-D: marginals of samples and weighted points
            flow_title, ebm_title = f"{flow_title}, samples", f"{ebm_title}, reweighted"
        figure = density_panel(
            [PanelRow(*row) for row in rows],
            limit=evaluator.panel_limit,
            flow_title=flow_title,
            ebm_title=ebm_title,
        )
        trainer.tracker.log_figure(figure, f"densities/step_{trainer.step:07d}.png")

    def log_curves(self, trainer: Trainer) -> None:
        from fce.plots import training_curves

        curves = training_curves(trainer.history.history, names=trainer.estimator.curves)
        trainer.tracker.log_figure(curves, "curves.png")


class Checkpoints(Callback):
    """Calls ``save(trainer)`` every ``every`` steps (0: never) and at the last step."""

    def __init__(self, save: Callable[[Trainer], Path], every: int) -> None:
        self.save = save
        self.every = every

    def after_step(self, trainer: Trainer) -> None:
        last = trainer.step == trainer.total_steps
        if last or (self.every and trainer.step % self.every == 0):
            self.save(trainer)


class OnEval(Callback):
    """Calls ``report(step, metrics)`` after each evaluation (a sweep's pruner); it may raise
    ``StopRun`` to end the run early."""

    def __init__(self, report: Callable[[int, dict[str, float]], Any]) -> None:
        self.report = report

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.report(trainer.step, metrics)
