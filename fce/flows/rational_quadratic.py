"""The rational-quadratic spline of a coupling, from its conditioner's raw output, in few and
large tensor operations, with a hand-written backward.

A batch is feature-major here, the batch in the last, contiguous dimension: (t, n) points
and (3K - 1) t rows of raw parameters, bin-major, so reductions and broadcasts over the bins
run over the outermost dimension. At FCE's sizes (a thousand points, eight bins) an operation
costs about its dispatch, so the work is arranged to need few of them: the widths' and
heights' cumulative softmax sums come from one matrix product, the bin from one comparison
against the knots and one sum, and the knots on both sides of each point from one gather. The
derivatives go through the softplus only at the two knots each point uses.

Autograd would record the forward's few dozen operations and replay two or three for each in
the backward. ``RationalQuadratic`` instead runs the forward untracked and computes the
gradient by one reverse sweep written out by hand through the spline's formulas. The
inverse's gradient follows from the forward's by implicit differentiation: with
x = g^-1(y; theta), dx/dy = 1 / g'(x) and dx/dtheta = -(dg/dtheta) / g'(x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F


@dataclass(frozen=True)
class SplineConstants:
    """What the spline's maths needs besides the batch, in the batch's dtype and device."""

    bins: int
    bound: float
    derivative_shift: float
    min_derivative: float
    cumulate: Tensor  # (K+1, K): row k sums the bins below k (row 0 none, row K all)
    scales: Tensor  # (K+1, 1, 1, 1): knot k = offsets[k] + scales[k] * (share below k)
    offsets: Tensor  # (K+1, 1, 1, 1); the ends have scale 0: knots 0, K are -B, B exactly
    pair: Tensor  # (2, 1, 1): knots k and k + 1
    pair_xy: Tensor  # (2, 2, 1, 1): knots k and k + 1, abscissa and ordinate

    @staticmethod
    def make(
        bins: int,
        bound: float,
        min_bin: float,
        derivative_shift: float,
        min_derivative: float,
        like: Tensor,
    ) -> SplineConstants:
        k = torch.arange(bins + 1, dtype=torch.float64)
        offsets = 2 * bound * min_bin * k - bound
        offsets[0], offsets[-1] = -bound, bound
        scales = torch.full_like(offsets, 2 * bound * (1 - bins * min_bin))
        scales[0] = scales[-1] = 0.0
        cumulate = (torch.arange(bins) < torch.arange(bins + 1).unsqueeze(1)).double()
        return SplineConstants(
            bins=bins,
            bound=bound,
            derivative_shift=derivative_shift,
            min_derivative=min_derivative,
            cumulate=cumulate.to(like),
            scales=scales.view(-1, 1, 1, 1).to(like),
            offsets=offsets.view(-1, 1, 1, 1).to(like),
            pair=torch.tensor([0, 1], device=like.device).view(2, 1, 1),
            pair_xy=torch.tensor([0, 1], device=like.device).view(2, 1, 1, 1).expand(2, 2, 1, 1),
        )


def rational_quadratic(
    x: Tensor, raw: Tensor, c: SplineConstants, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    """The spline that ``raw`` sets, applied to ``x`` (t, n); the identity outside
    [-bound, bound]. ``raw`` is (3K - 1) t rows of n, bin-major: K x (width, height) x t
    values before the softmax, then (K - 1) x t interior derivatives before the softplus.
    Returns the image and, per entry, log|dg/dx| (inverse: -log g'(g^-1(x))).
    Differentiable in ``x`` and ``raw`` (first order)."""
    if not (torch.is_grad_enabled() and (x.requires_grad or raw.requires_grad)):
        out, log_grad, _ = _evaluate(x, raw, c, inverse, save=False)
    elif _transforms_active():
        out, log_grad, *_ = RationalQuadraticForTransforms.apply(x, raw, c, inverse)
    else:
        out, log_grad = RationalQuadratic.apply(x, raw, c, inverse)
    return out, log_grad


def _transforms_active() -> bool:
    """Whether a torch.func transform (vmap, jacrev, ...) is tracing: they need the
    ``setup_context`` form of a custom Function, which costs several times the classic form's
    overhead per call (about as much as a few dozen small operations)."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return True if active is None else active()


def _evaluate(
    x: Tensor, raw: Tensor, c: SplineConstants, inverse: bool, save: bool
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    k_bins = c.bins
    t, n = x.shape
    # Bin-major: every reduction and broadcast below is over the outermost dimension, and
    # the cumulative sums are one plain matrix product.
    sizes = raw[: 2 * k_bins * t].view(k_bins, 2, t, n)  # bins x (widths, heights) x t x n
    # Softmax shares as normalised cumulative sums of exp; the max taken out for range does
    # not change them.
    exp = (sizes - sizes.amax(0)).exp_()
    cumulative = torch.mm(c.cumulate, exp.view(k_bins, -1)).view(k_bins + 1, 2, t, n)
    total = cumulative[k_bins]
    share = cumulative / total
    knots = torch.addcmul(c.offsets, share, c.scales)  # (K+1, [x, y], t, n)
    # Outside, the spline is evaluated at the clamped point: finite, and discarded.
    x_in = x.clamp(-c.bound, c.bound)
    inside = x_in == x
    # The bin: how many interior knots lie at or below x, in 0..K-1 (clamping does not move
    # x across an interior knot, so the unclamped x finds the same bin).
    k = (x >= knots[1:k_bins, int(inverse)]).sum(0)
    at = knots.gather(0, k + c.pair_xy)  # ([k, k+1], [x, y], t, n)
    x_k, y_k = at[0].unbind(0)
    width, height = (at[1] - at[0]).unbind(0)
    # Derivatives at knots k and k+1: softplus of the raw values there (padded at the ends,
    # where the derivative is 1 exactly).
    index = k + c.pair
    raw_d = raw[2 * k_bins * t :].view(k_bins - 1, t, n)
    raw_d = F.pad(raw_d, (0, 0, 0, 0, 1, 1)).gather(0, index).add_(c.derivative_shift)
    end = index.remainder(k_bins) == 0
    d = F.softplus(raw_d).add_(c.min_derivative).masked_fill_(end, 1.0)
    d_k, d_k1 = d.unbind(0)
    slope = height / width
    curvature = torch.add(d_k1, d_k).sub_(slope, alpha=2)  # of xi (1 - xi) in the denominator
    if inverse:  # a xi^2 + b xi + c = 0: the root in [0, 1] (the paper's appendix)
        dy = x_in - y_k
        dy_curvature = dy * curvature
        a = torch.addcmul(dy_curvature, height, slope - d_k)
        b = height * d_k - dy_curvature
        minus_c = slope * dy
        discriminant = torch.addcmul(b * b, a, minus_c, value=4).clamp(min=0)
        # 2c / (-b - sqrt(b^2 - 4ac)) with the signs cleared: no cancellation
        xi = (minus_c + minus_c) / discriminant.sqrt_().add_(b)
    else:
        xi = (x_in - x_k) / width
    one_minus = 1 - xi
    both = xi * one_minus
    xi_sq = xi * xi
    denominator = torch.addcmul(slope, curvature, both)
    # g'(x) = slope^2 numerator / denominator^2
    numerator = torch.addcmul(
        torch.addcmul(d_k1 * xi_sq, slope, both, value=2), d_k, one_minus * one_minus
    )
    if inverse:
        out = torch.addcmul(x_k, xi, width)
        ratio = denominator / slope
        log_grad = (ratio * ratio / numerator).log_()
    else:
        out = torch.addcdiv(y_k, height * torch.addcmul(slope * xi_sq, d_k, both), denominator)
        ratio = slope / denominator
        log_grad = (ratio * ratio * numerator).log_()
    out = torch.where(inside, out, x)
    log_grad = log_grad.masked_fill_(~inside, 0.0)
    saved = ()
    if save:
        saved = (xi, slope, width, height, d_k, d_k1, both, denominator, numerator, curvature)
        saved += (inside, index, end, raw_d, exp, share, total)
    return out, log_grad, saved


class RationalQuadratic(torch.autograd.Function):
    """``rational_quadratic`` with its gradient in closed form."""

    @staticmethod
    def forward(ctx, x: Tensor, raw: Tensor, c: SplineConstants, inverse: bool):
        out, log_grad, saved = _evaluate(x, raw, c, inverse, save=True)
        ctx.constants, ctx.inverse = c, inverse
        ctx.save_for_backward(*saved)
        return out, log_grad

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_log: Tensor):
        return _backward(ctx.constants, ctx.inverse, ctx.saved_tensors, grad_out, grad_log)


class RationalQuadraticForTransforms(torch.autograd.Function):
    """The same for torch.func's transforms (vmap and jacrev in the tests): they only let
    ``setup_context`` save inputs and outputs, so the tensors the backward needs are extra,
    non-differentiable outputs."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, raw: Tensor, c: SplineConstants, inverse: bool):
        out, log_grad, saved = _evaluate(x, raw, c, inverse, save=True)
        return (out, log_grad, *saved)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, _, c, inverse = inputs
        ctx.constants, ctx.inverse = c, inverse
        ctx.mark_non_differentiable(*output[2:])
        ctx.save_for_backward(*output[2:])

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_log: Tensor, *_):
        return _backward(ctx.constants, ctx.inverse, ctx.saved_tensors, grad_out, grad_log)


def _backward(
    c: SplineConstants,
    inverse: bool,
    saved: tuple[Tensor, ...],
    grad_out: Tensor,
    grad_log: Tensor,
) -> tuple[Tensor, Tensor, None, None]:
    xi, slope, width, height, d_k, d_k1, both, den, numerator, curvature = saved[:10]
    inside, index, end, raw_d, exp, share, total = saved[10:]
    # Reverse mode by hand through g = y_k + h N / D and L = log g' = 2 log s + log M - 2 log D,
    # with N = s xi^2 + d_k B, D = s + c B, M = d_k+1 xi^2 + 2 s B + d_k (1 - xi)^2,
    # B = xi (1 - xi), c = d_k + d_k+1 - 2 s: one sweep for both outputs, at fixed x.
    one_minus = 1 - xi
    one_minus_2xi = one_minus - xi
    xi_sq = xi * xi
    inv_den = den.reciprocal()
    if inverse:
        # x = g^-1(y): dx/dy = 1 / g', dx/dtheta = -(dg/dtheta) / g' (implicit
        # differentiation), and the log-det is -L: the sweep below runs with the upstream
        # gradients u = -(dy-gradient) and v = -grad_log of g and L at fixed x.
        half_numerator_xi = torch.addcmul(
            torch.addcmul(d_k1 * xi, slope, one_minus_2xi), d_k, one_minus, value=-1
        )
        l_xi = 2 * (half_numerator_xi / numerator - curvature * one_minus_2xi * inv_den)
        ratio = slope * inv_den
        g_xi = ratio * ratio * numerator * width  # dg/dxi
        grad_in = (grad_out - grad_log * l_xi / width) * width / g_xi
        upstream_out, upstream_log = -grad_in, -grad_log
    else:
        upstream_out, upstream_log = grad_out, grad_log
    mask = inside.to(xi.dtype)  # the identity outside: no gradient to the spline
    u, v = upstream_out * mask, upstream_log * mask
    n_out = torch.addcmul(slope * xi_sq, d_k, both)
    u_d = u * inv_den
    bar_n = u_d * height
    bar_h = u_d * n_out
    bar_d = -torch.addcmul(2 * v, bar_n, n_out) * inv_den
    bar_m = v / numerator
    bar_s = torch.addcmul(torch.addcmul(2 * v / slope, bar_d, 1 - 2 * both), bar_n, xi_sq)
    bar_s = torch.addcmul(bar_s, bar_m, both, value=2)
    bar_b = torch.addcmul(torch.addcmul(bar_d * curvature, bar_n, d_k), slope, bar_m, value=2)
    bar_dk = torch.addcmul(both * (bar_n + bar_d), bar_m, one_minus * one_minus)
    bar_dk1 = torch.addcmul(bar_m * xi_sq, bar_d, both)
    half = torch.addcmul(
        bar_n * slope * xi, bar_m, torch.addcmul(d_k1 * xi, d_k, one_minus, value=-1)
    )
    bar_xi = torch.add(bar_b * one_minus_2xi, half, alpha=2)
    if inverse:
        grad_x = torch.where(inside, grad_in, grad_out)
    else:
        grad_x = torch.where(inside, bar_xi / width, grad_out)
    # Through w = x_k+1 - x_k, h = y_k+1 - y_k, s = h / w and xi = (x - x_k) / w to the knots.
    inv_width = width.reciprocal()
    a = bar_s * inv_width
    b = bar_xi * inv_width
    g_w = -torch.addcmul(slope * a, xi, b)
    g_h = bar_h + a
    grad_at = torch.stack([torch.stack([-b - g_w, u - g_h]), torch.stack([g_w, g_h])])
    k_bins, (t, n) = c.bins, u.shape
    grad_knots = u.new_zeros(k_bins + 1, 2, t, n).scatter(0, index[0] + c.pair_xy, grad_at)
    # knot_j = offset_j + scale_j C_j / C_K with C = cumulate @ exp; exp = e^(raw - max).
    grad_c = grad_knots * c.scales / total
    grad_exp = torch.mm(c.cumulate.t(), grad_c.view(k_bins + 1, -1)).view(k_bins, 2, t, n)
    grad_sizes = exp * (grad_exp - (grad_c * share).sum(0))
    # Derivatives: softplus' = sigmoid, zero at the ends (constant 1).
    grad_d = (torch.stack([bar_dk, bar_dk1]) * torch.sigmoid(raw_d)).masked_fill(end, 0.0)
    grad_raw_d = u.new_zeros(k_bins + 1, t, n).scatter(0, index, grad_d)[1:k_bins]
    grad_raw = torch.cat([grad_sizes.view(-1, n), grad_raw_d.view(-1, n)])
    return grad_x, grad_raw, None, None
