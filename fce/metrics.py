"""How well the EBM and the flow learned the data density, on fixed held-out points.

Grid normalisation: the EBM's exp(-f) is integrated numerically over [-L, L]^2 on a regular
grid of cell centres (logsumexp plus the log cell area), which gives a normalised p_hat for
NLL and KL, and log Z to compare with the learned c.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fce.config import EVAL_METRICS
from fce.data import Dataset
from fce.ebm import EBM
from fce.flows import Flow


@dataclass(frozen=True)
class Grid:
    """Cell centres of a cells x cells grid over [-limit, limit]^2."""

    points: Tensor
    log_cell_area: float
    limit: float
    cells: int

    @classmethod
    def make(
        cls,
        limit: float = 4.0,
        cells: int = 256,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Grid:
        width = 2 * limit / cells
        axis = -limit + width * (torch.arange(cells, dtype=torch.float64) + 0.5)
        # Row-major with x1 along columns, so points.view(cells, cells) is an image (row = x2).
        x2, x1 = torch.meshgrid(axis, axis, indexing="ij")
        points = torch.stack([x1.reshape(-1), x2.reshape(-1)], dim=1).to(device, dtype)
        return cls(points, 2 * math.log(width), limit, cells)

    def log_integral(self, log_f: Tensor) -> Tensor:
        """log of the integral of exp(log_f) over the grid's square (midpoint rule)."""
        return torch.logsumexp(log_f.double(), dim=0) + self.log_cell_area


# Rows per forward pass in evaluation: one chunk's activations are alive at once, 1 MiB per
# hidden layer of width 128 at 2,048 rows (8 MiB at 16,384). At the default sizes (20,000
# points, 256 x 256 cells, both multiples of 8) the values are bitwise those of one pass on
# this CPU, whatever the chunk (tests/test_metrics.py).
EVAL_CHUNK = 2048


def _chunked(fn, x: Tensor, chunk: int = EVAL_CHUNK) -> Tensor:
    """``fn`` over the rows of ``x``, ``chunk`` rows at a time, into one output tensor.

    Each chunk's values are copied out and freed before the next chunk runs: kept alive for a
    final ``torch.cat``, these small tensors sat between the freed megabyte activations and
    fragmented the heap, growing the process by about 1 MiB per chunk.
    """
    if x.shape[0] <= chunk:
        return fn(x)
    out = None
    for start in range(0, x.shape[0], chunk):
        values = fn(x[start : start + chunk])
        if out is None:
            out = values.new_empty((x.shape[0], *values.shape[1:]))
        out[start : start + chunk] = values
    return out


DENSITY_VERSION = 1  # bump when a dataset's log_prob changes, to invalidate cached values


def cache_dir() -> Path:
    return Path(os.environ.get("FCE_CACHE_DIR", Path.home() / ".cache" / "fce"))


def true_log_prob(dataset: Dataset, points: Tensor) -> Tensor:
    """log p_d at ``points`` (float64, on their device), cached on disk by content.

    The spiral densities are numerical integrals (seconds for 20,000 points); a run, a sweep
    and the next run on the same points reuse them.
    """
    cpu = points.detach().to("cpu", torch.float64).contiguous()
    digest = hashlib.sha256(cpu.numpy().tobytes()).hexdigest()[:20]
    path = cache_dir() / f"{dataset.name}-v{DENSITY_VERSION}-{digest}.pt"
    try:
        return torch.load(path, weights_only=True).to(points.device)
    except Exception:  # absent or unreadable: compute it again
        pass
    values = dataset.log_prob(cpu)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            torch.save(values, handle)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home is no reason to fail a run
    return values.to(points.device)


