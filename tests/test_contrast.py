"""FCE's options: the contrast (fce/contrast.py), the flow's objective and the updates.

The contrasts are checked as densities (each integrates to 1 on a grid; the log-density a
sample comes with is ``log_prob`` at it; the samples' moments are those of the density) and
against closed forms (a widened identity flow is N(0, T^2 I); a mixture of Gaussians is the
logsumexp of their weighted densities). The options are checked against what they must
equal: the defaults are the pinned history (tests/test_pinned_history.py), and FCE with the
Gaussian as its contrast and the flow by NLL is NCE and flow-MLE in one run, bit for bit.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch.distributions import MultivariateNormal

from fce.compose import compose
from fce.config import ConfigError, validate
from fce.contrast import Mixture, WidenedFlow
from fce.factory import build_trainer
from fce.flows import Gaussian, Spline
from fce.flows.base import NoGradPasses
from fce.objective import fce_value

SMALL = [
    "dataset.n_samples=4000",
    "train.batch_size=200",
    "train.max_steps=30",
    "train.eval_every=15",
    "eval.n_points=1000",
    "eval.grid_cells=32",
    "device=cpu",
    "flow=spline",
]


def bent_spline(seed: int = 0) -> Spline:
    """A spline flow away from the identity (its last layers are zero at init), in float64."""
    torch.manual_seed(seed)
    flow = Spline(n_layers=2, bins=6, hidden=16, hidden_layers=1, tail_bound=5.0).double()
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return flow


def grid(limit: float, cells: int) -> tuple[torch.Tensor, float]:
    """Cell centres of [-limit, limit]^2 and the cell area (the midpoint rule)."""
    h = 2 * limit / cells
    axis = -limit + h * (torch.arange(cells, dtype=torch.float64) + 0.5)
    xx, yy = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1), h * h


def contrasts() -> dict[str, object]:
    flow = bent_spline()
    gaussian = Gaussian(
        torch.tensor([0.5, -0.3], dtype=torch.float64),
        torch.linalg.cholesky(torch.tensor([[0.8, 0.3], [0.3, 0.5]], dtype=torch.float64)),
    )
    return {
        "flow": flow,
        "widened": WidenedFlow(flow, 1.7),
        "mixture": Mixture(flow, gaussian, 0.3),
        "widened mixture": Mixture(WidenedFlow(flow, 1.7), gaussian, 0.5),
    }


@pytest.mark.parametrize("name", sorted(contrasts()))
def test_each_contrast_integrates_to_one(name):
    contrast = contrasts()[name]
    points, area = grid(10.0, 1000)
    with torch.no_grad():
        mass = (contrast.log_prob(points).exp() * area).sum().item()
    assert math.isclose(mass, 1.0, abs_tol=2e-3), mass


@pytest.mark.parametrize("name", sorted(contrasts()))
def test_a_samples_log_density_is_log_prob_at_it(name):
    contrast = contrasts()[name]
    z = torch.randn(1001, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        x, log_q = contrast.transform_noise(z)
        torch.testing.assert_close(log_q, contrast.log_prob(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(contrasts()))
def test_the_samples_have_the_densitys_moments(name):
    """Mean and second moments of 200,000 samples against the grid integral of log_prob:
    within 5 standard errors of the sample mean."""
    contrast = contrasts()[name]
    z = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    points, area = grid(10.0, 1000)
    with torch.no_grad():
        x, _ = contrast.transform_noise(z)
        weights = contrast.log_prob(points).exp() * area
    features = lambda u: torch.stack(  # noqa: E731
        [u[:, 0], u[:, 1], u[:, 0] ** 2, u[:, 1] ** 2, u[:, 0] * u[:, 1]], dim=1
    )
    exact = (weights[:, None] * features(points)).sum(0)
    sampled = features(x)
    error = sampled.std(0) / math.sqrt(x.shape[0])
    assert ((sampled.mean(0) - exact).abs() < 5 * error + 2e-3).all(), (sampled.mean(0), exact)


def test_a_widened_identity_flow_is_the_wider_gaussian():
    flow = Spline(n_layers=2, bins=4, hidden=8, hidden_layers=1, tail_bound=5.0).double()
    widened = WidenedFlow(flow, 2.5)  # the spline starts as the identity
    wide = MultivariateNormal(torch.zeros(2, dtype=torch.float64), 2.5**2 * torch.eye(2).double())
    x = 3 * torch.randn(50, 2, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(widened.log_prob(x), wide.log_prob(x))
        z = torch.randn(50, 2, dtype=torch.float64)
        samples, log_q = widened.transform_noise(z)
    torch.testing.assert_close(samples, 2.5 * z)
    torch.testing.assert_close(log_q, wide.log_prob(samples))


def test_a_mixture_of_gaussians_is_the_weighted_sum_and_is_stratified():
    a = Gaussian(torch.tensor([1.0, 0.0]).double(), torch.eye(2).double())
    b = Gaussian(torch.tensor([-2.0, 1.0]).double(), 0.5 * torch.eye(2).double())
    mixture = Mixture(a, b, 0.25)
    x = 2 * torch.randn(40, 2, dtype=torch.float64)
    expected = (0.25 * a.log_prob(x).exp() + 0.75 * b.log_prob(x).exp()).log()
    torch.testing.assert_close(mixture.log_prob(x), expected)
    z = torch.randn(1000, 2, dtype=torch.float64)
    samples, _ = mixture.transform_noise(z)
    # The first round(w m) draws are the first component's, the rest the second's.
    assert mixture.split(1000) == 250
    torch.testing.assert_close(samples[:250], a.transform_noise(z[:250])[0])
    torch.testing.assert_close(samples[250:], b.transform_noise(z[250:])[0])
    # A batch too small for one of the parts draws from the other alone.
    samples, log_q = Mixture(a, b, 0.001).transform_noise(z[:10])
    torch.testing.assert_close(samples, b.transform_noise(z[:10])[0])
    torch.testing.assert_close(log_q, Mixture(a, b, 0.001).log_prob(samples))


def test_the_games_gradient_reaches_the_flow_through_a_mixture_and_a_wider_base():
    flow = bent_spline()
    gaussian = Gaussian(torch.zeros(2).double(), torch.eye(2).double())
    x = torch.randn(64, 2, dtype=torch.float64)
    z = torch.randn(64, 2, dtype=torch.float64)
    log_p = lambda u: -0.5 * (u**2).sum(1)  # noqa: E731  (a fixed unnormalised model)
    for contrast in (Mixture(WidenedFlow(flow, 2.0), gaussian, 0.5), WidenedFlow(flow, 2.0)):
        flow.zero_grad()
        x_noise, log_q_noise = contrast.transform_noise(z)
        fce_value(log_p(x), contrast.log_prob(x), log_p(x_noise), log_q_noise).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())
    with torch.no_grad():
        frozen = NoGradPasses(Mixture(flow, gaussian, 0.5))
    assert not frozen.log_prob(x).requires_grad
    assert not frozen.transform_noise(z)[1].requires_grad


def run(overrides: list[str]):
    trainer = build_trainer(compose([*overrides, *SMALL]), torch.device("cpu"))
    metrics = trainer.run()
    return trainer, metrics


def test_gaussian_contrast_with_the_flow_by_nll_is_nce_and_flow_mle_in_one_run():
    """The EBM's steps see exactly NCE's noise and the flow's exactly flow-MLE's loss, on the
    same batches: the two models end bit for bit as the two baselines' do."""
    common = ["dataset=rings", "seed=7"]
    both, metrics = run(
        [
            *common,
            "estimator.contrast=gaussian",
            "estimator.flow_objective=nll",
            "estimator.updates=simultaneous",
        ]
    )
    nce, nce_metrics = run([*common, "estimator=nce"])
    flow_mle, flow_metrics = run([*common, "estimator=flow_mle"])
    for a, b in zip(both.ebm.parameters(), nce.ebm.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(both.flow.parameters(), flow_mle.flow.parameters(), strict=True):
        assert torch.equal(a, b)
    assert metrics["kl_data_ebm"] == nce_metrics["kl_data_ebm"]
    assert metrics["kl_data_flow"] == flow_metrics["kl_data_flow"]
    assert metrics["flow_step_share"] == 1.0
    assert both.history.history["value"][1] == nce.history.history["value"][1]
    assert both.history.history["flow_loss"][1] == flow_mle.history.history["loss"][1]
    # Whatever the contrast, a flow trained by its NLL alone never sees the EBM: it is
    # flow-MLE's flow (the covering recipe's, docs/truth.md).
    mixture, _ = run(
        [
            *common,
            "estimator.contrast=mixture",
            "estimator.base_scale=2",
            "estimator.flow_objective=nll",
            "estimator.updates=simultaneous",
        ]
    )
    for a, b in zip(mixture.flow.parameters(), flow_mle.flow.parameters(), strict=True):
        assert torch.equal(a, b)


def test_simultaneous_updates_move_both_models_every_step_and_average_the_ebm():
    trainer = build_trainer(
        compose(
            [
                "estimator.contrast=mixture",
                "estimator.base_scale=2",
                "estimator.updates=simultaneous",
                "train.ema_decay=0.9",
                *SMALL,
            ]
        ),
        torch.device("cpu"),
    )
    trainer.run()
    assert trainer.estimator.flow_steps == trainer.step == 30
    assert trainer.average.updates == 30
    assert set(trainer.history.history) >= {"value", "acc", "flow_loss", "trained_ebm"}


def test_the_flows_step_descends_v_plus_lambda_nll():
    """With nll_weight lambda the flow's gradient is that of V plus lambda times that of its
    NLL, each computed apart on the same batch."""
    trainer = build_trainer(compose(["estimator.nll_weight=0.7", *SMALL]), torch.device("cpu"))
    estimator = trainer.estimator
    estimator.start(trainer.batch(0))
    x, z = trainer.batch(0), trainer.noise(0, trainer.batch(0))
    flow = estimator.flow

    def grads(loss):
        flow.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in flow.parameters()]

    with torch.no_grad():
        log_p_data = estimator.ebm(x)
    x_noise, log_q_noise = flow.transform_noise(z)
    value = fce_value(log_p_data, flow.log_prob(x), estimator.ebm(x_noise), log_q_noise)
    g_value = grads(value)
    g_nll = grads(-flow.log_prob(x).mean())
    estimator.opt_flow.step = lambda: None  # keep the gradient, move nothing
    estimator.flow_step(x, z)
    for got, a, b in zip((p.grad for p in flow.parameters()), g_value, g_nll, strict=True):
        torch.testing.assert_close(got, a + 0.7 * b)


