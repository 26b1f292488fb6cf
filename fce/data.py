"""The six 2-D datasets of the reference, as a registry of seeded samplers and densities,
and their products in d = 2k dimensions.

Every sampler draws from an explicit ``torch.Generator`` (never the global RNG), so one seed
gives the same bytes in any process, and draws points i.i.d. from the mixture it describes, so
any ``n`` works. ``log_prob`` is set where the density has a closed form, ``score`` (the
gradient of the log-density in x) where that is smooth. ``product(dataset, k)`` is k
independent copies side by side: its log-density is the sum of the k exact 2-D ones.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Sampler = Callable[[int, torch.Generator, torch.dtype], Tensor]
LogProb = Callable[[Tensor], Tensor]
Score = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Dataset:
    """A distribution known by its samples and, where it has them, its exact log-density and
    score. ``dim`` is the dimension of its points (2 for the six of the registry)."""

    name: str
    sample_fn: Sampler
    log_prob_fn: LogProb | None = None
    score_fn: Score | None = None
    dim: int = 2

    @property
    def has_log_prob(self) -> bool:
        return self.log_prob_fn is not None

    @property
    def has_score(self) -> bool:
        return self.score_fn is not None

    def sample(
        self, n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Draw ``n`` i.i.d. points as an ``(n, dim)`` tensor on the generator's device (CPU)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return self.sample_fn(n, generator, dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of each row of ``x``; ``-inf`` outside the support."""
        if self.log_prob_fn is None:
            raise NotImplementedError(f"dataset {self.name!r} has no closed-form density")
        return self.log_prob_fn(x)

    def score(self, x: Tensor) -> Tensor:
        """The gradient in x of the log-density at each row of ``x``, shape ``(n, dim)``."""
        if self.score_fn is None:
            raise NotImplementedError(f"dataset {self.name!r} has no score (a smooth density)")
        return self.score_fn(x)


