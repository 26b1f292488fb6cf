"""Neural spline flow: couplings that bend one half of the coordinates by monotone
rational-quadratic splines whose knots an MLP of the other half sets.

Each coupling maps the transformed half x_t elementwise by a spline g on [-B, B], made of K
bins; outside it, g is the identity (the tails), and its slope at -B and B is 1, so g and its
derivative are continuous there. In bin k, with knots (x_k, y_k), width w_k, height h_k, slope
s_k = h_k / w_k, knot derivatives d_k, d_k+1 and xi = (x - x_k) / w_k in [0, 1]
(Durkan et al., after Gregory & Delbourgo)::

    g(x)  = y_k + h_k (s_k xi^2 + d_k xi (1 - xi)) / (s_k + (d_k+1 + d_k - 2 s_k) xi (1 - xi))
    g'(x) = s_k^2 (d_k+1 xi^2 + 2 s_k xi (1 - xi) + d_k (1 - xi)^2)
            / (s_k + (d_k+1 + d_k - 2 s_k) xi (1 - xi))^2

and the inverse solves the quadratic a xi^2 + b xi + c = 0 for xi in [0, 1] (the paper's
appendix), with the root written as 2c / (-b - sqrt(b^2 - 4ac)), which does not cancel.
Widths and heights are a softmax with a floor (``min_bin``), derivatives a softplus with one
(``min_derivative``); the conditioner's last layer starts at zero and the softplus is shifted
so that a zero output gives d = 1: every coupling starts as the identity. Couplings alternate
which half they transform, which in 2-D is the swap of the two coordinates.

References:
    Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", NeurIPS 2019,
    arXiv:1906.04032.
    Gregory & Delbourgo, "Piecewise rational quadratic interpolation to monotonic data",
    IMA Journal of Numerical Analysis, 1982.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fce.flows.base import Flow, Transform, check_name

MIN_BIN = 1e-3  # the least width and height of a bin, as a share of 2B
MIN_DERIVATIVE = 1e-3  # the least derivative at an interior knot


class RQSplineCoupling(Transform):
    """z_t = g(x_t; theta(x_c)), z_c = x_c: one coupling of rational-quadratic splines.

    With ``flip`` False the first ``dim // 2`` coordinates condition and the rest are
    transformed; with ``flip`` True the last ``dim // 2`` condition and the first ones are
    transformed. The conditioner is an MLP ``dim // 2 -> hidden x hidden_layers (ReLU) ->
    (dim - dim // 2) (3 bins - 1)``: per transformed coordinate, ``bins`` widths, ``bins``
    heights and ``bins - 1`` interior derivatives.
    """

    def __init__(
        self,
        dim: int = 2,
        bins: int = 8,
        hidden: int = 64,
        hidden_layers: int = 2,
        tail_bound: float = 5.0,
        flip: bool = False,
        min_bin: float = MIN_BIN,
        min_derivative: float = MIN_DERIVATIVE,
    ) -> None:
        super().__init__()
        if dim < 2 or bins < 1 or hidden < 1 or hidden_layers < 1:
            raise ValueError(
                f"RQSplineCoupling needs dim >= 2 and bins, hidden, hidden_layers >= 1, got "
                f"{dim}, {bins}, {hidden}, {hidden_layers}"
            )
        if not (math.isfinite(tail_bound) and tail_bound > 0):
            raise ValueError(f"tail_bound must be a finite number > 0, got {tail_bound}")
        if not 0 < min_bin * bins < 1:
            raise ValueError(f"min_bin * bins must be in (0, 1), got {min_bin} * {bins}")
        self.dim, self.bins, self.tail_bound = dim, bins, float(tail_bound)
        self.flip = flip
        self.min_bin, self.min_derivative = min_bin, min_derivative
        n_cond = dim // 2
        self.n_transformed = dim - n_cond
        # The column where the second block (conditioning or transformed) starts.
        self.split = self.n_transformed if flip else n_cond
        sizes = [n_cond] + [hidden] * hidden_layers
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        out = nn.Linear(hidden, self.n_transformed * (3 * bins - 1))
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)
        # softplus(raw + shift) + min_derivative = 1 at raw = 0: the identity at init.
        self.derivative_shift = math.log(math.expm1(1.0 - min_derivative))
        # (-B, 0, ..., 0, B): the knots' fixed ends. Not state: it follows from the settings.
        edges = torch.zeros(bins + 1)
        edges[0], edges[-1] = -self.tail_bound, self.tail_bound
        self.register_buffer("edges", edges, persistent=False)
        # Interior knot k = knot_scale * (softmax summed below k) + knot_offsets[k - 1].
        self.knot_scale = 2 * self.tail_bound * (1 - bins * min_bin)
        offsets = 2 * self.tail_bound * min_bin * torch.arange(1, bins) - self.tail_bound
        self.register_buffer("knot_offsets", offsets, persistent=False)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(conditioning half, transformed half)."""
        first, second = x[:, : self.split], x[:, self.split :]
        return (second, first) if self.flip else (first, second)

    def _join(self, cond: Tensor, transformed: Tensor) -> Tensor:
        return torch.cat([transformed, cond] if self.flip else [cond, transformed], dim=1)

    def _knots(self, cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Knot abscissae and ordinates (n, t, K+1), from -B to B, and derivatives (n, t, K+1),
        1 at both ends."""
        raw = self.net(cond).unflatten(1, (self.n_transformed, 3 * self.bins - 1))
        sizes = raw[..., : 2 * self.bins].unflatten(-1, (2, self.bins))  # widths, heights
        knots = _cumulative_knots(sizes, self.knot_scale, self.knot_offsets, self.edges)
        knots_x, knots_y = knots.unbind(-2)
        interior = F.softplus(raw[..., 2 * self.bins :] + self.derivative_shift)
        derivatives = F.pad(interior + self.min_derivative, (1, 1), value=1.0)
        return knots_x, knots_y, derivatives

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        cond, x_t = self._split(x)
        z_t, log_det = rational_quadratic(x_t, *self._knots(cond), self.tail_bound)
        return self._join(cond, z_t), log_det.sum(1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        cond, z_t = self._split(z)
        x_t, log_det = rational_quadratic(z_t, *self._knots(cond), self.tail_bound, inverse=True)
        return self._join(cond, x_t), log_det.sum(1)


def _cumulative_knots(raw: Tensor, scale: float, offsets: Tensor, edges: Tensor) -> Tensor:
    """Knots from -B to B whose gaps are 2B (m + (1 - K m) softmax(raw)): each bin at least a
    share m of the interval. Knot k is 2B (1 - K m) (softmax summed over bins below k)
    + (2B k m - B): ``scale`` and ``offsets``; ``edges`` is (-B, 0, ..., 0, B), so the ends
    are exact. The softmax sums are the normalised cumulative sums of exp(raw), with no
    separate softmax (torch's is slow over a last dimension of a few bins); the max taken out
    for range is detached, as softmax does not depend on it."""
    exp = (raw - raw.detach().max(-1, keepdim=True).values).exp()
    cumulative = exp.cumsum(-1)
    share = cumulative[..., :-1] / cumulative[..., -1:]
    return F.pad(scale * share + offsets, (1, 1)) + edges


def rational_quadratic(
    x: Tensor,
    knots_x: Tensor,
    knots_y: Tensor,
    derivatives: Tensor,
    bound: float,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """The monotone rational-quadratic spline through the knots, the identity outside
    [-bound, bound], applied elementwise to ``x`` (n, t) with knots (n, t, K+1); or, with
    ``inverse``, its inverse. Returns the image and, per entry, log|dg/dx| (inverse: the log
    of the inverse's derivative, -log g'(g^-1(x)))."""
    inside = (x >= -bound) & (x <= bound)
    # Outside, the spline is evaluated at the clamped point: finite, and discarded.
    x_in = x.clamp(-bound, bound).unsqueeze(-1)
    # The bin: how many interior knots lie at or below x, in 0..K-1.
    source = knots_y if inverse else knots_x
    k = torch.searchsorted(source[..., 1:-1].contiguous(), x_in, right=True)
    x_k, y_k, d_k = knots_x.gather(-1, k), knots_y.gather(-1, k), derivatives.gather(-1, k)
    k1 = k + 1
    width = knots_x.gather(-1, k1) - x_k
    height = knots_y.gather(-1, k1) - y_k
    d_k1 = derivatives.gather(-1, k1)
    slope = height / width
    curvature = d_k1 + d_k - 2 * slope  # the denominator's coefficient of xi (1 - xi)
    if inverse:  # a xi^2 + b xi + c = 0: the root in [0, 1] (the paper's appendix)
        dy = x_in - y_k
        a = height * (slope - d_k) + dy * curvature
        b = height * d_k - dy * curvature
        c = -slope * dy
        discriminant = (b.square() - 4 * a * c).clamp(min=0)
        xi = (2 * c) / (-b - discriminant.sqrt())
    else:
        xi = (x_in - x_k) / width
    one_minus = 1 - xi
    both = xi * one_minus
    denominator = slope + curvature * both
    numerator = d_k1 * xi.square() + 2 * slope * both + d_k * one_minus.square()
    log_grad = 2 * torch.log(slope) + torch.log(numerator) - 2 * torch.log(denominator)
    if inverse:
        out, log_grad = x_k + xi * width, -log_grad
    else:
        out = y_k + height * (slope * xi.square() + d_k * both) / denominator
    out, log_grad = out.squeeze(-1), log_grad.squeeze(-1)
    return torch.where(inside, out, x), torch.where(inside, log_grad, 0.0)


class Spline(Flow):
    """``n_layers`` rational-quadratic spline couplings, alternating the transformed half.

    At the defaults (4 layers, 8 bins, 2 hidden layers of 64, 2-D) it has 23,132 parameters.
    """

    name = "spline"

    def __init__(
        self,
        n_layers: int = 4,
        bins: int = 8,
        hidden: int = 64,
        hidden_layers: int = 2,
        tail_bound: float = 5.0,
        dim: int = 2,
        name: str = "spline",
    ) -> None:
        check_name(self, name)
        if n_layers < 1 or bins < 1 or hidden < 1 or hidden_layers < 1 or dim < 2:
            raise ValueError(
                f"Spline needs n_layers, bins, hidden, hidden_layers >= 1 and dim >= 2, got "
                f"{n_layers}, {bins}, {hidden}, {hidden_layers}, {dim}"
            )
        if not (math.isfinite(tail_bound) and tail_bound > 0):
            raise ValueError(f"Spline needs a finite tail_bound > 0, got {tail_bound}")
        couplings: list[Transform] = [
            RQSplineCoupling(dim, bins, hidden, hidden_layers, tail_bound, flip=i % 2 == 1)
            for i in range(n_layers)
        ]
        super().__init__(couplings, dim=dim)
