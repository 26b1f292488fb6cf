"""The energy-based model: log p_theta(x) = -f_theta(x) - c, with c a learned log-normaliser;
or, on top of a fixed density q, log p_theta(x) = log q(x) - f_theta(x) - c."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

# The energy's nonlinearity, by ``ebm.activation``: LeakyReLU is the reference's; the smooth
# ones give a smooth energy (docs/truth.md measures what that buys).
ACTIVATIONS = ("leaky_relu", "silu", "softplus", "elu", "tanh")
# What the energy sits on: nothing (the plain EBM), or the estimator's fixed noise.
BASES = ("none", "noise")


def _activation(name: str, negative_slope: float) -> nn.Module:
    if name == "leaky_relu":
        # In place: it acts on the Linear's own output, and its backward needs only the
        # sign of the result. Bit-identical, and a faster EBM step: two 2000 x 128
        # activations fewer to allocate and write (docs/performance.md measures it).
        return nn.LeakyReLU(negative_slope, inplace=True)
    if name == "silu":
        return nn.SiLU()
    if name == "softplus":
        return nn.Softplus()
    if name == "elu":
        return nn.ELU()
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"activation={name!r}: must be one of {', '.join(ACTIVATIONS)}")


class FourierFeatures(nn.Module):
    """x -> [x, sin(2 pi B x), cos(2 pi B x)] with a fixed Gaussian B of scale ``scale``.

    Random Fourier features let an MLP represent detail finer than its first layer would
    (Tancik et al., "Fourier Features Let Networks Learn High Frequency Functions in Low
    Dimensional Domains", NeurIPS 2020). B is a buffer: fixed at init, saved in checkpoints.
    """

    def __init__(self, dim: int, features: int, scale: float) -> None:
        super().__init__()
        self.register_buffer("frequencies", torch.randn(dim, features) * scale)
        self.out_features = dim + 2 * features

    def forward(self, x: Tensor) -> Tensor:
        phase = 2 * math.pi * x @ self.frequencies
        return torch.cat([x, phase.sin(), phase.cos()], dim=-1)


class EBM(nn.Module):
    """An MLP energy f_theta and a trainable scalar c, the log normalising constant.

    The reference's model is the default: 2 -> 128 -> 128 -> 1, LeakyReLU(0.2), c = 1 at init.

    Args:
        dim: the data's dimension.
        hidden: the widths of the hidden layers (their number is the depth).
        negative_slope: LeakyReLU's slope for x < 0 (``activation="leaky_relu"`` only).
        log_z_init: c at initialisation.
        activation: one of ``ACTIVATIONS``.
        fourier_features: how many random Fourier features feed the first layer (0: none,
            the reference's plain coordinates).
        fourier_scale: the standard deviation of their frequencies (cycles per unit of x).
        base: ``none``; or ``noise``, an energy on top of the fixed noise q of an estimator
            that has one (NCE), attached by it (``attach_base``): log p_theta = log q - f - c,
            so that the model has q's tails and, with f = 0 and c = 0, q's normaliser. NCE's
            logit log p_theta - log q is then -f - c: f learns the log-ratio of the data to q
            alone.

    References:
        Gao et al., "Flow Contrastive Estimation of Energy-Based Models", arXiv:1912.00589.
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: Sequence[int] = (128, 128),
        negative_slope: float = 0.2,
        log_z_init: float = 1.0,
        activation: str = "leaky_relu",
        fourier_features: int = 0,
        fourier_scale: float = 1.0,
        base: str = "none",
    ) -> None:
        super().__init__()
        if not hidden or any(h <= 0 for h in hidden):
            raise ValueError(f"hidden sizes must be positive, got {list(hidden)}")
        if base not in BASES:
            raise ValueError(f"base={base!r}: must be one of {', '.join(BASES)}")
        if fourier_features < 0:
            raise ValueError(f"fourier_features must be >= 0, got {fourier_features}")
        _activation(activation, negative_slope)  # a bad name fails before any layer is drawn
        layers: list[nn.Module] = []
        n_in = dim
        if fourier_features:
            features = FourierFeatures(dim, fourier_features, fourier_scale)
            layers.append(features)
            n_in = features.out_features
        sizes = [n_in, *hidden]
        for n_in, n_out in itertools.pairwise(sizes):
            layers += [nn.Linear(n_in, n_out), _activation(activation, negative_slope)]
        layers.append(nn.Linear(sizes[-1], 1))
        self.energy_net = nn.Sequential(*layers)
        self.log_z = nn.Parameter(torch.tensor(float(log_z_init)))
        self.base = base
        self.base_density: nn.Module | None = None

    def attach_base(self, density: nn.Module) -> None:
        """Put the energy on top of ``density`` (a fixed flow: ``log_prob``), frozen; it is
        part of the model from now on, its weights in the model's state."""
        if self.base != "noise":
            raise ValueError(f"attach_base: this EBM's base is {self.base!r}, not 'noise'")
        self.base_density = density.requires_grad_(False)

    def energy(self, x: Tensor) -> Tensor:
        """The energy of log p_theta = -energy - c, one value per row of ``x``: f_theta(x),
        less log q(x) when the EBM sits on a base q."""
        energy = self.energy_net(x).squeeze(-1)
        if self.base_density is not None:
            energy = energy - self.base_density.log_prob(x)
        elif self.base != "none":
            raise RuntimeError("this EBM sits on its estimator's noise, not attached yet")
        return energy

    def forward(self, x: Tensor) -> Tensor:
        """log p_theta(x) = -f_theta(x) - c (self-normalised through the learned c)."""
        return -self.energy(x) - self.log_z
