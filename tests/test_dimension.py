"""Above two dimensions: the datasets' products, their scores, and the EBM's scores without a
grid (log Z by importance sampling, checked against the grid in 2-D and against an energy
whose normaliser is known at d = 16; the Fisher divergence)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from fce.compose import compose
from fce.config import validate
from fce.data import DATASETS, DataSource, get_dataset, make_generator, product
from fce.errors import ConfigError
from fce.factory import build_trainer, make_evaluator
from fce.metrics import (
    AnnealedNormaliser,
    Evaluator,
    Grid,
    ImportanceNormaliser,
    fisher_divergence,
    log_histogram,
)


def test_one_copy_is_the_dataset_itself():
    for name, dataset in DATASETS.items():
        assert product(dataset, 1) is dataset, name
        assert DataSource(name, 10).dataset is dataset


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_a_product_is_its_copies_side_by_side(name):
    base = get_dataset(name)
    k = 3
    prod = product(base, k)
    assert prod.dim == 2 * k and prod.name == f"{name}-d{2 * k}"
    x = prod.sample(50, make_generator(1, "t"), torch.float64)
    # The product's draw is the base's draw of n k points, grouped.
    same = base.sample(150, make_generator(1, "t"), torch.float64)
    assert torch.equal(x, same.reshape(50, 2 * k))
    copies = x.reshape(50, k, 2)
    expected = sum(base.log_prob(copies[:, i]) for i in range(k))
    torch.testing.assert_close(prod.log_prob(x), expected, rtol=1e-12, atol=0)
    assert prod.has_score == base.has_score
    if base.has_score:
        expected = torch.cat([base.score(copies[:, i]) for i in range(k)], dim=1)
        torch.testing.assert_close(prod.score(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", [n for n, d in sorted(DATASETS.items()) if d.has_score])
def test_a_score_is_the_gradient_of_the_exact_log_density(name):
    # Against central differences of the density the suite scores with (1e-6 in float64).
    dataset = get_dataset(name)
    x = dataset.sample(200, make_generator(2, "t"), torch.float64)
    h = 1e-5
    steps = torch.eye(2, dtype=torch.float64) * h
    numeric = torch.stack(
        [(dataset.log_prob(x + e) - dataset.log_prob(x - e)) / (2 * h) for e in steps], dim=1
    )
    torch.testing.assert_close(dataset.score(x), numeric, rtol=1e-6, atol=1e-6)


def test_datasets_without_a_smooth_density_have_no_score():
    for name in ("checkerboard", "pinwheel"):
        with pytest.raises(NotImplementedError, match="no score"):
            get_dataset(name).score(torch.zeros(1, 2))


@pytest.mark.parametrize("dim", [0, 3, 5])
def test_a_source_refuses_an_odd_or_empty_dimension(dim):
    with pytest.raises(ValueError, match=f"dim={dim}: must be an even integer"):
        DataSource("8gaussians", 10, dim)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset.dim=7", "dataset.dim=7: must be an even integer in [2, 64]"),
        ("dataset.dim=66", "dataset.dim=66: must be an even integer in [2, 64]"),
        ("dataset.dim=-2", "dataset.dim=-2: must be an even integer"),
        (
            "dataset.dim=4 eval.logz_samples=50",
            "eval.min_ess=100: more than eval.logz_samples=50, so no log Z would ever be",
        ),
        ("dataset.dim=16 eval.n_points=10", "eval.n_points=10: must exceed dataset.dim=16"),
        (
            "dataset.dim=4 eval.logz=annealed eval.ais_chains=50",
            "eval.min_ess=100: more than eval.ais_chains=50, so annealed importance sampling",
        ),
        ("eval.logz=grid", "eval.logz='grid': unknown; choose one of: importance, annealed"),
    ],
)
def test_the_config_refuses_a_bad_dimension(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose(override.split()))


class QuadraticEnergy(nn.Module):
    """f(x) = 1/2 (x - m)^T S^-1 (x - m): log Z = d/2 log 2 pi + 1/2 log det S, exactly."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor) -> None:
        super().__init__()
        self.mean, self.precision = mean, torch.linalg.inv(cov)
        self.log_z_exact = 0.5 * (mean.numel() * math.log(2 * math.pi) + torch.logdet(cov))

    def forward(self, x):
        centred = x - self.mean
        return 0.5 * ((centred @ self.precision) * centred).sum(1)