def product(base: Dataset, copies: int) -> Dataset:
    """``copies`` independent copies of ``base`` side by side: points of dimension
    ``copies * base.dim``, whose log-density is the sum of the copies' and whose score is
    theirs, concatenated. One copy is ``base`` itself (the same draws, the same name).

    A draw of n points is ``base``'s draw of n * copies points, each consecutive ``copies``
    of them one point: i.i.d. draws grouped are i.i.d. draws of the product.
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    if copies == 1:
        return base
    d = base.dim

    def sample(n: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
        return base.sample_fn(n * copies, gen, dtype).reshape(n, copies * d)

    def per_copy(x: Tensor) -> Tensor:
        if x.shape[-1] != copies * d:
            raise ValueError(f"points of dimension {x.shape[-1]}; this dataset's are {copies * d}")
        return x.reshape(-1, d)

    def log_prob(x: Tensor) -> Tensor:
        return base.log_prob_fn(per_copy(x)).reshape(x.shape[0], copies).sum(1)

    def score(x: Tensor) -> Tensor:
        return base.score_fn(per_copy(x)).reshape(x.shape[0], copies * d)

    return Dataset(
        f"{base.name}-d{copies * d}",
        sample,
        log_prob if base.has_log_prob else None,
        score if base.has_score else None,
        dim=copies * d,
    )


def autograd_score(log_prob: LogProb, chunk: int = 4096) -> Score:
    """The score of a differentiable ``log_prob``, in float64 by autograd, ``chunk`` rows at a
    time (each row's log-density depends on that row alone, so the gradient of the sum is
    every row's score)."""

    def score(x: Tensor) -> Tensor:
        out = []
        for part in x.detach().double().split(chunk):
            with torch.enable_grad():
                part = part.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(log_prob(part).sum(), part)
            out.append(grad)
        return torch.cat(out).to(x.dtype) if out else x.new_zeros(x.shape)

    return score


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one named random stream of a run (train, eval, test, noise...).

    Independent streams from one user seed: the held-out points never overlap the training
    draw's random numbers, and adding a stream never shifts another.
    """
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(seed, stream))
    return generator


# --- 8gaussians -------------------------------------------------------------------------------

_GAUSS_RADIUS = 2.0 * math.sqrt(2.0)
_GAUSS_STD = 0.5 / math.sqrt(2.0)


def _gauss_centres(dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    angles = torch.arange(8, dtype=dtype, device=device) * (math.pi / 4)
    return _GAUSS_RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)


def _sample_8gaussians(n: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    component = torch.randint(8, (n,), generator=gen)
    noise = torch.randn(n, 2, generator=gen, dtype=dtype)
    return _gauss_centres(dtype)[component] + _GAUSS_STD * noise


def _log_prob_8gaussians(x: Tensor) -> Tensor:
    centres = _gauss_centres(x.dtype, x.device)
    sq_dist = (x[:, None, :] - centres[None]).pow(2).sum(-1)
    log_comp = -0.5 * sq_dist / _GAUSS_STD**2 - math.log(2 * math.pi * _GAUSS_STD**2)
    return torch.logsumexp(log_comp, dim=1) - math.log(8.0)


def _score_8gaussians(x: Tensor) -> Tensor:
    # The responsibility-weighted pull of each centre: sum_c r_c(x) (mu_c - x) / s^2.
    centres = _gauss_centres(x.dtype, x.device)
    offset = centres[None] - x[:, None, :]
    weight = torch.softmax(-0.5 * offset.pow(2).sum(-1) / _GAUSS_STD**2, dim=1)
    return (weight[..., None] * offset).sum(1) / _GAUSS_STD**2


# --- spirals ----------------------------------------------------------------------------------


# The generator's constants, shared by the sampler and the density.
_SPIRAL_T_MAX = 3 * math.pi  # the arc parameter t runs over [0, 3 pi] (540 degrees)
_SPIRAL_JITTER = 0.5  # a uniform box jitter of this width on each axis ...
_SPIRAL_SHRINK = 3  # ... then the arm is divided by this ...
_SPIRAL_NOISE = 0.1  # ... and blurred by N(0, 0.1^2 I)
_SPIRAL_BOX = _SPIRAL_JITTER / _SPIRAL_SHRINK  # the jitter box's side after the division
_SPIRAL_T_NODES = 768  # Simpson intervals over t for the density


def _spiral_arm(n: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    # Arc parameter t = sqrt(u) * t_max, then the box jitter.
    t = torch.sqrt(torch.rand(n, generator=gen, dtype=dtype)) * _SPIRAL_T_MAX
    jitter = _SPIRAL_JITTER * torch.rand(n, 2, generator=gen, dtype=dtype)
    return torch.stack([-torch.cos(t) * t, torch.sin(t) * t], dim=1) + jitter


def _spiral_nodes(device: torch.device) -> tuple[Tensor, Tensor]:
    """The Simpson nodes of ``_log_prob_spiral_arm_full``: log(p(t) dt) and the box corner a(t)
    at each, shape (n,) and (n, 2), float64."""
    t_max = _SPIRAL_T_MAX
    n = _SPIRAL_T_NODES  # even: composite Simpson over n intervals, nodes 1..n (p(0) = 0)
    h = t_max / n
    t = torch.arange(1, n + 1, dtype=torch.float64, device=device) * h
    simpson = torch.where(torch.arange(1, n + 1) % 2 == 1, 4.0, 2.0).to(t)
    simpson[-1] = 1.0
    log_weight = torch.log(2 * t / t_max**2 * simpson * h / 3)  # p(t) dt
    corner = torch.stack([-torch.cos(t) * t, torch.sin(t) * t], dim=1) / _SPIRAL_SHRINK
    return log_weight, corner


def _spiral_log_terms(u: Tensor, log_weight: Tensor) -> Tensor:
    """log of the Simpson terms p(t) dt * p(x | t) for offsets u = x - a(t) of shape (..., 2)."""
    scale = _SPIRAL_NOISE * math.sqrt(2)
    # P(x_i - noise in [a_i, a_i + 1/6]) per axis, as a difference of erfcs taken on the side
    # where it does not cancel, so far-away points get accurate (not zero) density.
    upper = u > _SPIRAL_BOX / 2
    mass = 0.5 * torch.where(
        upper,
        torch.erfc((u - _SPIRAL_BOX) / scale) - torch.erfc(u / scale),
        torch.erfc(-u / scale) - torch.erfc((_SPIRAL_BOX - u) / scale),
    )
    return (
        torch.log(mass.clamp_min(_SPIRAL_MASS_FLOOR)).sum(-1)
        - 2 * math.log(_SPIRAL_BOX)
        + (log_weight)
    )


_SPIRAL_MASS_FLOOR = 1e-300  # a box mass that underflows counts as this, never as 0


def _log_prob_spiral_arm_full(x: Tensor, chunk: int = 2048) -> Tensor:
    """log density of one spiral arm: t has density 2t / (3 pi)^2 on [0, 3 pi]; given t the point
    is uniform on a square of side 1/6 at c(t) / 3, then blurred by N(0, 0.1^2 I), so

        p(x) = int p(t) prod_i [Phi((x_i - a_i(t)) / s) - Phi((x_i - a_i(t) - 1/6) / s)] * 6 dt

    with a(t) = (-t cos t, t sin t) / 3: a 1-D integral, by composite Simpson in t over 768
    intervals (the integrand varies on scales of s / |a'(t)| >= 0.03; the nodes are 0.012
    apart; against 16,384 nodes the largest error is below 1e-4 nats, tests/test_densities.py).
    Every node's term at every point: the reference that ``_log_prob_spiral_arm`` sums
    the same terms of, where they matter.
    """
    log_weight, corner = _spiral_nodes(x.device)
    out = []
    for part in x.double().split(chunk):
        terms = _spiral_log_terms(part[:, None, :] - corner[None], log_weight)  # (n, T)
        out.append(torch.logsumexp(terms, dim=1))
    return torch.cat(out).to(x.dtype)


_SPIRAL_BLOCK = 16  # consecutive nodes of an arm bounded together by one disc
_SPIRAL_FIRST_MARGIN = 30.0  # nats below the largest bound: the blocks summed first
_SPIRAL_LOG_TOL = math.log(1e-12)  # the relative error allowed for the terms left out


def _log_prob_spirals(x: Tensor, arms: int, chunk: int = 2048) -> Tensor:
    """log density of ``arms`` spiral arms (1, or 2: the second the first negated, p2(x) =
    p1(-x)) in equal shares: the Simpson sums of ``_log_prob_spiral_arm_full``, over only the
    terms that can matter, equal to the full sums to a relative 1e-12 (1e-12 in log density).

    A node's term is its weight p(t) dt times the box's mass per axis over the box's area;
    each mass is at most (1/6) N(d_i; 0, s^2), d_i the distance from x_i to the box's side, so
    the term is at most p(t) dt e^{-d^2 / 2 s^2} / (2 pi s^2), d the distance from x to the
    box, at least the distance to its centre less its half-diagonal. Each arm's 768 nodes
    form blocks of 16 consecutive ones; a disc around each block's box centres bounds its 16
    terms by one cheap number per (point, block). Per point: first the blocks within 30 nats
    of the largest bound are summed exactly, giving a lower bound L on the sum; then every
    other block whose bound exceeds L + log(1e-12 / (2 blocks)) is added. The blocks left out
    total less than 1e-12 / 2 of L: the result is certified per point, whatever the point.
    Terms where a mass underflows to its floor (1e-300) escape the bound; the points so far
    out that these could matter (L near e^-600) take the full sums. A point near one arm of
    two skips the other arm, whose terms are below the tolerance there.

    Each mass is the difference of erfcs of ``_spiral_log_terms`` written from the box's
    centre, erfc(w - h) - erfc(w + h) with w = |x_i - a_i - 1/12| / (s sqrt 2) and
    h = 1/12 / (s sqrt 2): the non-cancelling side for either sign, two erfcs instead of the
    four that ``torch.where`` evaluates; tests/test_densities.py holds the result to the full
    sums within 1e-10 near the arms and far from them.
    """
    scale = _SPIRAL_NOISE * math.sqrt(2)
    log_weight, corner = _spiral_nodes(x.device)
    n_nodes, block = corner.shape[0], _SPIRAL_BLOCK
    if n_nodes % block or arms not in (1, 2):
        return _log_prob_spirals_full(x, arms, chunk)
    # The arms' box centres in units of scale; the second arm's are the first's negated.
    centre = (corner + _SPIRAL_BOX / 2) / scale
    centre = torch.cat([centre, -centre][:arms])
    log_weight = log_weight.repeat(arms) - math.log(arms)
    n_blocks = centre.shape[0] // block
    centre = centre.view(n_blocks, block, 2)
    log_weight = log_weight.view(n_blocks, block)
    half = _SPIRAL_BOX / 2 / scale
    disc_centre = centre.mean(1)
    disc_radius = (centre - disc_centre[:, None]).norm(dim=-1).amax(1) + half * math.sqrt(2)
    # In units of scale, e^{-d^2 / 2 s^2} is e^{-d^2}.
    log_gauss = -math.log(2 * math.pi * _SPIRAL_NOISE**2)
    block_bound = log_weight.amax(1) + log_gauss + math.log(block)
    # The box's area and the 1/2 of each axis's erfc difference.
    log_const = -2 * math.log(_SPIRAL_BOX) - 2 * math.log(2.0)
    # What one term may reach where a mass sits at the floor (the other mass is at most 1).
    floored = log_weight.max().item() - 2 * math.log(_SPIRAL_BOX)
    floored_all = floored + math.log(_SPIRAL_MASS_FLOOR) + math.log(centre.shape[0] * block)

    def block_sums(points: Tensor, row: Tensor, blk: Tensor) -> Tensor:
        w = (points[row][:, None, :] - centre[blk]).abs()  # (pairs, block, 2)
        diff = torch.erfc(w - half) - torch.erfc(w + half)
        log_mass = diff.clamp_min(2 * _SPIRAL_MASS_FLOOR).log()
        terms = log_mass[..., 0] + log_mass[..., 1] + log_weight[blk]
        return torch.logsumexp(terms, dim=1) + log_const

    out = []
    for part in x.double().split(chunk):
        rows = part.shape[0]
        points = part / scale
        dist = torch.cdist(points, disc_centre, compute_mode="donot_use_mm_for_euclid_dist")
        bound = block_bound - (dist - disc_radius).clamp_min(0).square()  # (rows, blocks)
        first = bound >= bound.amax(1, keepdim=True) - _SPIRAL_FIRST_MARGIN
        row, blk = first.nonzero(as_tuple=True)
        sums = block_sums(points, row, blk)
        lower = _segment_logsumexp(sums, row, rows)
        more = ~first & (bound >= (lower + _SPIRAL_LOG_TOL - math.log(2 * n_blocks))[:, None])
        row2, blk2 = more.nonzero(as_tuple=True)
        sums = torch.cat([sums, block_sums(points, row2, blk2)])
        total = _segment_logsumexp(sums, torch.cat([row, row2]), rows)
        # The floor's terms are certified away only where they are below the tolerance too.
        far = floored_all > lower + _SPIRAL_LOG_TOL - math.log(2)
        if far.any():
            total[far] = _log_prob_spirals_full(part[far], arms, chunk)
        out.append(total)
    return torch.cat(out).to(x.dtype)


def _log_prob_spirals_full(x: Tensor, arms: int, chunk: int = 2048) -> Tensor:
    """``_log_prob_spirals`` from every term, the reference it is tested against."""
    if arms == 1:
        return _log_prob_spiral_arm_full(x, chunk)
    both = torch.stack([_log_prob_spiral_arm_full(x, chunk), _log_prob_spiral_arm_full(-x, chunk)])
    return torch.logsumexp(both, dim=0) - math.log(2.0)


def _segment_logsumexp(values: Tensor, segment: Tensor, n: int) -> Tensor:
    """log sum exp of ``values`` per segment index in [0, n); -inf for an empty segment."""
    top = values.new_full((n,), -math.inf).scatter_reduce(0, segment, values, "amax")
    shift = torch.where(torch.isfinite(top), top, 0.0)
    total = values.new_zeros(n).index_add_(0, segment, (values - shift[segment]).exp())
    return total.log() + shift


def _log_prob_spiral(x: Tensor) -> Tensor:
    return _log_prob_spirals(x, 1)


def _log_prob_2spirals(x: Tensor) -> Tensor:
    return _log_prob_spirals(x, 2)


def _sample_spiral(n: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    arm = _spiral_arm(n, gen, dtype)
    return arm / _SPIRAL_SHRINK + _SPIRAL_NOISE * torch.randn(n, 2, generator=gen, dtype=dtype)


def _sample_2spirals(n: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    arm = _spiral_arm(n, gen, dtype)
    # Each point picks one of the two arms (the second is the first rotated by pi).
    sign = 1 - 2 * torch.randint(2, (n, 1), generator=gen).to(dtype)
    noise = _SPIRAL_NOISE * torch.randn(n, 2, generator=gen, dtype=dtype)
    return sign * arm / _SPIRAL_SHRINK + noise


# --- checkerboard -----------------------------------------------------------------------------


def _sample_checkerboard(n: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    x1 = 4 * torch.rand(n, generator=gen, dtype=dtype) - 2
    x2 = torch.rand(n, generator=gen, dtype=dtype)
    x2 = x2 - 2 * torch.randint(2, (n,), generator=gen).to(dtype) + torch.floor(x1) % 2
    return 2 * torch.stack([x1, x2], dim=1)


def _log_prob_checkerboard(x: Tensor) -> Tensor:
    # Uniform on the 8 squares of side 2 in [-4, 4)^2 whose cell indices sum to an even number.
    cells = torch.floor(x / 2)
    inside = ((x >= -4) & (x < 4)).all(dim=1)
    black = (cells.sum(dim=1) % 2) == 0
    log_density = torch.full_like(x[:, 0], -math.log(32.0))
    return torch.where(inside & black, log_density, torch.full_like(log_density, -math.inf))


# --- rings ------------------------------------------------------------------------------------

_RING_RADII = (3.0, 2.25, 1.5, 0.75)
_RING_NOISE = 0.08


def _sample_rings(n: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    radii = torch.tensor(_RING_RADII, dtype=dtype)[torch.randint(4, (n,), generator=gen)]
    angle = 2 * math.pi * torch.rand(n, generator=gen, dtype=dtype)
    circle = radii[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return circle + _RING_NOISE * torch.randn(n, 2, generator=gen, dtype=dtype)


def _log_prob_rings(x: Tensor) -> Tensor:
    # A uniform circle of radius r blurred by N(0, s^2 I) has density
    #   exp(-(|x|^2 + r^2) / 2s^2) I0(|x| r / s^2) / (2 pi s^2);
    # with I0(z) = i0e(z) e^z this is exp(-(|x| - r)^2 / 2s^2) i0e(|x| r / s^2) / (2 pi s^2).
    s2 = _RING_NOISE**2
    radius = x.norm(dim=1, keepdim=True)
    rings = torch.tensor(_RING_RADII, dtype=x.dtype, device=x.device)
    log_ring = (
        -((radius - rings) ** 2) / (2 * s2)
        + torch.log(torch.special.i0e(radius * rings / s2))
        - math.log(2 * math.pi * s2)
    )
    return torch.logsumexp(log_ring, dim=1) - math.log(len(_RING_RADII))


# --- pinwheel ---------------------------------------------------------------------------------


# The generator's constants, shared by the sampler and the density.
_PIN_ARMS, _PIN_RADIAL, _PIN_TANGENTIAL, _PIN_RATE = 5, 0.3, 0.1, 0.25


def _sample_pinwheel(n: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    arms, radial_std, tangential_std, rate = _PIN_ARMS, _PIN_RADIAL, _PIN_TANGENTIAL, _PIN_RATE
    arm = torch.randint(arms, (n,), generator=gen).to(dtype)
    noise = torch.randn(n, 2, generator=gen, dtype=dtype)
    radial = 1 + radial_std * noise[:, 0]
    tangential = tangential_std * noise[:, 1]
    angle = arm * (2 * math.pi / arms) + rate * torch.exp(radial)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # (radial, tangential) times the rotation [[cos, -sin], [sin, cos]] from the right.
    return 2 * torch.stack([radial * cos + tangential * sin, tangential * cos - radial * sin], 1)


_PIN_NEWTON = 10  # safeguarded Newton steps per bracketed root (quadratic: a few suffice)


def _log_prob_pinwheel(x: Tensor, grid: int = 256, chunk: int = 1024) -> Tensor:
    """Exact pinwheel density by inverting the generator's change of variables.

    Per arm k, the features f = (f0, f1) ~ N((1, 0), diag(0.3^2, 0.1^2)) map to
    y = x / 2 = R(-theta) f with theta = 2 pi k / 5 + 0.25 exp(f0). Given y = rho (cos b, sin b),
    f = R(theta) y, so f0 solves g(f0) = f0 - rho cos(b + theta(f0)) = 0 on [-rho, rho]. The
    map has |det| = |1 + 0.25 exp(f0) f1|; it need not be injective, so every root counts:
    p(x) = 1/4 * 1/5 sum_k sum_roots N(f) / |det|. Roots are bracketed on a grid of ``grid``
    points, all arms at once (cos(b + 2 pi k / 5 + e) from one cos and one sin of b + e), and
    refined to machine precision by Newton steps kept inside their bracket, which bisect when
    Newton would leave it. Brackets that may hold several roots, and roots not converged,
    take 60 bisections instead, as in the first form of this function, which
    tests/test_densities.py holds this one to (1e-10).
    """
    arm_angle = torch.tensor(
        [2 * math.pi * k / _PIN_ARMS for k in range(_PIN_ARMS)], dtype=torch.float64
    ).to(x.device)
    cos_arm, sin_arm = torch.cos(arm_angle), torch.sin(arm_angle)
    axis = torch.linspace(-1, 1, grid, dtype=torch.float64, device=x.device)
    points = x.double()
    rows, lows, highs, g_lows, rhos, offsets = [], [], [], [], [], []
    for start in range(0, points.shape[0], chunk):
        y = points[start : start + chunk] / 2
        rho = y.norm(dim=1).clamp_min(1e-12)
        beta = torch.atan2(y[:, 1], y[:, 0])
        nodes = axis * rho[:, None]  # (n, grid)
        phase = beta[:, None] + _PIN_RATE * torch.exp(nodes)
        cos_p, sin_p = torch.cos(phase), torch.sin(phase)
        for k in range(_PIN_ARMS):
            # cos(phase + a_k) = cos(phase) cos(a_k) - sin(phase) sin(a_k)
            turned = cos_p * cos_arm[k] - sin_p * sin_arm[k]
            values = torch.addcmul(nodes, rho[:, None], turned, value=-1)
            # A sign change between neighbours (a node exactly at 0 counts once, on its right).
            pos, neg = values > 0, values < 0
            brackets = (~pos[:, :-1] & pos[:, 1:]) | (~neg[:, :-1] & neg[:, 1:])
            row, col = brackets.nonzero(as_tuple=True)
            rows.append(row + start)
            lows.append(nodes[row, col])
            highs.append(nodes[row, col + 1])
            g_lows.append(values[row, col])
            rhos.append(rho[row])
            offsets.append(beta[row] + arm_angle[k])
    row, low, high, g_low = (torch.cat(v) for v in (rows, lows, highs, g_lows))
    rho, offset = torch.cat(rhos), torch.cat(offsets)

    def g(f0: Tensor, rho: Tensor = rho, offset: Tensor = offset) -> tuple[Tensor, Tensor]:
        growth = _PIN_RATE * torch.exp(f0)
        angle = offset + growth
        return f0 - rho * torch.cos(angle), 1 + rho * torch.sin(angle) * growth

    bracket = low, high, g_low
    f0 = 0.5 * (low + high)
    step = torch.full_like(f0, math.inf)
    for _ in range(_PIN_NEWTON):
        value, slope = g(f0)
        same = torch.sign(value) == torch.sign(g_low)
        low = torch.where(same, f0, low)
        g_low = torch.where(same, value, g_low)
        high = torch.where(same, high, f0)
        newton = f0 - value / slope
        inside = (newton >= low) & (newton <= high)
        moved = torch.where(inside, newton, 0.5 * (low + high))
        step, f0 = (moved - f0).abs(), moved
    # Newton's root is the bisections' where the bracket holds one root only: g is monotone
    # on it when |g'(f0)| exceeds |g''| <= rho E (1 + E), E = 0.25 e^f0 at the bracket's top,
    # times the bracket's width. Elsewhere (far points, whose phase turns fast) and where
    # the last step still moved the root by more than a few ulps, the first form's 60
    # bisections of the grid bracket, which pick the same root of several as it did.
    low, high, g_low = bracket
    growth = _PIN_RATE * torch.exp(high)
    _, slope = g(f0)
    single = slope.abs() > rho * growth * (1 + growth) * (high - low)
    converged = step <= 4 * torch.finfo(torch.float64).eps * f0.abs().clamp_min(1e-3)
    slow = ~(single & converged)
    if slow.any():
        f0[slow] = _bisect(low[slow], high[slow], g_low[slow], rho[slow], offset[slow])
    f1 = rho * torch.sin(offset + _PIN_RATE * torch.exp(f0))
    log_n = (
        -0.5 * ((f0 - 1) / _PIN_RADIAL) ** 2
        - 0.5 * (f1 / _PIN_TANGENTIAL) ** 2
        - math.log(2 * math.pi * _PIN_RADIAL * _PIN_TANGENTIAL)
    )
    det = (1 + _PIN_RATE * torch.exp(f0) * f1).abs()
    total = points.new_zeros(points.shape[0]).index_add_(0, row, torch.exp(log_n) / det)
    return torch.log(total / (4 * _PIN_ARMS)).to(x.dtype)


def _bisect(low: Tensor, high: Tensor, g_low: Tensor, rho: Tensor, offset: Tensor) -> Tensor:
    """The root of f0 - rho cos(offset + 0.25 e^f0) in [low, high] by 60 bisections."""
    for _ in range(60):
        mid = 0.5 * (low + high)
        g_mid = mid - rho * torch.cos(offset + _PIN_RATE * torch.exp(mid))
        same = torch.sign(g_mid) == torch.sign(g_low)
        low = torch.where(same, mid, low)
        g_low = torch.where(same, g_mid, g_low)
        high = torch.where(same, high, mid)
    return 0.5 * (low + high)


# Scores: 8gaussians' in closed form; the rings' and the spirals' by autograd through their
# closed form and their quadrature (every Simpson term, which is smooth in x). Checkerboard's
# density is flat on its squares and jumps at their edges, and pinwheel's sums over the roots
# of an implicit equation: neither has one here.
DATASETS: dict[str, Dataset] = {
    "8gaussians": Dataset(
        "8gaussians", _sample_8gaussians, _log_prob_8gaussians, _score_8gaussians
    ),
    "spiral": Dataset(
        "spiral",
        _sample_spiral,
        _log_prob_spiral,
        autograd_score(lambda x: _log_prob_spirals_full(x, 1), chunk=1024),
    ),
    "2spirals": Dataset(
        "2spirals",
        _sample_2spirals,
        _log_prob_2spirals,
        autograd_score(lambda x: _log_prob_spirals_full(x, 2), chunk=1024),
    ),
    "checkerboard": Dataset("checkerboard", _sample_checkerboard, _log_prob_checkerboard),
    "rings": Dataset("rings", _sample_rings, _log_prob_rings, autograd_score(_log_prob_rings)),
    "pinwheel": Dataset("pinwheel", _sample_pinwheel, _log_prob_pinwheel),
}
# The dataset group's options (conf/dataset/; tests/test_configs.py checks they agree).
DATASET_NAMES = tuple(DATASETS)


def get_dataset(name: str) -> Dataset:
    """The registry entry for ``name``; a ``ValueError`` naming the choices otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}"
        ) from None


@dataclass(frozen=True)
class DataSource:
    """The ``dataset`` config node: a dataset of the registry, its dimension and the size of
    its training draw.

    Args:
        name: a key of ``DATASETS``.
        n_samples: training points, drawn once per seed from the seed's ``train`` stream.
        dim: d, even: the product of d / 2 independent copies of the 2-D dataset (2: itself).
    """

    name: str
    n_samples: int
    dim: int = 2

    def __post_init__(self) -> None:
        if self.dim < 2 or self.dim % 2:
            raise ValueError(f"dim={self.dim}: must be an even integer >= 2")

    @property
    def dataset(self) -> Dataset:
        return product(get_dataset(self.name), self.dim // 2)

    def training_set(self, seed: int) -> Tensor:
        return self.dataset.sample(self.n_samples, make_generator(seed, "train"))
