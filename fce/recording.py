"""The ``Tracker`` protocol the training loop writes to, and two trackers without a store.

Below the loop and torch-free: the loop depends on this port, and ``fce.tracking`` (MLflow)
implements it, so the science never imports the tracking layer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # matplotlib loads only where a figure is drawn
    from matplotlib.figure import Figure


class Tracker(Protocol):
    """Where a run's parameters, metrics, figures and files go."""

    run_id: str | None

    def log_params(self, params: Mapping[str, str]) -> None:
        """The run's settings, flattened to dotted keys."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Free-form labels of the run."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars that share one step (an evaluation)."""

    def log_history(self, steps: Sequence[int], metrics: Mapping[str, Sequence[float]]) -> None:
        """Per-step scalars buffered by the loop, written in one batch."""

    def log_figure(self, figure: Figure, name: str) -> None:
        """A figure, under an artifact path such as ``densities/step_001000.png``."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file produced by the run (a checkpoint, a config)."""

    def finish(self, status: str) -> None:
        """End the run: FINISHED, FAILED or KILLED."""

    def describe(self, full: bool = False) -> str:
        """The run in one phrase ("MLflow run <id>"); with ``full``, how to look at it too."""


class NullTracker:
    """Discards everything: ``tracking=none``, for benchmarks, tests and runs without a store."""

    run_id: str | None = None

    def __init__(self, **_ignored: object) -> None:
        pass  # accepts the run name, tags and run id that a store-backed tracker would use

    def log_params(self, params: Mapping[str, str]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_history(self, steps: Sequence[int], metrics: Mapping[str, Sequence[float]]) -> None:
        pass

    def log_figure(self, figure: Figure, name: str) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def finish(self, status: str) -> None:
        pass

    def describe(self, full: bool = False) -> str:
        return "not tracked: tracking=none" if full else "not tracked"


class MemoryTracker(NullTracker):
    """Keeps metrics and the names of figures and files in memory: tests, notebooks, curves."""

    def __init__(self, **_ignored: object) -> None:
        self.history: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.figures: list[str] = []
        self.artifacts: list[tuple[Path, str | None]] = []
        self.status: str | None = None

    def log_params(self, params: Mapping[str, str]) -> None:
        self.params.update(params)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update(tags)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.log_history([step], {name: [value] for name, value in metrics.items()})

    def log_history(self, steps: Sequence[int], metrics: Mapping[str, Sequence[float]]) -> None:
        for name, values in metrics.items():
            self.history[name][0].extend(steps)
            self.history[name][1].extend(float(v) for v in values)

    def log_figure(self, figure: Figure, name: str) -> None:
        self.figures.append(name)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))

    def finish(self, status: str) -> None:
        self.status = status


def flatten(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"dataset.name": "8gaussians", ...}; MLflow would stringify dicts."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = "null" if value is None else str(value)
    return flat
