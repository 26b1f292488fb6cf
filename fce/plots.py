"""Figures: the reference's density panel and training curves, returned as matplotlib Figures.

The caller saves or logs them; nothing here touches the file system or a tracker. Figures are
built without pyplot, so none is kept open in a global registry during long runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

CMAP = "jet"  # the reference's palette, so the figures compare side by side


@dataclass(frozen=True)
class PanelRow:
    """One row of a density panel: data samples and two log-densities on a square grid."""

    label: str
    samples: Tensor
    log_q_flow: Tensor
    log_p_ebm: Tensor


def density_panel(
    rows: Sequence[PanelRow],
    limit: float = 4.0,
    flow_title: str = "Flow",
    ebm_title: str = "EBM",
    bins: int = 256,
) -> Figure:
    """Rows of Data | Flow | EBM densities on [-limit, limit]^2, as in the reference figures."""
    fig = Figure(figsize=(9, 3 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for row, (ax_data, ax_flow, ax_ebm) in zip(rows, axes, strict=True):
        draw_samples(ax_data, row.samples, limit, bins)
        draw_density(ax_flow, row.log_q_flow, limit)
        draw_density(ax_ebm, row.log_p_ebm, limit)
        ax_data.set_ylabel(row.label, fontsize=12)
    finish_panel(axes, ("Data", flow_title, ebm_title), limit)
    return fig


def draw_samples(ax: Axes, samples: Tensor, limit: float = 4.0, bins: int = 256) -> None:
    """A 2-D histogram of samples on [-limit, limit]^2."""
    points = samples.detach().cpu().double().numpy()
    ax.hist2d(points[:, 0], points[:, 1], bins=bins, range=[[-limit, limit]] * 2, cmap=CMAP)


def draw_density(ax: Axes, log_density: Tensor, limit: float = 4.0) -> None:
    """exp of a (cells, cells) log-density on the grid over [-limit, limit]^2."""
    density = np.exp(log_density.detach().cpu().double().numpy())
    extent = (-limit, limit, -limit, limit)
    ax.imshow(density, origin="lower", extent=extent, cmap=CMAP, interpolation="nearest")


def finish_panel(axes: np.ndarray, titles: Sequence[str], limit: float = 4.0) -> None:
    """Column titles on the first row; square, tick-free axes on [-limit, limit]^2."""
    for ax, title in zip(axes[0], titles, strict=True):
        ax.set_title(title, fontsize=13)
    for ax in axes.flat:
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])


def training_curves(
    history: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    names: Sequence[str] = ("value", "acc", "mse_logp", "nll_ebm", "nll_flow", "logz_gap"),
    smooth: int = 50,
) -> Figure:
    """One panel per metric present in ``history`` (name -> (steps, values)).

    Per-step signals (value, acc) are drawn faintly with a running mean of ``smooth`` steps.
    """
    present = [name for name in names if name in history and len(history[name][0]) > 0]
    if not present:
        raise ValueError(f"no metric of {list(names)} in history ({sorted(history)})")
    cols = min(3, len(present))
    n_rows = -(-len(present) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, present):
        steps = np.asarray(history[name][0])
        values = np.asarray(history[name][1], dtype=float)
        if len(values) > 4 * smooth:
            ax.plot(steps, values, alpha=0.25, lw=0.6, color="C0")
            kernel = np.ones(smooth) / smooth
            ax.plot(steps[smooth - 1 :], np.convolve(values, kernel, mode="valid"), color="C0")
        else:
            ax.plot(steps, values, marker="." if len(values) < 50 else None, color="C0")
        if name in ("mse_logp",):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.set_visible(False)
    return fig