def data_moments(dataset, n=20_000):
    x = dataset.sample(n, make_generator(0, "eval"), torch.float64)
    return x, x.mean(0), torch.cov(x.T, correction=0)


def test_importance_sampled_log_z_meets_the_grid_in_2d():
    dataset = get_dataset("8gaussians")
    x, _, _ = data_moments(dataset)

    def energy(points):  # a smooth energy near the data's, not equal to it
        return -0.8 * dataset.log_prob(points) + 0.05 * (points - 0.3).pow(2).sum(1)

    grid = Grid.make(limit=9.0, cells=1024, dtype=torch.float64)
    exact = grid.log_integral(-energy(grid.points))
    estimate = ImportanceNormaliser(dataset, x, n=20_000, seed=3)(energy)
    error = (estimate.value - exact).abs().item()
    assert estimate.ess > 1000
    assert error < 4 * estimate.se.item() + 1e-3, (error, estimate.se.item())


@pytest.mark.parametrize("name", ["8gaussians", "rings"])
def test_importance_sampled_log_z_of_a_known_normaliser_at_d16(name):
    dataset = product(get_dataset(name), 8)
    x, mean, cov = data_moments(dataset)
    normaliser = ImportanceNormaliser(dataset, x, n=20_000, seed=3)
    # An energy near the data's on each copy, not equal to it: log Z is 8 times its 2-D
    # value on a fine grid.
    base = get_dataset(name)

    def near(points):
        return -0.8 * base.log_prob(points) + 0.05 * (points - 0.3).pow(2).sum(1)

    grid = Grid.make(limit=9.0, cells=1024, dtype=torch.float64)
    exact = 8 * grid.log_integral(-near(grid.points)).item()
    estimate = normaliser(lambda p: near(p.reshape(-1, 2)).reshape(-1, 8).sum(1))
    error = abs(estimate.value.item() - exact)
    assert estimate.ess >= normaliser.min_ess
    assert error < 4 * estimate.se.item(), (error, estimate.se.item(), estimate.ess.item())
    # A Gaussian energy: the data's own moments, known log Z; its error is within 4 se.
    quadratic = QuadraticEnergy(mean, cov)
    estimate = normaliser(quadratic)
    error = (estimate.value - quadratic.log_z_exact).abs().item()
    assert estimate.ess >= normaliser.min_ess
    assert error < 4 * estimate.se.item(), (error, estimate.se.item(), estimate.ess.item())
    # The data's own energy, -log p_d (Z = 1): the data half of the proposal bounds the
    # weights by 2, so the estimate is tight.
    truth = normaliser(lambda points: -dataset.log_prob(points))
    assert abs(truth.value.item()) < 4 * truth.se.item() < 0.05
    assert truth.ess > 5_000


@pytest.mark.parametrize("name", ["8gaussians", "rings"])
@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_a_deep_narrow_mode_near_the_datas_centre_is_found(name, offset):
    # What NCE against a Gaussian can grow in 16 dimensions: mass near the centre of the
    # data, where the Gaussian's draws never land. Here p_d plus e^20 times
    # N(mean + offset, 0.2^2 I): log Z = log(1 + e^20), exactly.
    dataset = product(get_dataset(name), 8)
    x, mean, _ = data_moments(dataset)
    centre = mean + offset
    spike = torch.distributions.MultivariateNormal(centre, 0.04 * torch.eye(16, dtype=mean.dtype))

    def energy(points):
        points = points.double()
        return -torch.logaddexp(dataset.log_prob(points), 20.0 + spike.log_prob(points))

    exact = math.log1p(math.exp(20.0))
    fixed = ImportanceNormaliser(dataset, x, n=20_000, seed=3, modes=0)(energy)
    assert fixed.value < exact - 10  # a fixed proposal never sees it
    found = ImportanceNormaliser(dataset, x, n=20_000, seed=3)(energy)
    assert found.ess >= 100
    assert abs(found.value.item() - exact) < 4 * found.se.item() + 1e-3, (found, exact)


