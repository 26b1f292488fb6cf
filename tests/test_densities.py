"""Exact (or accurate to < 1e-3 nats) densities of all six datasets, and their fast forms
equal to the plain ones."""

from __future__ import annotations

import math

import pytest
import torch

import fce.data as data
from fce.data import DATASET_NAMES, Dataset, get_dataset, make_generator

# The independently computed entropies (nats) of each dataset.
ORACLE_NLL = {
    "8gaussians": 2.834,
    "checkerboard": math.log(32),
    "rings": 2.622,
    "2spirals": 2.646,
    "spiral": 1.954,
    "pinwheel": 2.305,
}


def test_every_dataset_has_a_density():
    assert all(get_dataset(name).has_log_prob for name in DATASET_NAMES)


def test_a_dataset_without_density_says_so():
    with pytest.raises(NotImplementedError, match="no-density"):
        Dataset("no-density", data._sample_spiral).log_prob(torch.zeros(1, 2))


def midpoint_grid(limit: float, cells: int) -> tuple[torch.Tensor, float]:
    width = 2 * limit / cells
    axis = -limit + width * (torch.arange(cells, dtype=torch.float64) + 0.5)
    return torch.cartesian_prod(axis, axis), width**2


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_density_integrates_to_one(name):
    # [-6, 6]^2 holds all but < 1e-6 of every dataset's mass (the widest, pinwheel, reaches
    # |x| ~ 5 at 5 sd). The densities are Gaussian-blurred at scale s >= 0.08, for which the
    # midpoint rule's error is about exp(-2 pi^2 s^2 / h^2) < 1e-8 on cells of h = 0.08; the
    # checkerboard's edges fall on cell boundaries.
    points, area = midpoint_grid(6.0, 150)
    mass = get_dataset(name).log_prob(points).exp().sum().item() * area
    assert mass == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_density_matches_a_sample_histogram(name):
    ds = get_dataset(name)
    n, bins, limit, sub = 200_000, 16, 4.0, 8
    x = ds.sample(n, make_generator(1, "hist"), dtype=torch.float64)
    inside = ((x >= -limit) & (x < limit)).all(1)
    width = 2 * limit / bins
    idx = ((x[inside] + limit) / width).long()
    counts = torch.zeros(bins, bins, dtype=torch.float64)
    counts.index_put_((idx[:, 0], idx[:, 1]), torch.ones(len(idx), dtype=torch.float64), True)
    # Expected counts per bin: the density integrated over the bin by a sub-grid midpoint rule.
    fine = -limit + (width / sub) * (torch.arange(bins * sub, dtype=torch.float64) + 0.5)
    density = ds.log_prob(torch.cartesian_prod(fine, fine)).exp().view(bins * sub, bins * sub)
    expected = density.view(bins, sub, bins, sub).sum((1, 3)) * (width / sub) ** 2 * n
    # Pearson chi-square per bin over bins with enough counts: about 1 if the shapes agree,
    # far larger for any real mismatch (a wrong scale, a rotated arm, a missing ring).
    keep = expected > 50
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).mean()
    assert chi2.item() < 2.0
    assert abs(counts[~keep].sum() - expected[~keep].sum()) < 0.005 * n


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_entropy_matches_the_independent_oracle(name):
    # Monte Carlo entropy on held-out samples: within 0.01 nats and 4 standard errors.
    x = get_dataset(name).sample(20_000, make_generator(0, "oracle"), torch.float64)
    log_p = get_dataset(name).log_prob(x)
    assert torch.isfinite(log_p).all()
    entropy, error = -log_p.mean().item(), log_p.std().item() / math.sqrt(len(log_p))
    assert abs(entropy - ORACLE_NLL[name]) < max(0.01, 4 * error) + 1e-9


def test_spiral_quadrature_is_converged():
    x = get_dataset("2spirals").sample(300, make_generator(2, "quad"), torch.float64)
    x = torch.cat([x, torch.tensor([[4.0, 4.0], [0.0, 0.0], [-3.5, 0.2]], dtype=torch.float64)])
    default = data._log_prob_spirals(x, 1)
    nodes = data._SPIRAL_T_NODES
    try:
        data._SPIRAL_T_NODES = 16384
        fine = data._log_prob_spirals_full(x, 1)
    finally:
        data._SPIRAL_T_NODES = nodes
    assert (default - fine).abs().max().item() < 1e-3
    assert torch.isfinite(default).all()  # far points get a tiny density, not zero


def points_near_and_far(name: str) -> torch.Tensor:
    """Samples of the dataset, a wide Gaussian cloud around it, and single far-out points."""
    gen = make_generator(4, "exact")
    near = get_dataset(name).sample(3000, gen, torch.float64)
    cloud = 4 * torch.randn(2000, 2, generator=gen, dtype=torch.float64)
    angle = torch.linspace(0, 2 * math.pi, 13, dtype=torch.float64)[:-1]
    circles = torch.cat(
        [r * torch.stack([torch.cos(angle), torch.sin(angle)], 1) for r in (0.01, 5.0, 8.0, 12.0)]
    )
    single = torch.tensor(
        [[0.0, 0.0], [1e-13, 0.0], [4.0, 4.0], [-3.5, 0.2], [20.0, -30.0], [1e3, 0.0]],
        dtype=torch.float64,
    )
    return torch.cat([near, cloud, circles, single])


