from __future__ import annotations

import math

import pytest
import torch

from fce.config import EBM_METRICS, EVAL_METRICS, FLOW_METRICS
from fce.data import Dataset, get_dataset, make_generator
from fce.ebm import EBM
from fce.flows import MAF
from fce.metrics import Evaluator, Grid
from fce.names import ABOVE_2D_ONLY


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
    # In EVAL_METRICS order, as full runs log; in 2-D every EBM metric but those of the
    # importance-sampled log Z and the Fisher divergence, which runs above 2-D report.
    assert list(ebm_only) == [name for name in EBM_METRICS if name not in ABOVE_2D_ONLY]
    assert ebm_only == {name: full[name] for name in ebm_only}
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


# --- both directions of the KL, and the Jensen-Shannon divergence ------------------------------
#
# Test doubles with closed forms: an isotropic Gaussian "dataset" N(m, s^2 I), the Gaussian
# flow (fce.flows.Gaussian) and an EBM with a quadratic energy. For isotropic Gaussians in k
# dimensions, KL(N(a, sa^2 I) || N(b, sb^2 I)) = k/2 (sa^2/sb^2 - 1) + |a - b|^2 / (2 sb^2)
# + k log(sb / sa), and under x ~ N(a, sa^2 I) the log-ratio log N_a(x) - log N_b(x) has the
# variance 2k c^2 + sa^2 |a - b|^2 / sb^4 with c = (sa^2 / sb^2 - 1) / 2.


def _gaussian_dataset(mean, std):
    m = torch.tensor(mean, dtype=torch.float64)

    def sample(n, gen, dtype):
        return (m + std * torch.randn(n, 2, generator=gen, dtype=torch.float64)).to(dtype)

    def log_prob(x):
        return -0.5 * ((x - m) / std).pow(2).sum(1) - math.log(2 * math.pi * std**2)

    return Dataset(f"test-gaussian-{mean}-{std}", sample, log_prob)


def _gaussian_flow(mean, std):
    from fce.flows import Gaussian

    return Gaussian(torch.tensor(mean), std * torch.eye(2)).double()


def _gaussian_ebm(mean, std):
    m = torch.tensor(mean, dtype=torch.float64)
    return FixedEnergyEBM(lambda x: 0.5 * ((x - m) / std).pow(2).sum(1), log_z=0.0).double()


def _kl(a, sa, b, sb, k=2):
    d2 = sum((u - v) ** 2 for u, v in zip(a, b, strict=True))
    return k / 2 * (sa**2 / sb**2 - 1) + d2 / (2 * sb**2) + k * math.log(sb / sa)


def _log_ratio_std(a, sa, b, sb, k=2):
    d2 = sum((u - v) ** 2 for u, v in zip(a, b, strict=True))
    c = (sa**2 / sb**2 - 1) / 2
    return math.sqrt(2 * k * c**2 + sa**2 * d2 / sb**4)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    # The test datasets' true log-densities must not land in (or come from) the user's cache.
    monkeypatch.setenv("FCE_CACHE_DIR", str(tmp_path))


def test_both_directions_of_the_kl_are_the_closed_forms_for_gaussians(own_cache):
    data, flow_, ebm_ = ((0.3, -0.2), 0.6), ((-0.1, 0.2), 0.4), ((0.2, 0.1), 0.5)
    ds = _gaussian_dataset(*data)
    n = 100_000
    x = ds.sample(n, make_generator(0, "eval"), torch.float64)
    grid = Grid.make(limit=6.0, cells=512, dtype=torch.float64)
    evaluator = Evaluator(ds, x, grid, seed=0, n_flow_samples=n)
    metrics = evaluator(_gaussian_ebm(*ebm_), _gaussian_flow(*flow_))

    # The flow, by Monte Carlo in both directions: within 4 standard errors of the truth.
    se_reverse = _log_ratio_std(*flow_, *data) / math.sqrt(n)
    se_forward = _log_ratio_std(*data, *flow_) / math.sqrt(n)
    assert metrics["kl_flow_data_se"] == pytest.approx(se_reverse, rel=0.05)
    assert abs(metrics["kl_flow_data"] - _kl(*flow_, *data)) < 4 * se_reverse
    assert abs(metrics["kl_data_flow"] - _kl(*data, *flow_)) < 4 * se_forward
    # The directions differ by far more than the noise: swapped, they would fail above.
    assert abs(_kl(*flow_, *data) - _kl(*data, *flow_)) > 20 * (se_reverse + se_forward)

    # The EBM: the reverse KL by the midpoint rule (the square holds all but 1e-20 of both
    # densities; the rule's error on a Gaussian is far below 1e-9), the forward by Monte Carlo.
    assert metrics["kl_ebm_data"] == pytest.approx(_kl(*ebm_, *data), abs=1e-9)
    se_ebm = _log_ratio_std(*data, *ebm_) / math.sqrt(n)
    assert abs(metrics["kl_data_ebm"] - _kl(*data, *ebm_)) < 4 * se_ebm
    assert abs(_kl(*ebm_, *data) - _kl(*data, *ebm_)) > 20 * se_ebm