def test_the_fisher_divergence_is_zero_at_the_truth_and_exact_for_a_gaussian():
    dataset = product(get_dataset("8gaussians"), 4)
    x, mean, cov = data_moments(dataset, 2_000)
    score = dataset.score(x)
    truth = fisher_divergence(lambda p: -dataset.log_prob(p), x, score)
    assert truth.item() < 1e-16
    quadratic = QuadraticEnergy(mean, cov)
    expected = 0.5 * (-(x - mean) @ quadratic.precision - score).pow(2).sum(1).mean()
    torch.testing.assert_close(fisher_divergence(quadratic, x, score), expected)


class BroadEnergy(nn.Module):
    """exp(-||x|| / 10): its mass lies at radii around 10 d, far beyond every part of the
    proposal (its one mode, at the origin, is the data's centre)."""

    log_z = nn.Parameter(torch.tensor(0.0))

    def energy(self, x):
        return 0.1 * x.norm(dim=1)


def test_above_2d_an_untrusted_log_z_reports_no_metric_that_needs_it():
    settings = compose(["dataset.dim=8", "eval.n_points=2000", "eval.logz_samples=4000"]).eval
    dataset = DataSource("8gaussians", 10, 8).dataset
    x = dataset.sample(2000, make_generator(0, "eval"))
    evaluator = make_evaluator(dataset, x, settings)
    assert evaluator.grid is None
    values = evaluator(BroadEnergy(), None)
    assert values["logz_ess"] < settings.min_ess
    assert {"nll_ebm", "kl_data_ebm", "logz_gap"}.isdisjoint(values)
    assert {"mse_logp", "mse_logp_centered", "fisher_ebm", "logz_se"} <= set(values)
    assert {"logz_ais_ess", "logz_ais_se"}.isdisjoint(values)


class OffEnergy(nn.Module):
    """A bump off the data, exp(-5 ||x - 6||^2): log Z = d/2 log(pi / 5)."""

    log_z = nn.Parameter(torch.tensor(0.0))

    def energy(self, x):
        return 5 * (x - 6.0).pow(2).sum(1)


def test_annealing_reports_its_own_log_z_with_importance_samplings_beside_it():
    settings = compose(
        [
            "dataset.dim=8",
            "eval.n_points=2000",
            "eval.logz_samples=4000",
            "eval.logz=annealed",
            "eval.ais_chains=512",
            "eval.ais_steps=1000",
        ]
    ).eval
    dataset = DataSource("8gaussians", 10, 8).dataset
    x = dataset.sample(2000, make_generator(0, "eval"))
    evaluator = make_evaluator(dataset, x, settings)
    energy = OffEnergy()
    values = evaluator(energy, None)
    annealed = evaluator.annealer(energy.energy)
    importance = evaluator.normaliser(energy.energy)
    assert values["logz_ais_ess"] == annealed.ess.item() >= settings.min_ess
    assert values["logz_ais_minus_is"] == (annealed.value - importance.value).item()
    # Both trusted: the larger log Z is the one the metrics use (c = 0, so log Z = -gap) ...
    assert -values["logz_gap"] == max(annealed.value.item(), importance.value.item())
    # ... and annealing alone is within its error of OffEnergy's exact log Z.
    error = abs(annealed.value.item() - 4 * math.log(math.pi / 5))
    assert error < 4 * annealed.se.item() + 1e-3, (error, annealed.se.item())
    assert {"nll_ebm", "kl_data_ebm", "logz_ess", "logz_se"} <= set(values)


def test_a_small_proposal_still_has_every_part():
    settings = compose(
        ["dataset.dim=4", "eval.n_points=500", "eval.logz_samples=100", "eval.min_ess=10"]
    ).eval
    dataset = DataSource("8gaussians", 10, 4).dataset
    x = dataset.sample(500, make_generator(0, "eval"))
    values = make_evaluator(dataset, x, settings)(TruthEnergy(dataset), None)
    assert values["logz_ess"] >= 10 and abs(values["logz_gap"]) < 4 * values["logz_se"]


