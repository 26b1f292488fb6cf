"""Where metrics, figures and files go. The training loop talks to a ``Tracker``, never MLflow."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from matplotlib.figure import Figure


class Tracker(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars that share one step (an evaluation)."""

    def log_history(self, steps: Sequence[int], metrics: Mapping[str, Sequence[float]]) -> None:
        """Per-step scalars buffered by the loop, written in one batch."""

    def log_figure(self, figure: Figure, name: str) -> None:
        """A figure, under an artifact path such as ``densities/step_001000.png``."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file produced by the run (a checkpoint, a config)."""


class NullTracker:
    """Discards everything."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_history(self, steps: Sequence[int], metrics: Mapping[str, Sequence[float]]) -> None:
        pass

    def log_figure(self, figure: Figure, name: str) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass


class MemoryTracker:
    """Keeps everything in memory: for tests, notebooks and the curves figure."""

    def __init__(self) -> None:
        self.history: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
        self.figures: list[str] = []
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.history[name][0].append(step)
            self.history[name][1].append(float(value))

    def log_history(self, steps: Sequence[int], metrics: Mapping[str, Sequence[float]]) -> None:
        for name, values in metrics.items():
            self.history[name][0].extend(steps)
            self.history[name][1].extend(float(v) for v in values)

    def log_figure(self, figure: Figure, name: str) -> None:
        self.figures.append(name)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))

    def last(self, name: str) -> float:
        return self.history[name][1][-1]
