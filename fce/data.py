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

DATASET_NAMES = ("8gaussians", "spiral", "2spirals", "checkerboard", "rings", "pinwheel")

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


def _spiral_arm(n: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    # Arc parameter t = sqrt(u) * 3 pi (540 degrees), a box jitter of width 0.5 on each axis.
    t = torch.sqrt(torch.rand(n, generator=gen, dtype=dtype)) * (3 * math.pi)
    jitter = 0.5 * torch.rand(n, 2, generator=gen, dtype=dtype)
    return torch.stack([-torch.cos(t) * t, torch.sin(t) * t], dim=1) + jitter


def _sample_spiral(n: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    arm = _spiral_arm(n, gen, dtype)
    return arm / 3 + 0.1 * torch.randn(n, 2, generator=gen, dtype=dtype)


def _sample_2spirals(n: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    arm = _spiral_arm(n, gen, dtype)
    # Each point picks one of the two arms (the second is the first rotated by pi).
    sign = 1 - 2 * torch.randint(2, (n, 1), generator=gen).to(dtype)
    return sign * arm / 3 + 0.1 * torch.randn(n, 2, generator=gen, dtype=dtype)


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


# --- pinwheel ---------------------------------------------------------------------------------


def _sample_pinwheel(n: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    arm = torch.randint(arms, (n,), generator=gen).to(dtype)
    noise = torch.randn(n, 2, generator=gen, dtype=dtype)
    radial = 1 + radial_std * noise[:, 0]
    tangential = tangential_std * noise[:, 1]
    angle = arm * (2 * math.pi / arms) + rate * torch.exp(radial)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # (radial, tangential) times the rotation [[cos, -sin], [sin, cos]] from the right.
    return 2 * torch.stack([radial * cos + tangential * sin, tangential * cos - radial * sin], 1)


DATASETS: dict[str, Dataset] = {
    "8gaussians": Dataset("8gaussians", _sample_8gaussians, _log_prob_8gaussians),
    "spiral": Dataset("spiral", _sample_spiral),
    "2spirals": Dataset("2spirals", _sample_2spirals),
    "checkerboard": Dataset("checkerboard", _sample_checkerboard, _log_prob_checkerboard),
    "rings": Dataset("rings", _sample_rings),
    "pinwheel": Dataset("pinwheel", _sample_pinwheel),
}
assert tuple(DATASETS) == DATASET_NAMES


def get_dataset(name: str) -> Dataset:
    """The registry entry for ``name``; a ``ValueError`` naming the choices otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}"
        ) from None