def test_by_default_only_importance_sampling_runs():
    settings = compose(["dataset.dim=4", "eval.n_points=2000", "eval.logz_samples=4000"]).eval
    dataset = DataSource("8gaussians", 10, 4).dataset
    x = dataset.sample(2000, make_generator(0, "eval"))
    values = make_evaluator(dataset, x, settings)(TruthEnergy(dataset), None)
    assert values["logz_ess"] >= settings.min_ess
    assert "logz_ais_ess" not in values
    assert abs(values["logz_gap"]) < 4 * values["logz_se"]


class TruthEnergy(nn.Module):
    """-log p_d, with c = 0: log Z = 0."""

    log_z = nn.Parameter(torch.tensor(0.0))

    def __init__(self, dataset) -> None:
        super().__init__()
        self.dataset = dataset

    def energy(self, x):
        return -self.dataset.log_prob(x.double()).to(x.dtype)


@pytest.mark.parametrize("name", ["8gaussians", "rings"])
def test_annealed_log_z_of_known_normalisers_at_d16(name):
    dataset = product(get_dataset(name), 8)
    x, mean, cov = data_moments(dataset)
    annealer = AnnealedNormaliser(x.float(), chains=512, steps=1000, seed=3)
    # A Gaussian energy with the data's moments, and one narrower and off-centre, where
    # importance sampling from the data's proposal loses its effective sample size.
    for energy in (
        QuadraticEnergy(mean, cov),
        QuadraticEnergy(mean + 1.0, 0.25 * torch.eye(16, dtype=torch.float64)),
    ):
        estimate = annealer(lambda p, e=energy: e(p.double()))
        error = (estimate.value - energy.log_z_exact).abs().item()
        assert estimate.ess >= annealer.min_ess
        assert error < 4 * estimate.se.item() + 1e-3, (error, estimate.se.item())
    # There a fixed proposal (the data and the widened Gaussian) is no estimate at all (its
    # weights' ESS is about 1); the modes' part of the proposal finds the energy's mass ...
    fixed = ImportanceNormaliser(dataset, x, n=20_000, seed=3, modes=0)(energy)
    assert fixed.ess < 10
    found = ImportanceNormaliser(dataset, x, n=20_000, seed=3)(energy)
    assert found.ess >= 1000
    assert (found.value - energy.log_z_exact).abs() < 4 * found.se + 1e-3
    # ... and the same annealed call twice gives the same estimate: an evaluation is a
    # function of the EBM alone.
    again = annealer(lambda p, e=energy: e(p.double()))
    assert again.value == estimate.value


def test_a_run_above_2d_trains_every_flow_and_reports_honest_scores():
    for flow in ("glow", "maf", "spline"):
        cfg = compose(
            [
                "dataset.dim=4",
                f"flow={flow}",
                "dataset.n_samples=2000",
                "train.batch_size=200",
                "train.max_steps=20",
                "train.eval_every=10",
                "eval.n_points=1000",
                "eval.flow_samples=500",
                "eval.logz_samples=2000",
                "device=cpu",
            ]
        )
        trainer = build_trainer(cfg, torch.device("cpu"))
        assert trainer.ebm.energy_net[0].in_features == 4 and trainer.flow.dim == 4
        metrics = trainer.run()
        for name in ("kl_data_flow", "kl_flow_data", "mse_logp_centered", "fisher_ebm"):
            assert math.isfinite(metrics[name]), (flow, name)
        assert metrics["logz_ess"] > 0
        assert "tv_ebm" not in metrics and "kl_ebm_data" not in metrics


