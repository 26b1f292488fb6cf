from __future__ import annotations

import math

import pytest
import torch

from fce.config import EBM_METRICS, EVAL_METRICS, FLOW_METRICS
from fce.data import Dataset, get_dataset, make_generator
from fce.ebm import EBM
from fce.flows import MAF
from fce.metrics import Evaluator, Grid


class FixedEnergyEBM(EBM):
    """An EBM whose energy is a given function, with a chosen c."""

    def __init__(self, energy_fn, log_z: float) -> None:
        super().__init__(hidden=(1,), log_z_init=log_z)
        self.energy_fn = energy_fn

    def energy(self, x):
        return self.energy_fn(x)


def small_flow():
    return MAF(n_blocks=1, hidden=4)


def test_grid_integrates_a_gaussian():
    grid = Grid.make(limit=8.0, cells=256, dtype=torch.float64)
    log_f = -0.5 * grid.points.pow(2).sum(1)
    assert grid.log_integral(log_f).item() == pytest.approx(math.log(2 * math.pi), abs=1e-6)
    assert grid.points.shape == (256 * 256, 2)
    assert grid.points.min().item() == pytest.approx(-8 + 8 / 256)


def test_true_density_as_ebm_gives_zero_mse_and_kl():
    ds = get_dataset("8gaussians")
    x = ds.sample(5000, make_generator(0, "eval"), torch.float64)
    ebm = FixedEnergyEBM(lambda p: -ds.log_prob(p), log_z=0.0).double()
    metrics = Evaluator(ds, x, Grid.make(dtype=torch.float64))(ebm, small_flow().double())
    assert metrics["mse_logp"] == pytest.approx(0.0, abs=1e-20)
    # [-4, 4]^2 holds all but ~2e-4 of the mass: log Z_grid is the log of that mass, exactly.
    log_mass = math.log(sum(_box_mass(c) for c in _centres()) / 8)
    assert -2.5e-4 < log_mass < -2e-4
    # (to the midpoint rule's error at the cut edges, ~1e-6)
    assert metrics["logz_gap"] == pytest.approx(-log_mass, abs=2e-6)
    assert metrics["kl_data_ebm"] == pytest.approx(log_mass, abs=2e-6)
    # With c off by 0.3, mse is 0.09 and logz_gap 0.3; the grid-normalised KL is unchanged.
    ebm.log_z.data.fill_(0.3)
    shifted = Evaluator(ds, x, Grid.make(dtype=torch.float64))(ebm, small_flow().double())
    assert shifted["mse_logp"] == pytest.approx(0.09, rel=1e-9)
    assert shifted["logz_gap"] == pytest.approx(0.3 + metrics["logz_gap"], abs=1e-12)
    assert shifted["kl_data_ebm"] == pytest.approx(metrics["kl_data_ebm"], abs=1e-12)


def _centres():
    r = 2 * math.sqrt(2)
    return [(r * math.cos(k * math.pi / 4), r * math.sin(k * math.pi / 4)) for k in range(8)]


def _box_mass(centre, limit=4.0):
    scale = 0.5  # std * sqrt(2) for std = 0.5 / sqrt(2)

    def interval(m):
        return 0.5 * (math.erf((limit - m) / scale) + math.erf((limit + m) / scale))

    return interval(centre[0]) * interval(centre[1])


def test_standard_normal_ebm_has_closed_form_nll():
    # A dataset without a density: only the model metrics exist.
    ds = Dataset("no-density", get_dataset("spiral").sample_fn)
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0], [-0.5, 0.5]], dtype=torch.float64)
    ebm = FixedEnergyEBM(lambda p: 0.5 * p.pow(2).sum(1), log_z=1.0).double()
    metrics = Evaluator(ds, x, Grid.make(limit=8.0, cells=512, dtype=torch.float64))(
        ebm, small_flow().double()
    )
    expected = math.log(2 * math.pi) + 0.5 * x.pow(2).sum(1).mean().item()
    assert metrics["nll_ebm"] == pytest.approx(expected, abs=1e-6)
    assert metrics["logz_gap"] == pytest.approx(1.0 - math.log(2 * math.pi), abs=1e-6)
    assert set(metrics) == {"nll_ebm", "nll_flow", "logz_gap"}


def test_nll_flow_is_the_exact_flow_nll():
    ds = get_dataset("rings")
    x = ds.sample(1000, make_generator(0, "eval"), torch.float64)
    flow = small_flow().double()
    ebm = EBM(hidden=(8,)).double()
    metrics = Evaluator(ds, x, Grid.make(dtype=torch.float64))(ebm, flow)
    assert metrics["nll_flow"] == pytest.approx(-flow.log_prob(x).mean().item(), rel=1e-12)


def test_without_an_ebm_only_the_flow_metrics_are_computed():
    ds = get_dataset("rings")
    x = ds.sample(1000, make_generator(0, "eval"), torch.float64)
    flow = small_flow().double()

    evaluator = Evaluator(ds, x, Grid.make(dtype=torch.float64))
    flow_only = evaluator(None, flow)
    full = evaluator(EBM(hidden=(8,)).double(), flow)
    assert list(flow_only) == list(FLOW_METRICS)  # in EVAL_METRICS order, as full runs log
    assert flow_only == {name: full[name] for name in FLOW_METRICS}
    assert list(full) == [name for name in EVAL_METRICS if name in full]


def test_without_a_flow_only_the_ebm_metrics_are_computed():
    ds = get_dataset("rings")
    x = ds.sample(1000, make_generator(0, "eval"), torch.float64)
    ebm = EBM(hidden=(8,)).double()
    evaluator = Evaluator(ds, x, Grid.make(dtype=torch.float64))
    ebm_only = evaluator(ebm, None)
    full = evaluator(ebm, small_flow().double())
    assert list(ebm_only) == list(EBM_METRICS)  # in EVAL_METRICS order, as full runs log
    assert ebm_only == {name: full[name] for name in EBM_METRICS}
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluator(None, None)


def test_grid_densities_have_image_shape_and_normalised_ebm():
    ds = get_dataset("8gaussians")
    grid = Grid.make(cells=64)
    evaluator = Evaluator(ds, ds.sample(100, make_generator(0, "eval")), grid)
    log_q, log_p = evaluator.grid_log_densities(EBM(hidden=(8,)), small_flow())
    assert log_q.shape == log_p.shape == (64, 64)
    assert (log_p.exp().sum() * math.exp(grid.log_cell_area)).item() == pytest.approx(1.0)


@pytest.mark.parametrize("fn_name", ["energy", "log_prob"])
def test_chunked_evaluation_equals_one_pass_bitwise(fn_name):
    # With sizes that are multiples of 8, as the defaults are (20,000 points, 256 x 256 grid
    # cells), every row meets the same matmul kernel as in one pass; rows of an odd
    # remainder can differ in the last bit on this CPU.
    from fce.metrics import EVAL_CHUNK, _chunked

    torch.manual_seed(0)
    fn = EBM().energy if fn_name == "energy" else small_flow().log_prob
    x = torch.randn(1000, 2)
    with torch.no_grad():
        whole = fn(x)
        for chunk in (8, 256, 1000, EVAL_CHUNK):
            assert torch.equal(_chunked(fn, x, chunk), whole)