def _js_1d(shift, std):
    """JS(N(0, std^2), N(shift, std^2)) by the trapezoid rule on a fine 1-D grid: an
    independent reference (the second coordinate of equal-variance 2-D Gaussians cancels)."""
    t = torch.linspace(-12 * std, shift + 12 * std, 400_001, dtype=torch.float64)
    p = torch.exp(-0.5 * (t / std) ** 2) / (std * math.sqrt(2 * math.pi))
    q = torch.exp(-0.5 * ((t - shift) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    m = 0.5 * (p + q)
    f = 0.5 * (torch.special.xlogy(p, p / m) + torch.special.xlogy(q, q / m))
    return torch.trapezoid(f, t).item()


def test_jensen_shannon_is_bounded_and_matches_the_one_dimensional_integral(own_cache):
    ds = _gaussian_dataset((0.0, 0.0), 0.5)
    x = ds.sample(100_000, make_generator(0, "eval"), torch.float64)
    grid = Grid.make(limit=6.0, cells=512, dtype=torch.float64)
    evaluator = Evaluator(ds, x, grid, seed=1)
    # The same density: every term is log 1.
    same = evaluator(_gaussian_ebm((0.0, 0.0), 0.5), _gaussian_flow((0.0, 0.0), 0.5))
    for name in ("js_flow_data", "js_ebm_data", "kl_flow_data", "kl_ebm_data"):
        assert same[name] == pytest.approx(0.0, abs=1e-9), name
    # Shifted by one standard deviation along x1.
    shifted = evaluator(_gaussian_ebm((0.5, 0.0), 0.5), _gaussian_flow((0.5, 0.0), 0.5))
    expected = _js_1d(0.5, 0.5)
    assert 0.05 < expected < 0.2
    assert shifted["js_ebm_data"] == pytest.approx(expected, abs=1e-7)
    # Each Monte-Carlo term lies in [-3, log 2] here, so each mean's error is below 0.01.
    assert shifted["js_flow_data"] == pytest.approx(expected, abs=0.01)
    # Far apart: both reach log 2, the bound; the KL keeps growing (a closed form again).
    far = evaluator(_gaussian_ebm((3.0, 3.0), 0.2), _gaussian_flow((3.0, 3.0), 0.2))
    # (to their overlap: the two densities cross where both are below e^-18)
    assert far["js_ebm_data"] == pytest.approx(math.log(2), abs=1e-7)
    assert far["js_flow_data"] == pytest.approx(math.log(2), abs=1e-7)
    assert far["js_ebm_data"] <= math.log(2) and far["js_flow_data"] <= math.log(2)
    assert far["kl_ebm_data"] == pytest.approx(_kl((3.0, 3.0), 0.2, (0.0, 0.0), 0.5), rel=1e-9)


def _box_dataset():
    """Uniform on [0, 2] x [0, 1]: zero density elsewhere, as on checkerboard's empty squares."""

    def sample(n, gen, dtype):
        return (
            torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([2.0, 1.0])
        ).to(dtype)

    def log_prob(x):
        inside = (x[:, 0] >= 0) & (x[:, 0] < 2) & (x[:, 1] >= 0) & (x[:, 1] < 1)
        log_density = torch.full_like(x[:, 0], -math.log(2.0))
        return torch.where(inside, log_density, torch.full_like(log_density, -math.inf))

    return Dataset("test-box", sample, log_prob)


def test_mass_where_the_data_has_none_makes_the_reverse_kl_infinite(own_cache):
    ds = _box_dataset()
    x = ds.sample(10_000, make_generator(0, "eval"), torch.float64)
    # Cells of side 1/4 whose edges fall on the boxes' edges: the midpoint rule is exact.
    grid = Grid.make(limit=4.0, cells=32, dtype=torch.float64)
    # The EBM uniform on [1, 3] x [0, 1]: half its mass where p_d is 0. On [1, 2] x [0, 1] the
    # two densities are equal (1/2); elsewhere one of them is 0 and the mixture is half the
    # other, so JS = 1/2 (1/2 log 2 + 1/2 log 2) = (log 2) / 2 and TV = 1/2.
    inside = (torch.tensor([1.0, 0.0]), torch.tensor([3.0, 1.0]))

    def box_energy(p):
        within = ((p >= inside[0]) & (p < inside[1])).all(1)
        return torch.where(within, 0.0, math.inf).to(p.dtype)

    ebm = FixedEnergyEBM(box_energy, log_z=0.0).double()
    metrics = Evaluator(ds, x, grid, seed=0)(ebm, _gaussian_flow((1.0, 0.5), 0.5))
    assert metrics["kl_ebm_data"] == math.inf
    assert metrics["js_ebm_data"] == pytest.approx(0.5 * math.log(2), abs=1e-12)
    assert metrics["tv_ebm"] == pytest.approx(0.5, abs=1e-12)
    # The flow is a Gaussian: positive everywhere, so some of its samples fall outside.
    assert metrics["kl_flow_data"] == math.inf and metrics["kl_flow_data_se"] == math.inf
    assert 0 < metrics["js_flow_data"] < math.log(2)


def test_evaluation_leaves_the_global_random_state_alone_and_repeats_itself(own_cache):
    ds = get_dataset("rings")
    x = ds.sample(1000, make_generator(0, "eval"))
    torch.manual_seed(123)
    ebm, flow = EBM(hidden=(8,)), small_flow()
    evaluator = Evaluator(ds, x, Grid.make(cells=32), seed=0)
    state = torch.get_rng_state()
    first = evaluator(ebm, flow)
    # The flow's samples come from the evaluation's own noise, drawn once: the training's
    # streams (and the global one) are untouched, and every call sees the same samples.
    assert torch.equal(torch.get_rng_state(), state)
    assert evaluator(ebm, flow) == first
    assert Evaluator(ds, x, Grid.make(cells=32), seed=0)(ebm, flow) == first
    other_seed = Evaluator(ds, x, Grid.make(cells=32), seed=1)(ebm, flow)
    assert other_seed["kl_flow_data"] != first["kl_flow_data"]
    assert other_seed["kl_data_flow"] == first["kl_data_flow"]


def test_a_checkerboard_run_logs_an_infinite_reverse_kl_without_diverging(own_cache):
    from fce.compose import compose
    from fce.factory import build_trainer

    cfg = compose(
        [
            "dataset=checkerboard",
            "dataset.n_samples=400",
            "train.batch_size=200",
            "train.max_steps=2",
            "train.eval_every=1",
            "eval.n_points=1000",
            "eval.grid_cells=32",
            "device=cpu",
        ]
    )
    trainer = build_trainer(cfg, torch.device("cpu"))
    trainer.run()  # evaluates at steps 0, 1 and 2: a DivergenceError would end it
    metrics = trainer.last_metrics
    # Both models have a density positive everywhere; checkerboard's is 0 on half the square.
    assert metrics["kl_ebm_data"] == metrics["kl_flow_data"] == math.inf
    assert metrics["kl_flow_data_se"] == math.inf
    for name in ("js_ebm_data", "js_flow_data"):
        assert 0 < metrics[name] < math.log(2), name
    assert math.isfinite(metrics["kl_data_ebm"]) and math.isfinite(metrics["kl_data_flow"])