def test_an_energy_on_the_noise_makes_nce_logit_the_energy_alone():
    # ebm.base=noise: log p_theta = log q - f - c, so NCE's logit log p_theta - log q is -f - c;
    # the noise is frozen and not among the weights the EBM's optimizer steps.
    cfg = compose(
        [
            "estimator=nce",
            "ebm.base=noise",
            "dataset.dim=4",
            "dataset.n_samples=2000",
            "train.batch_size=200",
            "train.max_steps=20",
            "train.eval_every=10",
            "eval.n_points=500",
            "eval.logz_samples=2000",
            "device=cpu",
        ]
    )
    validate(cfg)
    trainer = build_trainer(cfg, torch.device("cpu"))
    ebm, noise = trainer.ebm, trainer.estimator.flow
    assert ebm.base_density is noise
    before = {k: v.clone() for k, v in noise.state_dict().items()}
    stepped = {id(p) for group in trainer.estimator.opt_ebm.param_groups for p in group["params"]}
    assert stepped == {id(p) for p in [*ebm.energy_net.parameters(), ebm.log_z]}
    metrics = trainer.run()
    x = trainer.data[:100]
    with torch.no_grad():
        logit = ebm(x) - noise.log_prob(x)
        expected = -ebm.energy_net(x).squeeze(-1) - ebm.log_z
    torch.testing.assert_close(logit, expected, rtol=1e-5, atol=1e-5)
    for key, value in noise.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert math.isfinite(metrics["mse_logp_centered"])


def test_an_energy_on_the_noise_needs_an_estimator_with_one():
    for estimator in ("fce", "flow_mle", "mle"):
        with pytest.raises(ConfigError, match=re.escape("ebm.base=noise: puts the energy on")):
            validate(compose([f"estimator={estimator}", "ebm.base=noise"]))


@pytest.mark.parametrize(("choices", "bad"), [([2, 8, 16], None), ([2, 5], 5)])
def test_a_study_can_search_the_dimension_and_a_bad_one_is_refused_first(tmp_path, choices, bad):
    from fce.sweep_space import check_space_against_run, load_sweep
    from tests.helpers import ROOT

    space = tmp_path / "dims.yaml"
    space.write_text(
        "objective: mse_logp_centered\ndirection: minimize\n"
        f"params:\n  dataset.dim: {{type: categorical, choices: {choices}}}\n"
    )
    spaces, defaults = ROOT / "sweeps" / "spaces", ROOT / "sweeps" / "defaults.yaml"
    settings = load_sweep(str(space), spaces, defaults, [])
    if bad is None:
        check_space_against_run(settings, compose, [], ROOT / "conf")
        return
    with pytest.raises(ConfigError, match=re.escape(f"dataset.dim can be {bad}: dataset.dim=")):
        check_space_against_run(settings, compose, [], ROOT / "conf")


def test_above_2d_the_density_panel_shows_the_first_pairs_marginals():
    cfg = compose(
        [
            "dataset.dim=6",
            "dataset.n_samples=2000",
            "eval.n_points=500",
            "eval.logz_samples=4000",
            "device=cpu",
        ]
    )
    trainer = build_trainer(cfg, torch.device("cpu"))
    data = trainer.data[:1000]
    rows = trainer.evaluator.panel_rows(trainer.evaluated_ebm, trainer.flow, data, cells=32)
    assert [row[0] for row in rows] == ["8gaussians-d6: x1, x2", "8gaussians-d6: x3, x4"]
    width = 2 * trainer.evaluator.panel_limit / 32
    for i, (_, points, log_q, log_p) in enumerate(rows):
        assert torch.equal(points, data[:, 2 * i : 2 * i + 2])
        for log_density in (log_q, log_p):
            assert log_density.shape == (32, 32)
            mass = log_density.exp().sum().item() * width**2  # the share inside the square
            assert 0 < mass <= 1 + 1e-9  # normalised over every point, inside or out
    # The flow's marginal is the histogram of its samples' first two coordinates.
    samples = trainer.flow.transform_noise(trainer.evaluator.panel_noise)[0].detach()
    inside = (samples[:, :2].abs() < trainer.evaluator.panel_limit).all(1).double().mean()
    assert rows[0][2].exp().sum().item() * width**2 == pytest.approx(inside.item(), rel=1e-9)


def test_in_2d_the_fisher_divergence_is_opt_in_and_leaves_the_other_metrics_alone():
    base = ["dataset.n_samples=2000", "eval.n_points=500", "eval.grid_cells=32", "device=cpu"]
    off = build_trainer(compose(base), torch.device("cpu"))
    on = build_trainer(compose([*base, "eval.fisher=true"]), torch.device("cpu"))
    plain, with_fisher = off.metrics(), on.metrics()
    assert "fisher_ebm" not in plain
    assert with_fisher.pop("fisher_ebm") > 0
    assert with_fisher == plain