def test_the_controller_speeds_the_flow_when_the_ebm_wins_and_resumes():
    trainer = build_trainer(
        compose(
            [
                "estimator.updates=controlled",
                "estimator.accuracy_target=0.3",  # below any accuracy: the factor only grows
                "estimator.controller_gain=2",
                *SMALL,
            ]
        ),
        torch.device("cpu"),
    )
    rates = [group["lr"] for group in trainer.estimator.opt_flow.param_groups]
    trainer.run()
    factors = trainer.history.history["flow_lr_factor"][1]
    assert factors[0] == 1.0 and all(b >= a for a, b in itertools.pairwise(factors))
    assert factors[-1] == pytest.approx(100.0)  # bounded at CONTROLLER_MAX_FACTOR
    # The factor scales each step's rate only; the optimizer keeps its own.
    assert [group["lr"] for group in trainer.estimator.opt_flow.param_groups] == rates
    state = trainer.estimator.state_dict()
    fresh = build_trainer(compose(["estimator.updates=controlled", *SMALL]), torch.device("cpu"))
    fresh.estimator.load_state_dict(state)
    assert fresh.estimator.log_lr_factor == trainer.estimator.log_lr_factor


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("estimator.contrast=uniform", r"estimator.contrast='uniform': unknown; choose one of"),
        ("estimator.contrast=gaussian", r"V does not depend on the flow then"),
        ("estimator.mixture_weight=1", r"estimator.mixture_weight=1.0: must be in \(0, 1\)"),
        ("estimator.base_scale=0", r"estimator.base_scale=0.0: must be a positive number"),
        ("estimator.nll_weight=-1", r"estimator.nll_weight=-1.0: must be a finite number >= 0"),
        ("estimator.flow_objective=nll estimator.nll_weight=1", r"is the NLL alone; use 0"),
        ("estimator.updates=sometimes", r"estimator.updates='sometimes': unknown"),
        ("estimator.accuracy_target=1", r"estimator.accuracy_target=1.0: must be in \(0, 1\)"),
    ],
)
def test_bad_fce_options_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(override.split()))


