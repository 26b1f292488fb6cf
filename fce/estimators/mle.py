"""Exact maximum likelihood of the EBM: in two dimensions its normaliser is a quadrature.

The reference for FCE and NCE of the same EBM: the likelihood they stand in for, exact up to
the quadrature. Each step descends the batch's negative log-likelihood under the EBM
normalised on a grid, the way evaluation normalises it (``fce.metrics.Grid``), so no
contrast and no flow are involved. (A ceiling of the objective, not of a fixed budget: at a
given number of steps the optimisation may limit it more than the estimator; docs/method.md.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from fce.data import stream_seed
from fce.ebm import EBM
from fce.estimators.base import Estimator, Players, StepOutput
from fce.metrics import Grid


class MLE(Estimator):
    """Gradient descent on mean f(x) + log Z_hat over the EBM's energy weights.

    log Z_hat = logsumexp(-f(grid)) + log(cell area), the midpoint rule on a ``grid_cells`` x
    ``grid_cells`` grid over [-grid_limit, grid_limit]^2 (mass outside the square is ignored,
    as in evaluation). With ``jitter`` the whole grid is shifted each step by one offset,
    uniform in the cell [-h/2, h/2]^2 (h the cell width): the shifted sum is then an unbiased
    estimate of the integral of exp(-f) over the square, and log Z_hat is biased low only by
    Jensen's inequality, by about half its relative variance. Without jitter the fixed nodes
    have an O(h^2) bias that the EBM can exploit by putting mass between them.

    The constant c takes no gradient (it is not in the optimizer): each step sets it to that
    step's log Z_hat, whose energies are those before the step's update, and before each
    evaluation it is set to the log Z_hat of the current weights on the nodes the next step
    will use. So ``logz_gap`` measures the training quadrature against the evaluation's, not
    the last step's change of log Z (a hundred times larger: 0.005 to 0.02 nats a step on
    rings, where the quadratures agree to 1e-4).

    The offset of step t comes from a generator seeded by (run seed, t), as the loop's noise
    does; the estimator counts its steps and checkpoints the count, so a resumed run draws
    the offsets an uninterrupted one would.
    """

    name = "mle"
    objective = "value"
    objective_label = "value (mean log p_hat)"
    signals = ("value", "log_z", "trained_ebm")
    uses_noise = False
    evaluates_flow = False  # the flow is never trained: its numbers would mean nothing
    panel_titles = ("Flow (not trained)", "EBM (MLE)")
    curves = ("value", "log_z", "nll_ebm", "kl_data_ebm", "mse_logp", "logz_gap")

    @classmethod
    def model_label(cls, settings: Any, flow: str) -> str:
        return "ebm-mle"  # not "mle-<flow>": that is flow_mle's

    def __init__(self, players: Players, grid_cells: int, grid_limit: float, jitter: bool) -> None:
        super().__init__(players)
        # c is set, not learned: the optimizer holds the energy's weights alone.
        self.opt_ebm = players.optimizers.for_ebm(self.ebm.energy_net)
        self.optimizers = {"opt_ebm": self.opt_ebm}
        reference = next(self.ebm.parameters())
        self.grid = Grid.make(grid_limit, grid_cells, reference.device, reference.dtype)
        self.cell_width = 2 * grid_limit / grid_cells
        self.jitter = jitter
        self.seed = players.seed
        self.steps = 0  # steps taken: the counter of the offsets' stream
        self._generator = torch.Generator(device=reference.device)

    def start(self, first_batch: Tensor) -> None:
        pass  # the flow is not trained, not even data-initialised

    def grid_points(self, step: int) -> Tensor:
        """The quadrature's nodes at step ``step``: cell centres, shifted with ``jitter``."""
        if not self.jitter:
            return self.grid.points
        self._generator.manual_seed(stream_seed(self.seed, f"mle-grid/{step}"))
        u = torch.rand(2, generator=self._generator, device=self.grid.points.device)
        return self.grid.points + (u - 0.5).to(self.grid.points.dtype) * self.cell_width

    @torch.no_grad()
    def log_z_hat(self, step: int, ebm: EBM | None = None) -> Tensor:
        """log Z_hat of ``ebm``'s energy (the trained EBM's by default) on the nodes of step
        ``step`` (float64), no step taken."""
        ebm = self.ebm if ebm is None else ebm
        return self.grid.log_integral(-ebm.energy(self.grid_points(step)))

    def step(self, x: Tensor, z: Tensor | None) -> StepOutput:
        with denormals_flushed():
            return self._step(x)

    def _step(self, x: Tensor) -> StepOutput:
        points = self.grid_points(self.steps)
        # Data and nodes in one batch: one pass through the energy instead of two.
        energy_data, energy_grid = self.ebm.energy(torch.cat([x, points])).split(
            [x.shape[0], points.shape[0]]
        )
        log_z = self.grid.log_integral(-energy_grid)
        loss = energy_data.mean() + log_z
        self.opt_ebm.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_ebm.step()
        log_z = log_z.detach()
        with torch.no_grad():
            self.ebm.log_z.copy_(log_z)
        self.steps += 1
        return StepOutput({"value": -loss.detach(), "log_z": log_z}, self.ebm, trained_ebm=True)

    @torch.no_grad()
    def before_evaluation(self, ebm: EBM) -> None:
        # The evaluated model's own normaliser: the EBM's, or its weight average's (whose
        # averaged c would be a mean of past log Z_hat, not its energy's log Z).
        ebm.log_z.copy_(self.log_z_hat(self.steps, ebm))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mle_steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps = state["mle_steps"]


@contextlib.contextmanager
def denormals_flushed() -> Iterator[None]:
    """CPU arithmetic on subnormal floats flushed to zero, for one step. log Z_hat's gradient
    is the grid's softmax weights, computed in float64 and cast to float32: the nodes where
    the energy stands more than about 87 nats above its minimum get weights below float32's
    smallest normal number, and every product with such a subnormal in the energy's backward
    pass is slow on x86. On spiral (experiment=truth, 64 cells) that made the step 3.5 times
    slower (14 s per 500 steps against 4 s flushed, one thread); the flushed weights are below
    1e-38 of the gradient. The flag is the process's, so it is set back off after the step:
    the other estimators' arithmetic is left as it was."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