@pytest.mark.parametrize("arms", [1, 2])
def test_pruned_spiral_sums_equal_the_full_ones(arms):
    # The terms left out are certified below 1e-12 of the sum; near the arms, far from them
    # (densities down to e^-1400, where a box's mass reaches its 1e-300 floor) and at the
    # fallback's points alike.
    x = points_near_and_far("spiral" if arms == 1 else "2spirals")
    full = data._log_prob_spirals_full(x, arms)
    pruned = data._log_prob_spirals(x, arms)
    assert full.min().item() < -1000  # the far points are there
    torch.testing.assert_close(pruned, full, rtol=1e-12, atol=1e-10)


def _pinwheel_by_bisection(x: torch.Tensor, grid: int = 256) -> torch.Tensor:
    """The pinwheel density as first written: each arm on its own, every root by 60
    bisections of its grid bracket, the reference for the shared-trig Newton version."""
    y = x / 2
    rho = y.norm(dim=1).clamp_min(1e-12)
    beta = torch.atan2(y[:, 1], y[:, 0])
    total = torch.zeros_like(rho)
    for k in range(data._PIN_ARMS):
        offset = beta + 2 * math.pi * k / data._PIN_ARMS

        def g(f0, offset=offset, rho=rho):
            return f0 - rho[..., None] * torch.cos(offset[..., None] + 0.25 * torch.exp(f0))

        nodes = torch.linspace(-1, 1, grid, dtype=torch.float64) * rho[:, None]
        values = g(nodes)
        brackets = (values[:, :-1] <= 0) & (values[:, 1:] > 0) | (values[:, :-1] >= 0) & (
            values[:, 1:] < 0
        )
        row, col = brackets.nonzero(as_tuple=True)
        low, high, g_low = nodes[row, col], nodes[row, col + 1], values[row, col]
        sub_rho, sub_offset = rho[row], offset[row]
        for _ in range(60):
            mid = 0.5 * (low + high)
            g_mid = mid - sub_rho * torch.cos(sub_offset + 0.25 * torch.exp(mid))
            same = torch.sign(g_mid) == torch.sign(g_low)
            low = torch.where(same, mid, low)
            g_low = torch.where(same, g_mid, g_low)
            high = torch.where(same, high, mid)
        f0 = 0.5 * (low + high)
        f1 = sub_rho * torch.sin(sub_offset + 0.25 * torch.exp(f0))
        log_n = -0.5 * ((f0 - 1) / 0.3) ** 2 - 0.5 * (f1 / 0.1) ** 2 - math.log(2 * math.pi * 0.03)
        det = (1 + 0.25 * torch.exp(f0) * f1).abs()
        total.index_add_(0, row, torch.exp(log_n) / det)
    return torch.log(total / (4 * data._PIN_ARMS))


def test_pinwheel_equals_the_bisection_reference():
    x = points_near_and_far("pinwheel")
    reference = _pinwheel_by_bisection(x)
    fast = get_dataset("pinwheel").log_prob(x)
    # Beyond a radius of about 17 the density underflows (below e^-700): there either may
    # round to -inf where the other keeps a denormal.
    finite = torch.isfinite(reference) & torch.isfinite(fast)
    assert torch.all(torch.where(finite, True, torch.maximum(reference, fast) < -700))
    assert finite.sum() > 0.99 * len(x)
    torch.testing.assert_close(fast[finite], reference[finite], rtol=1e-12, atol=1e-10)


def test_rings_match_direct_angular_integration():
    # The Bessel closed form against a brute-force average of Gaussians around each ring.
    x = torch.tensor([[3.0, 0.1], [0.0, 1.5], [1.0, 1.0], [0.05, 0.0]], dtype=torch.float64)
    angle = torch.linspace(0, 2 * math.pi, 20001, dtype=torch.float64)[:-1]
    s2 = 0.08**2
    total = torch.zeros(len(x), dtype=torch.float64)
    for r in (3.0, 2.25, 1.5, 0.75):
        centres = r * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
        sq = (x[:, None] - centres[None]).pow(2).sum(-1)
        total += torch.exp(-sq / (2 * s2)).mean(1) / (2 * math.pi * s2) / 4
    torch.testing.assert_close(get_dataset("rings").log_prob(x), total.log(), rtol=0, atol=1e-9)


def test_pinwheel_matches_the_change_of_variables_by_autograd():
    # Push features through the generator's map and compare log p with log N(f) - log|det J|.
    arms, radial, tangential, rate = 5, 0.3, 0.1, 0.25
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(200, 2, generator=gen, dtype=torch.float64) * torch.tensor(
        [radial, tangential]
    )
    f[:, 0] += 1
    k = torch.randint(arms, (200,), generator=gen).double()

    def forward(feature, arm):
        theta = arm * 2 * math.pi / arms + rate * torch.exp(feature[0])
        c, s = torch.cos(theta), torch.sin(theta)
        return 2 * torch.stack([feature[0] * c + feature[1] * s, feature[1] * c - feature[0] * s])

    x = torch.stack([forward(fi, ki) for fi, ki in zip(f, k)])
    log_det = torch.stack(
        [
            torch.linalg.slogdet(
                torch.autograd.functional.jacobian(lambda v, a=ki: forward(v, a), fi)
            )[1]
            for fi, ki in zip(f, k)
        ]
    )
    log_n = (
        -0.5 * ((f[:, 0] - 1) / radial) ** 2
        - 0.5 * (f[:, 1] / tangential) ** 2
        - math.log(2 * math.pi * radial * tangential)
    )
    # One arm's term; the other arms add (almost) nothing at these points, so the mixture's
    # log-density is at least this and within a small margin of it.
    single = log_n - log_det - math.log(arms)
    total = get_dataset("pinwheel").log_prob(x)
    assert torch.all(total >= single - 1e-9)
    assert torch.median(total - single).item() < 1e-6
