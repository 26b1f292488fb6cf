"""estimator=mle: the EBM by exact maximum likelihood, its normaliser a quadrature on a grid.

Known answers: without jitter its log Z_hat is the evaluation grid's log Z; with jitter the
shifted midpoint sum is unbiased for the integral; trained on Gaussian data it recovers the
Gaussian (an MLP EBM to a small KL, a quadratic energy to the data's mean and covariance).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from fce.callbacks import Figures
from fce.compose import compose
from fce.config import EBM_METRICS, ConfigError, validate
from fce.data import get_dataset, make_generator
from fce.ebm import EBM
from fce.flows import Glow
from fce.metrics import Evaluator, Grid
from fce.names import ABOVE_2D_ONLY
from fce.trainer import LoopSettings, Trainer
from tests import helpers
from tests.test_estimators import COV, MEAN, gaussian_dataset


class Quadratic(nn.Module):
    """f(x) = |S (x - m)|^2 / 2: a Gaussian energy with mean m and precision S^T S."""

    def __init__(self, mean: torch.Tensor | None = None, scale: torch.Tensor | None = None):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(2) if mean is None else mean.clone())
        self.scale = nn.Parameter(torch.eye(2) if scale is None else scale.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((x - self.mean) @ self.scale.T).pow(2).sum(-1, keepdim=True)

    def log_z(self) -> float:
        """log of the integral of exp(-f) over the whole plane: log(2 pi / |det S|)."""
        return math.log(2 * math.pi) - torch.linalg.det(self.scale).abs().log().item()


def quadratic_ebm(**kwargs) -> EBM:
    ebm = EBM(hidden=(1,))
    ebm.energy_net = Quadratic(**kwargs)
    return ebm


def make_trainer(
    ebm: EBM,
    data: torch.Tensor,
    evaluator: Evaluator,
    steps: int,
    batch: int = 500,
    lr: float = 3e-3,
    callbacks=None,
    **options,
) -> Trainer:
    options = {"grid_cells": 64, "grid_limit": 4.0, "jitter": True, **options}
    settings = LoopSettings(batch_size=batch, epochs=1000, max_steps=steps, eval_every=50, seed=0)
    return helpers.make_trainer(
        "mle",
        ebm,
        Glow(n_steps=2, width=16),
        data,
        evaluator,
        settings,
        lr_ebm=lr,
        callbacks=[Figures(plot_every=0), *(callbacks or [])],
        **options,
    )


def eight_gaussians_trainer(steps: int, callbacks=None, **options) -> Trainer:
    torch.manual_seed(0)
    ds = get_dataset("8gaussians")
    data = ds.sample(2000, make_generator(0, "train"))
    evaluator = Evaluator(ds, ds.sample(500, make_generator(0, "eval")), Grid.make(cells=32))
    return make_trainer(
        EBM(hidden=(32, 32)), data, evaluator, steps, batch=100, callbacks=callbacks, **options
    )


def params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_without_jitter_log_z_hat_is_the_evaluation_grids_log_z():
    trainer = eight_gaussians_trainer(steps=5, grid_cells=48, grid_limit=3.5, jitter=False)
    estimator, ebm = trainer.estimator, trainer.ebm
    grid = Grid.make(3.5, 48)
    for _ in range(3):  # at init and after steps: the same nodes, the evaluation's formula
        expected = grid.log_integral(-ebm.energy(grid.points)).item()
        assert torch.equal(estimator.grid_points(trainer.step), grid.points)
        assert estimator.log_z_hat(trainer.step).item() == pytest.approx(expected, abs=1e-6)
        # The step's own log Z_hat (data and nodes in one pass) is that of the energy before
        # its update, and c takes it.
        out = estimator.step(trainer.batch(trainer.step), None)
        trainer.step += 1
        assert out.signals["log_z"].item() == pytest.approx(expected, abs=1e-6)
        assert ebm.log_z.item() == out.signals["log_z"].float().item()
    # c lags the weights by that step; before an evaluation it is set to the log Z_hat of the
    # current weights, so logz_gap on the same grid is the rounding of float32 alone.
    after = grid.log_integral(-ebm.energy(grid.points)).item()
    assert abs(ebm.log_z.item() - after) > 1e-4
    trainer.evaluator = Evaluator(get_dataset("8gaussians"), trainer.data[:200], grid)
    trainer.evaluate()
    assert ebm.log_z.item() == pytest.approx(after, abs=1e-6)
    assert abs(trainer.last_metrics["logz_gap"]) < 1e-6


def test_with_jitter_the_shifted_midpoint_sum_is_unbiased():
    # A narrow Gaussian (sigma about 0.25) centred on a node of a coarse grid (h = 0.5): the
    # fixed midpoint rule overestimates its integral by 10%; the mean over shifts does not.
    scale = torch.tensor([[5.0, 0.0], [1.0, 4.0]])
    ebm = quadratic_ebm(mean=torch.tensor([0.25, -0.25]), scale=scale)
    truth = ebm.energy_net.log_z()  # the mass outside [-4, 4]^2 is below 1e-40
    data = torch.zeros(100, 2)
    evaluator = Evaluator(gaussian_dataset(), data, Grid.make(cells=16))
    common = {"steps": 1, "batch": 100, "grid_cells": 16}
    fixed = make_trainer(ebm, data, evaluator, **common, jitter=False).estimator
    jittered = make_trainer(ebm, data, evaluator, **common).estimator
    assert math.expm1(fixed.log_z_hat(0).item() - truth) > 0.09

    n = 4000
    log_z = torch.stack([jittered.log_z_hat(step) for step in range(n)])
    ratio = (log_z - truth).exp()  # Z_hat / Z of each shift
    assert ratio.std().item() > 0.05  # each shift is off by several percent ...
    assert ratio.mean().item() == pytest.approx(1.0, abs=4 * ratio.std().item() / math.sqrt(n))
    # ... and log Z_hat is biased low by Jensen: by half the relative variance of Z_hat.
    jensen = log_z.mean().item() - truth - ratio.mean().log().item()
    assert jensen == pytest.approx(-ratio.var().item() / 2, abs=2e-4)

    # One offset per step, the whole grid shifted by it, within a cell; the same on a rerun.
    shifts = [jittered.grid_points(step) - jittered.grid.points for step in range(50)]
    h = 8.0 / 16
    for shift in shifts:
        assert torch.allclose(shift, shift[0].expand_as(shift), atol=1e-5)
        assert shift[0].abs().max().item() <= h / 2
    assert len({tuple(s[0].tolist()) for s in shifts}) == 50
    assert torch.equal(jittered.grid_points(7), jittered.grid_points(7))


def test_mle_recovers_a_gaussian_with_an_mlp_energy():
    torch.manual_seed(0)
    ds = gaussian_dataset()
    data = ds.sample(20_000, torch.Generator().manual_seed(1))
    evaluator = Evaluator(ds, ds.sample(4000, torch.Generator().manual_seed(2)), Grid.make())
    trainer = make_trainer(EBM(hidden=(32, 32)), data, evaluator, steps=300)
    first = evaluator(trainer.ebm, None)
    final = trainer.run()
    assert first["kl_data_ebm"] > 0.5
    assert final["kl_data_ebm"] < 0.02
    assert final["mse_logp"] < 0.02  # c = log Z_hat: the shape and the normaliser
    assert abs(final["logz_gap"]) < 1e-3  # 64 x 64 shifted cells against 256 x 256
    # Only the EBM's metrics: the flow is not trained.
    assert set(final) == {*EBM_METRICS, "flow_step_share"} - set(ABOVE_2D_ONLY)
    values = trainer.history.history["value"][1]
    assert len(values) == 300 and sum(values[-50:]) > sum(values[:50])


def test_mle_of_a_quadratic_energy_is_the_datas_mean_and_covariance():
    ds = gaussian_dataset()
    data = ds.sample(20_000, torch.Generator().manual_seed(1))
    evaluator = Evaluator(ds, ds.sample(1000, torch.Generator().manual_seed(2)), Grid.make())
    ebm = quadratic_ebm()
    make_trainer(ebm, data, evaluator, steps=300, lr=1e-2, grid_cells=128).run()
    quadratic = ebm.energy_net
    precision = quadratic.scale.T @ quadratic.scale
    covariance = torch.linalg.inv(precision).detach()
    # The maximum-likelihood Gaussian is the sample's; batches of 500 leave SGD noise.
    torch.testing.assert_close(quadratic.mean.detach(), data.mean(0), atol=0.03, rtol=0)
    torch.testing.assert_close(covariance, torch.cov(data.T, correction=0), atol=0.03, rtol=0)
    torch.testing.assert_close(data.mean(0), MEAN, atol=0.02, rtol=0)  # and near the truth
    torch.testing.assert_close(covariance, COV, atol=0.04, rtol=0)
    assert ebm.log_z.item() == pytest.approx(quadratic.log_z(), abs=1e-3)


def test_a_run_moves_the_energy_sets_c_and_leaves_the_flow_alone():
    trainer = eight_gaussians_trainer(steps=30)
    estimator = trainer.estimator
    flow_before, ebm_before = params(trainer.flow), params(trainer.ebm.energy_net)
    # c is not in the optimizer: it is set, never stepped.
    (group,) = estimator.opt_ebm.param_groups
    assert not any(p is trainer.ebm.log_z for p in group["params"])
    final = trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(flow_before, params(trainer.flow)))
    assert not any(torch.equal(a, b) for a, b in zip(ebm_before, params(trainer.ebm.energy_net)))
    history = trainer.history.history
    # The last evaluation set c to the log Z_hat of the final weights (the next step's nodes).
    assert trainer.ebm.log_z.item() == pytest.approx(estimator.log_z_hat(30).item(), abs=1e-6)
    assert abs(final["logz_gap"]) < 0.005  # 64 x 64 shifted cells against 32 x 32
    assert set(history["trained_ebm"][1]) == {1.0} and final["flow_step_share"] == 0.0
    assert "nll_flow" not in history and "nll_ebm" in history
    assert estimator.state_dict() == {"flow_steps": 0, "mle_steps": 30}


def test_resume_from_a_checkpoint_is_bit_identical():
    full = eight_gaussians_trainer(steps=50)
    full_metrics = full.run()
    saved, checkpoints = helpers.checkpoints_in_memory(every=17)
    eight_gaussians_trainer(steps=50, callbacks=[checkpoints]).run()
    assert sorted(saved) == [17, 34, 50]
    resumed = eight_gaussians_trainer(steps=50)
    torch.manual_seed(999)  # a different global RNG must not matter
    resumed.load_state_dict(torch.load(io.BytesIO(saved[34])))
    assert resumed.estimator.steps == 34
    assert resumed.run() == full_metrics
    for name in ("value", "log_z"):
        assert resumed.history.history[name] == full.history.history[name]
    assert all(torch.equal(p, q) for p, q in zip(params(resumed.ebm), params(full.ebm)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["estimator.grid_cells=0"], "estimator.grid_cells=0: must be a positive integer"),
        (["estimator.grid_cells=4096"], "estimator.grid_cells=4096: must be at most 1,024"),
        (["estimator.grid_limit=0"], "estimator.grid_limit=0.0: must be a positive number"),
        (["estimator.grid_limit=inf"], "estimator.grid_limit=inf: must be a positive number"),
        (["estimator.grid_limit=-2"], "estimator.grid_limit=-2.0: must be a positive number"),
    ],
)
def test_bad_grid_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as raised:
        validate(compose(["estimator=mle", *overrides]))
    assert str(raised.value) == message


def test_a_bad_grid_setting_is_one_line_from_run_py(tmp_path):
    args = ["estimator=mle", "estimator.jitter=maybe", *helpers.TINY, "tracking=none"]
    done = helpers.run_cli(args, cwd=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and "estimator.jitter" in line and "maybe" in line


def test_a_step_flushes_subnormal_floats_and_then_leaves_them_be():
    """Inside MLE's step subnormal float32 values (the grid's tiny softmax weights, slow on
    x86) are zero; after it, the process computes with them again, as other estimators do."""
    from fce.estimators.mle import denormals_flushed

    tiny = torch.tensor([1e-39], dtype=torch.float32)  # below float32's smallest normal
    assert (tiny * 3).item() > 0
    with denormals_flushed():
        assert (tiny * 3).item() == 0.0
    assert (tiny * 3).item() > 0
