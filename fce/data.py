"""The six 2-D datasets of the reference, as a registry of seeded samplers and densities.

Every sampler draws from an explicit ``torch.Generator`` (never the global RNG), so one seed
gives the same bytes in any process, and draws points i.i.d. from the mixture it describes, so
any ``n`` works. ``log_prob`` is set where the density has a closed form.
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


@dataclass(frozen=True)
class Dataset:
    """A 2-D distribution known by its samples and, where it has one, its exact log-density."""

    name: str
    sample_fn: Sampler
    log_prob_fn: LogProb | None = None

    @property
    def has_log_prob(self) -> bool:
        return self.log_prob_fn is not None

    def sample(
        self, n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Draw ``n`` i.i.d. points as an ``(n, 2)`` tensor on the generator's device (CPU)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return self.sample_fn(n, generator, dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of each row of ``x``; ``-inf`` outside the support."""
        if self.log_prob_fn is None:
            raise NotImplementedError(f"dataset {self.name!r} has no closed-form density")
        return self.log_prob_fn(x)


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


def _log_prob_spiral_arm(x: Tensor, chunk: int = 2048) -> Tensor:
    """log density of one spiral arm: t has density 2t / (3 pi)^2 on [0, 3 pi]; given t the point
    is uniform on a square of side 1/6 at c(t) / 3, then blurred by N(0, 0.1^2 I), so

        p(x) = int p(t) prod_i [Phi((x_i - a_i(t)) / s) - Phi((x_i - a_i(t) - 1/6) / s)] * 6 dt

    with a(t) = (-t cos t, t sin t) / 3: a 1-D integral, by composite Simpson in t over 768
    intervals (the integrand varies on scales of s / |a'(t)| >= 0.03; the nodes are 0.012
    apart; against 16,384 nodes the largest error is below 1e-4 nats, tests/test_densities.py).
    """
    t_max = _SPIRAL_T_MAX
    n = _SPIRAL_T_NODES  # even: composite Simpson over n intervals, nodes 1..n (p(0) = 0)
    h = t_max / n
    t = torch.arange(1, n + 1, dtype=torch.float64, device=x.device) * h
    simpson = torch.where(torch.arange(1, n + 1) % 2 == 1, 4.0, 2.0).to(t)
    simpson[-1] = 1.0
    log_weight = torch.log(2 * t / t_max**2 * simpson * h / 3)  # p(t) dt
    corner = torch.stack([-torch.cos(t) * t, torch.sin(t) * t], dim=1) / _SPIRAL_SHRINK
    scale = _SPIRAL_NOISE * math.sqrt(2)
    out = []
    for part in x.double().split(chunk):
        u = part[:, None, :] - corner[None]  # (n, T, 2)
        # P(x_i - noise in [a_i, a_i + 1/6]) per axis, as a difference of erfcs taken on the
        # side where it does not cancel, so far-away points get accurate (not zero) density.
        upper = u > _SPIRAL_BOX / 2
        mass = 0.5 * torch.where(
            upper,
            torch.erfc((u - _SPIRAL_BOX) / scale) - torch.erfc(u / scale),
            torch.erfc(-u / scale) - torch.erfc((_SPIRAL_BOX - u) / scale),
        )
        log_box = torch.log(mass.clamp_min(1e-300)).sum(-1) - 2 * math.log(_SPIRAL_BOX)
        out.append(torch.logsumexp(log_box + log_weight, dim=1))
    return torch.cat(out).to(x.dtype)


def _log_prob_spiral(x: Tensor) -> Tensor:
    return _log_prob_spiral_arm(x)


def _log_prob_2spirals(x: Tensor) -> Tensor:
    # The second arm is the first one negated (the noise is symmetric): p2(x) = p1(-x).
    both = torch.stack([_log_prob_spiral_arm(x), _log_prob_spiral_arm(-x)], dim=1)
    return torch.logsumexp(both, dim=1) - math.log(2.0)


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