@pytest.mark.parametrize(
    "dataset", ["8gaussians", "spiral", "2spirals", "checkerboard", "rings", "pinwheel"]
)
def test_truth_both_is_experiment_truth_with_the_covering_options(dataset):
    """experiment=truth_both changes the estimator's options alone: every other key, the
    dataset's own recipe included, is experiment=truth's."""
    both = OmegaConf.to_container(compose(["experiment=truth_both", f"dataset={dataset}"]))
    truth = OmegaConf.to_container(compose(["experiment=truth", f"dataset={dataset}"]))
    validate(compose(["experiment=truth_both", f"dataset={dataset}"]))
    changed = {"contrast": "mixture", "flow_objective": "nll", "updates": "simultaneous"}
    assert {k: both["estimator"][k] for k in changed} == changed
    assert both["estimator"]["mixture_weight"] == 0.5
    both.pop("estimator"), truth.pop("estimator")
    assert both == truth


def test_nce_can_contrast_with_a_fixed_flow_on_a_widened_base():
    # estimator=nce estimator.noise=flow estimator.base_scale=T: the trained flow, frozen,
    # on the base N(0, T^2 I) -- the same density as FCE's widened contrast, and the model
    # NCE's flow metrics then score.
    from types import SimpleNamespace

    from fce.estimators.nce import noise_model

    flow = bent_spline()
    players = SimpleNamespace(flow=flow, train_data=torch.randn(100, 2, dtype=torch.float64))
    noise = noise_model(players, "flow", 2.5)
    assert isinstance(noise, WidenedFlow) and noise.flow is flow
    assert not any(p.requires_grad for p in flow.parameters())
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u, log_det = flow.forward(x)
    expected = MultivariateNormal(torch.zeros(2, dtype=torch.float64), 2.5**2 * torch.eye(2))
    torch.testing.assert_close(noise.log_prob(x), expected.log_prob(u.double()) + log_det)
    assert noise_model(players, "flow", 1.0) is flow  # T = 1: the flow as trained
    # Its checkpoint holds the flow as trained, under the flow's own keys: another run can
    # load it as its noise_checkpoint, and widen it (or not) by its own base_scale.
    assert noise.state_dict().keys() == flow.state_dict().keys()
    other = bent_spline(seed=1)
    WidenedFlow(other, 3.0).load_state_dict(noise.state_dict())
    torch.testing.assert_close(other.log_prob(x), flow.log_prob(x))
    with pytest.raises(ConfigError, match=r"estimator.base_scale=2.0: widens a flow's base"):
        validate(compose([*SMALL, "estimator=nce", "estimator.base_scale=2"]))