class Evaluator:
    """The metrics of an (EBM, flow) pair on fixed held-out points (docs/method.md, Metrics).

    Metrics (nats):
        nll_ebm            test NLL of the grid-normalised EBM p_hat.
        nll_flow           exact test NLL of the flow.
        logz_gap           c - log Z_grid: how far the learned c is from the EBM's normaliser.
    and where the dataset has a density (all six do):
        nll_data           test NLL of the data density itself: the floor of the two above.
        kl_data_ebm        KL(p_d || p_hat) = mean log p_d(x) - log p_hat(x).
        kl_data_flow       KL(p_d || q) = mean log p_d(x) - log q(x).
        mse_logp           mean (log p_theta(x) - log p_d(x))^2 with the learned c.
        mse_logp_centered  the variance of log p_theta(x) - log p_d(x): the shape error alone,
                           which a wrong c cannot inflate.
        tv_ebm             total variation between p_hat and p_d on the grid.
    """

    def __init__(self, dataset: Dataset, eval_points: Tensor, grid: Grid) -> None:
        self.dataset = dataset
        self.eval_points = eval_points
        self.grid = grid
        self.log_p_true = None
        self.p_true_grid = None
        if dataset.has_log_prob:
            self.log_p_true = true_log_prob(dataset, eval_points)
            self.p_true_grid = true_log_prob(dataset, grid.points).exp()

    @torch.no_grad()
    def __call__(self, ebm: EBM | None, flow: Flow | None) -> dict[str, float]:
        """The metrics of ``ebm`` and ``flow``; with ``ebm=None``, the flow's alone (nll_flow,
        and nll_data, kl_data_flow where the dataset has a density): for a run that trains
        no EBM; with ``flow=None``, the EBM's alone (and nll_data): for one that trains no
        flow."""
        if ebm is None and flow is None:
            raise ValueError("nothing to evaluate: both ebm and flow are None")
        x = self.eval_points
        values = {}
        if self.log_p_true is not None:
            values["nll_data"] = -self.log_p_true.mean()
        if flow is not None:
            values["nll_flow"] = -_chunked(flow.log_prob, x).double().mean()
            if self.log_p_true is not None:
                values["kl_data_flow"] = values["nll_flow"] + self.log_p_true.mean()
        if ebm is not None:
            values |= self._ebm_metrics(ebm)
        values = {name: values[name] for name in EVAL_METRICS if name in values}
        # One device-to-host transfer for all of them.
        numbers = torch.stack(list(values.values())).tolist()
        return dict(zip(values, numbers, strict=True))

    def _ebm_metrics(self, ebm: EBM) -> dict[str, Tensor]:
        x = self.eval_points
        neg_energy_grid = -_chunked(ebm.energy, self.grid.points)
        log_z_grid = self.grid.log_integral(neg_energy_grid)
        # One pass of the EBM over x: log p_theta = -f - c, the same ops as ``ebm(x)``.
        neg_energy = -_chunked(ebm.energy, x)
        log_p_ebm = neg_energy - ebm.log_z
        log_p_hat = neg_energy.double() - log_z_grid
        values = {
            "nll_ebm": -log_p_hat.mean(),
            "logz_gap": ebm.log_z.double() - log_z_grid,
        }
        if self.log_p_true is not None:
            log_p_true = self.log_p_true
            error = log_p_ebm.double() - log_p_true
            values["kl_data_ebm"] = values["nll_ebm"] + log_p_true.mean()
            values["mse_logp"] = error.pow(2).mean()
            values["mse_logp_centered"] = error.var(unbiased=False)
            p_hat_grid = (neg_energy_grid.double() - log_z_grid).exp()
            cell_area = math.exp(self.grid.log_cell_area)
            values["tv_ebm"] = 0.5 * (p_hat_grid - self.p_true_grid).abs().sum() * cell_area
        return values

    @torch.no_grad()
    def grid_log_densities(self, ebm: EBM, flow: Flow) -> tuple[Tensor, Tensor]:
        """(log q_flow, log p_hat_ebm) on the grid, each (cells, cells), for density panels."""
        log_q = _chunked(flow.log_prob, self.grid.points)
        neg_energy = -_chunked(ebm.energy, self.grid.points)
        log_p = neg_energy.double() - self.grid.log_integral(neg_energy)
        shape = (self.grid.cells, self.grid.cells)
        return log_q.view(shape), log_p.view(shape)