@pytest.mark.parametrize(
    ("dim", "objective", "message"),
    [
        (2, "logz_ess", "sweep.objective=logz_ess: reported above 2-D only, and dataset.dim=2"),
        (2, "fisher_ebm", "reported above 2-D only (fisher_ebm with eval.fisher=true)"),
        (8, "tv_ebm", "needs the EBM normalised on a 2-D grid, and dataset.dim=8"),
    ],
)
def test_a_study_objective_its_dimension_never_reports_is_refused(
    tmp_path, dim, objective, message
):
    from fce.sweep_space import check_space_against_run, load_sweep
    from tests.helpers import ROOT

    space = tmp_path / "space.yaml"
    space.write_text(
        f"objective: {objective}\ndirection: minimize\n"
        "params:\n  optimizer.lr_ebm: {type: float, low: 1.0e-4, high: 1.0e-2}\n"
    )
    spaces, defaults = ROOT / "sweeps" / "spaces", ROOT / "sweeps" / "defaults.yaml"
    settings = load_sweep(str(space), spaces, defaults, [])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_space_against_run(settings, compose, [f"dataset.dim={dim}"], ROOT / "conf")


TINY = [
    "dataset.n_samples=2000",
    "train.batch_size=200",
    "train.max_steps=4",
    "train.eval_every=4",
    "eval.n_points=500",
    "eval.logz_samples=2000",
    "device=cpu",
]


def test_a_noise_flow_of_another_dimension_is_refused_in_one_line(tmp_path):
    from omegaconf import OmegaConf

    from fce import checkpoint

    cfg = compose(["estimator=flow_mle", "train.ema_decay=0", *TINY])
    trainer = build_trainer(cfg, torch.device("cpu"))
    trainer.run()
    state = {"trainer": trainer.state_dict(), "config": OmegaConf.to_container(cfg)}
    path = checkpoint.save(state, tmp_path, trainer.step)
    noise = ["estimator=nce", "estimator.noise=flow", f"estimator.noise_checkpoint={path}"]
    nce = compose([*noise, "dataset.dim=4", *TINY])
    with pytest.raises(ConfigError, match=re.escape("its flow is of dataset.dim=2, this run")):
        build_trainer(nce, torch.device("cpu"))


class PlanarToyFlow(nn.Module):
    """A user's flow with no ``dim`` parameter: 2-D only."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale


def test_a_class_without_dim_is_refused_above_2d_in_one_line(tmp_path):
    (tmp_path / "flow").mkdir()
    (tmp_path / "flow" / "toy.yaml").write_text(
        f"_target_: {__name__}.PlanarToyFlow\nscale: 2.0\n"
    )
    where = f"hydra.searchpath=[file://{tmp_path}]"
    cfg = compose(["flow=toy", where, "dataset.dim=4", *TINY])
    message = f"flow=toy: {__name__}.PlanarToyFlow takes no dim (2-D only), and this run's"
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_trainer(cfg, torch.device("cpu"))


class NearEnergy(nn.Module):
    """An energy near the 2-D data's, not equal to it, with a log_z for the evaluator."""

    def __init__(self, dataset) -> None:
        super().__init__()
        self.dataset = dataset
        self.log_z = nn.Parameter(torch.tensor(0.0, dtype=torch.float64))

    def energy(self, x):
        return -0.8 * self.dataset.log_prob(x) + 0.05 * (x - 0.3).pow(2).sum(1)


