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

The flow runs its couplings on the batch transposed, (dim, n), and the spline's maths (in
``fce.flows.rational_quadratic``, with its gradient in closed form) in a few large tensor
operations: at FCE's batch of a thousand points each operation costs about its dispatch.

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

from fce.flows.base import Flow, Transform, standard_normal_log_prob
from fce.flows.rational_quadratic import SplineConstants, rational_quadratic

MIN_BIN = 1e-3  # the least width and height of a bin, as a share of 2B
MIN_DERIVATIVE = 1e-3  # the least derivative at an interior knot
_LOG_2PI = math.log(2 * math.pi)


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
        # The linear layers, kept at hand: slicing the Sequential builds a new module per call.
        self._linears = tuple(self.net[::2])
        # softplus(raw + shift) + min_derivative = 1 at raw = 0: the identity at init.
        self.derivative_shift = math.log(math.expm1(1.0 - min_derivative))
        self._constants_cache: dict = {}
        # The conditioner's outputs reordered bin-major (K x (width, height) x t, then
        # (K - 1) x t derivatives) for the spline's maths; its weights keep their layout, so
        # checkpoints do not change.
        rows = torch.arange(self.n_transformed * (3 * bins - 1)).view(self.n_transformed, -1)
        sizes = rows[:, : 2 * bins].unflatten(1, (2, bins)).permute(2, 1, 0)
        order = torch.cat([sizes.flatten(), rows[:, 2 * bins :].t().flatten()])
        self.register_buffer("bin_major", order, persistent=False)

    def _constants(self, like: Tensor) -> SplineConstants:
        """The spline's fixed tensors in the dtype and device of ``like``, made from Python
        floats once per dtype (buffers would keep a float32 rounding after ``.double()``)."""
        key = (like.dtype, like.device)
        constants = self._constants_cache.get(key)
        if constants is None:
            constants = SplineConstants.make(
                self.bins,
                self.tail_bound,
                self.min_bin,
                self.derivative_shift,
                self.min_derivative,
                like,
            )
            self._constants_cache[key] = constants
        return constants

    def _raw(self, cond: Tensor) -> Tensor:
        """The conditioner on feature-major rows (n_cond, n): raw spline parameters
        ((3K - 1) t, n), bin-major, the batch last, so the spline's maths runs along it with unit
        stride (batch-major, it ran on strided slices of a few bins each, several times
        slower)."""
        *hidden, last = self._linears
        h = cond
        for i, layer in enumerate(hidden):
            h = torch.addmm(layer.bias.unsqueeze(1), layer.weight, h.relu_() if i else h)
        order = self.bin_major
        return torch.addmm(last.bias[order].unsqueeze(1), last.weight[order], h.relu_())

    def _split_rows(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(conditioning rows, transformed rows) of a feature-major (dim, n) batch."""
        first, second = x[: self.split], x[self.split :]
        return (second, first) if self.flip else (first, second)

    def _join_rows(self, cond: Tensor, transformed: Tensor) -> Tensor:
        return torch.cat([transformed, cond] if self.flip else [cond, transformed])

    def apply_rows(self, x: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
        """``forward`` (or ``inverse``) on a feature-major batch (dim, n): the form the flow
        chains, transposing once per pass rather than once per coupling."""
        cond, x_t = self._split_rows(x)
        y_t, log_grad = rational_quadratic(x_t, self._raw(cond), self._constants(x), inverse)
        log_det = log_grad[0] if self.n_transformed == 1 else log_grad.sum(0)
        return self._join_rows(cond, y_t), log_det

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, log_det = self.apply_rows(x.t().contiguous())
        return z.t().contiguous(), log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x, log_det = self.apply_rows(z.t().contiguous(), inverse=True)
        return x.t().contiguous(), log_det


class Spline(Flow):
    """``n_layers`` rational-quadratic spline couplings, alternating the transformed half.

    At the defaults (4 layers, 8 bins, 2 hidden layers of 64, 2-D) it has 23,132 parameters.
    """

    name = "spline"
    compile_pays = True  # its passes are dozens of small elementwise operations

    def __init__(
        self,
        n_layers: int = 4,
        bins: int = 8,
        hidden: int = 64,
        hidden_layers: int = 2,
        tail_bound: float = 5.0,
        dim: int = 2,
    ) -> None:
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

    def _chain(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """The couplings (reversed for the inverse) on a batch (n, dim), chained feature-major:
        the image, feature-major (dim, n), and the summed log|det|."""
        rows = x.t().contiguous()
        log_det = None
        for coupling in reversed(self.transforms) if inverse else self.transforms:
            rows, ld = coupling.apply_rows(rows, inverse)
            log_det = ld if log_det is None else log_det + ld
        return rows, log_det

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, log_det = self._chain(x, inverse=False)
        return z.t().contiguous(), log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x, log_det = self._chain(z, inverse=True)
        return x.t().contiguous(), log_det

    def log_prob(self, x: Tensor) -> Tensor:
        z, log_det = self._chain(x, inverse=False)
        return _normal_log_prob_rows(z) + log_det

    def transform_noise(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x, log_det = self._chain(z, inverse=True)
        return x.t().contiguous(), standard_normal_log_prob(z) - log_det


def _normal_log_prob_rows(z: Tensor) -> Tensor:
    """``standard_normal_log_prob`` of a feature-major batch (dim, n)."""
    return (z * z).sum(0).add_(z.shape[0] * _LOG_2PI).mul_(-0.5)