def _log_prob_pinwheel(x: Tensor, grid: int = 256, chunk: int = 2048) -> Tensor:
    """Exact pinwheel density by inverting the generator's change of variables.

    Per arm k, the features f = (f0, f1) ~ N((1, 0), diag(0.3^2, 0.1^2)) map to
    y = x / 2 = R(-theta) f with theta = 2 pi k / 5 + 0.25 exp(f0). Given y = rho (cos b, sin b),
    f = R(theta) y, so f0 solves g(f0) = f0 - rho cos(b + theta(f0)) = 0 on [-rho, rho]. The
    map has |det| = |1 + 0.25 exp(f0) f1|; it need not be injective, so every root counts:
    p(x) = 1/4 * 1/5 sum_k sum_roots N(f) / |det|. Roots are bracketed on a grid of ``grid``
    points and refined by 60 bisections (to machine precision).
    """
    out = []
    for part in x.double().split(chunk):
        y = part / 2
        rho = y.norm(dim=1).clamp_min(1e-12)
        beta = torch.atan2(y[:, 1], y[:, 0])
        total = torch.zeros_like(rho)
        for k in range(_PIN_ARMS):
            offset = beta + 2 * math.pi * k / _PIN_ARMS

            def g(f0: Tensor, offset: Tensor = offset, rho: Tensor = rho) -> Tensor:
                return f0 - rho[..., None] * torch.cos(
                    offset[..., None] + _PIN_RATE * torch.exp(f0)
                )

            nodes = torch.linspace(-1, 1, grid, dtype=torch.float64) * rho[:, None]
            values = g(nodes)
            brackets = (values[:, :-1] <= 0) & (values[:, 1:] > 0) | (values[:, :-1] >= 0) & (
                values[:, 1:] < 0
            )
            row, col = brackets.nonzero(as_tuple=True)
            low, high = nodes[row, col], nodes[row, col + 1]
            g_low = values[row, col]
            sub_rho, sub_offset = rho[row], offset[row]
            for _ in range(60):
                mid = 0.5 * (low + high)
                g_mid = mid - sub_rho * torch.cos(sub_offset + _PIN_RATE * torch.exp(mid))
                same = torch.sign(g_mid) == torch.sign(g_low)
                low = torch.where(same, mid, low)
                g_low = torch.where(same, g_mid, g_low)
                high = torch.where(same, high, mid)
            f0 = 0.5 * (low + high)
            f1 = sub_rho * torch.sin(sub_offset + _PIN_RATE * torch.exp(f0))
            log_n = (
                -0.5 * ((f0 - 1) / _PIN_RADIAL) ** 2
                - 0.5 * (f1 / _PIN_TANGENTIAL) ** 2
                - math.log(2 * math.pi * _PIN_RADIAL * _PIN_TANGENTIAL)
            )
            det = (1 + _PIN_RATE * torch.exp(f0) * f1).abs()
            total.index_add_(0, row, torch.exp(log_n) / det)
        out.append(torch.log(total / (4 * _PIN_ARMS)))
    return torch.cat(out).to(x.dtype)


DATASETS: dict[str, Dataset] = {
    "8gaussians": Dataset("8gaussians", _sample_8gaussians, _log_prob_8gaussians),
    "spiral": Dataset("spiral", _sample_spiral, _log_prob_spiral),
    "2spirals": Dataset("2spirals", _sample_2spirals, _log_prob_2spirals),
    "checkerboard": Dataset("checkerboard", _sample_checkerboard, _log_prob_checkerboard),
    "rings": Dataset("rings", _sample_rings, _log_prob_rings),
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
    """The ``dataset`` config node: a dataset of the registry and the size of its training draw.

    Args:
        name: a key of ``DATASETS``.
        n_samples: training points, drawn once per seed from the seed's ``train`` stream.
    """

    name: str
    n_samples: int

    @property
    def dataset(self) -> Dataset:
        return get_dataset(self.name)

    def training_set(self, seed: int) -> Tensor:
        return self.dataset.sample(self.n_samples, make_generator(seed, "train"))