def test_in_2d_the_sampled_scores_meet_the_grids():
    # The path runs above 2-D take, run on 2-D data: its KL meets the grid's within the
    # estimate's standard errors (the grid's own error here is below 1e-3).
    dataset = get_dataset("8gaussians")
    x = dataset.sample(5000, make_generator(0, "eval"), torch.float64)
    energy = NearEnergy(dataset)
    grid = Grid.make(limit=6.0, cells=512, dtype=torch.float64)
    on_grid = Evaluator(dataset, x, grid)(energy, None)
    normaliser = ImportanceNormaliser(dataset, x, n=20_000, seed=1)
    sampled = Evaluator(dataset, x, None, normaliser=normaliser)(energy, None)
    assert abs(sampled["kl_data_ebm"] - on_grid["kl_data_ebm"]) < 4 * sampled["logz_se"] + 1e-3
    assert sampled["mse_logp_centered"] == pytest.approx(on_grid["mse_logp_centered"])


def test_the_reweighted_panel_of_the_datas_own_energy_is_the_datas_marginal():
    dataset = product(get_dataset("rings"), 2)
    x = dataset.sample(20_000, make_generator(0, "eval"), torch.float64)
    normaliser = ImportanceNormaliser(dataset, x, n=40_000, seed=2)
    points, weights = normaliser.weights(lambda p: -dataset.log_prob(p))
    cells, limit = 16, 4.0

    def distance(a, b):  # total variation between two histograms' densities
        return 0.5 * (a.exp() - b.exp()).abs().sum().item() * (2 * limit / cells) ** 2

    reweighted = log_histogram(points[:, :2], weights, limit, cells)
    sampled = log_histogram(x[:, :2], None, limit, cells)
    other = dataset.sample(20_000, make_generator(9, "t"), torch.float64)
    # As close to the data's histogram as another draw of the data is, up to sampling noise.
    noise = distance(log_histogram(other[:, :2], None, limit, cells), sampled)
    assert distance(reweighted, sampled) < 2 * noise


@pytest.mark.parametrize(
    "contrast",
    [
        ["estimator.base_scale=1.5"],
        ["estimator.contrast=mixture", "estimator.flow_objective=nll"],
    ],
    ids=["widened", "mixture"],
)
def test_fces_contrasts_run_above_2d(contrast):
    cfg = compose([*contrast, "dataset.dim=8", "flow=spline", *TINY])
    validate(cfg)
    trainer = build_trainer(cfg, torch.device("cpu"))
    x, log_q = trainer.estimator.frozen_contrast().transform_noise(torch.randn(10, 8))
    assert x.shape == (10, 8) and torch.isfinite(log_q).all()
    metrics = trainer.run()
    assert math.isfinite(metrics["mse_logp_centered"]) and math.isfinite(metrics["kl_data_flow"])


@pytest.mark.slow  # trains one small run in a child process, then scores it twice
def test_a_kept_checkpoint_is_scored_again_to_the_same_numbers_or_with_annealing(tmp_path):
    import json
    import subprocess
    import sys

    script = "benchmarks/dimension.py"
    common = [sys.executable, script, "--jobs", "1"]
    first = tmp_path / "runs.json"
    train = ["--labels", "nce", "--datasets", "8gaussians", "--dims", "4", "--seeds", "5"]
    train += ["--steps", "40", "--logz-samples", "4000", "--checkpoints", str(tmp_path / "k")]
    subprocess.run([*common, *train, "--out", str(first)], check=True)
    (run,) = json.loads(first.read_text())
    assert run["error"] is None and "kl_data_ebm" in run["final"]
    again, annealed = tmp_path / "again.json", tmp_path / "annealed.json"
    common += ["--dims", "4", "--seeds", "5"]  # --rescore scores the runs they name
    subprocess.run([*common, "--rescore", str(first), "--out", str(again)], check=True)
    subprocess.run(
        [
            *common,
            *("--rescore", str(first), "--set", "eval.logz=annealed"),
            *("eval.ais_chains=256", "eval.ais_steps=100", "--out", str(annealed)),
        ],
        check=True,
    )
    (same,) = json.loads(again.read_text())
    for name in ("kl_data_ebm", "logz_ess", "mse_logp_centered", "fisher_ebm"):
        assert same["final"][name] == run["final"][name], name
    (other,) = json.loads(annealed.read_text())
    assert other["rescored"][0] == "eval.logz=annealed"
    assert other["final"]["logz_ais_ess"] > 0
    assert other["final"]["logz_ess"] == run["final"]["logz_ess"]
