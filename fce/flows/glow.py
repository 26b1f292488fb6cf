"""Glow: K steps of ActNorm -> invertible LU linear map -> affine coupling, in d dimensions.

In 2-D (the reference's case) the linear map and its inverse are written out as 2x2 closed
forms; in d > 2 they are a (d, d) LU product and triangular solves. Each coupling transforms
the first d // 2 coordinates conditioned on the rest; the linear maps mix them between steps.

References:
    Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
    arXiv:1807.03039.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fce.flows.base import Flow, Transform, standard_normal_log_prob


class ActNorm(Transform):
    """Per-coordinate affine z = (x - loc) / exp(log_scale), initialised from a data batch."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.init_pending = False

    def init_from_data(self, x: Tensor) -> None:
        self.loc.data.copy_(x.mean(0))
        self.log_scale.data.copy_(torch.log(x.std(0, unbiased=False) + 1e-6))
        self.init_pending = False

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.init_pending:
            self.init_from_data(x)
        z = (x - self.loc) * torch.exp(-self.log_scale)
        return z, (-self.log_scale.sum()).expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x = z * torch.exp(self.log_scale) + self.loc
        return x, self.log_scale.sum().expand(z.shape[0])


class InvertibleLinearLU(Transform):
    """z = x W^T with W = P L (U + diag(sign * exp(log_s))): Glow's "1x1 convolution".

    The LU form makes log|det W| = sum(log_s) exact and cheap. In 2-D, L and U have one free
    entry each (scalar parameters ``lower`` and ``upper``) and the inverse is the closed-form
    2x2 adjugate, no LAPACK call; in d > 2 ``lower`` and ``upper`` hold the d (d - 1) / 2
    entries of L's strict lower and U's strict upper triangle, and the inverse is two
    triangular solves.
    """

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"InvertibleLinearLU needs dim >= 2, got dim={dim}")
        self.dim = dim
        # Start from a random rotation, as Glow does, factorised once.
        q, _ = torch.linalg.qr(torch.randn(dim, dim))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        # sign(det W) = det(P) * prod(sign_s): fixed, so kept out of the forward pass.
        self.register_buffer("det_sign", torch.det(p) * torch.sign(s).prod())
        if dim == 2:
            self.lower = nn.Parameter(lower[1, 0].clone())
            self.upper = nn.Parameter(upper[0, 1].clone())
        else:  # the strict triangles' entries, in torch.tril_indices / triu_indices order
            rows, cols = torch.tril_indices(dim, dim, -1)
            self.lower = nn.Parameter(lower[rows, cols].clone())
            rows, cols = torch.triu_indices(dim, dim, 1)
            self.upper = nn.Parameter(upper[rows, cols].clone())
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def weight(self) -> Tensor:
        return lu_matrix(self.sign_s, self.log_s, self.lower, self.upper, self.perm)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x @ self.weight().T, self.log_s.sum().expand(x.shape[0])

    def inverse_weight(self, w: Tensor | None = None) -> Tensor:
        """W^-1 (``w``: W itself, if already computed)."""
        if self.dim != 2:
            return lu_inverse(self.sign_s, self.log_s, self.lower, self.upper, self.perm)
        w = self.weight() if w is None else w
        return inverse_2x2(w, self.det_sign * torch.exp(self.log_s.sum()))

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z @ self.inverse_weight().T, (-self.log_s.sum()).expand(z.shape[0])


def lu_matrix(sign_s: Tensor, log_s: Tensor, lower: Tensor, upper: Tensor, perm: Tensor) -> Tensor:
    """W = P L (U + diag(sign_s exp(log_s))) for one step, or a stack of steps (leading dims).

    In 2-D ``lower`` and ``upper`` are the one free entry of L and U; in d > 2, the entries
    of their strict triangles (``InvertibleLinearLU``)."""
    if log_s.shape[-1] != 2:
        lower_unit, upper_diag = _lu_factors(sign_s, log_s, lower, upper)
        return perm @ lower_unit @ upper_diag
    # L U = [[s0, u], [l s0, l u + s1]], written out: four scalars, no tiny matmuls (which
    # cost more in dispatch than in arithmetic); P only reorders the rows.
    s0, s1 = (sign_s * torch.exp(log_s)).unbind(-1)
    lu = torch.stack([s0, upper, lower * s0, lower * upper + s1], dim=-1).unflatten(-1, (2, 2))
    rows = perm.argmax(-1)  # P @ M == M[P.argmax(1)]
    return lu.gather(-2, rows[..., :, None].expand(lu.shape))


def _lu_factors(
    sign_s: Tensor, log_s: Tensor, lower: Tensor, upper: Tensor
) -> tuple[Tensor, Tensor]:
    """L (unit lower-triangular) and U + diag(sign_s exp(log_s)) of the d > 2 form, from the
    strict triangles' entries (leading dims stacked)."""
    d = log_s.shape[-1]
    shape = (*log_s.shape[:-1], d, d)
    lower_unit = torch.eye(d, dtype=log_s.dtype, device=log_s.device).expand(shape).clone()
    rows, cols = torch.tril_indices(d, d, -1, device=log_s.device)
    lower_unit[..., rows, cols] = lower
    upper_diag = torch.diag_embed(sign_s * torch.exp(log_s))
    rows, cols = torch.triu_indices(d, d, 1, device=log_s.device)
    upper_diag[..., rows, cols] = upper
    return lower_unit, upper_diag


def lu_inverse(
    sign_s: Tensor, log_s: Tensor, lower: Tensor, upper: Tensor, perm: Tensor
) -> Tensor:
    """W^-1 = (U + S)^-1 L^-1 P^T of the d > 2 form, by two triangular solves (leading dims
    stacked)."""
    lower_unit, upper_diag = _lu_factors(sign_s, log_s, lower, upper)
    inv_lower_perm = torch.linalg.solve_triangular(
        lower_unit, perm.mT.expand(lower_unit.shape), upper=False, unitriangular=True
    )
    return torch.linalg.solve_triangular(upper_diag, inv_lower_perm, upper=True)


def inverse_2x2(w: Tensor, det: Tensor) -> Tensor:
    """The inverse of 2x2 matrices (leading dims stacked) as the adjugate over the determinant:
    closed form, no LAPACK call."""
    a, b, c, d = w.flatten(-2).unbind(-1)
    return torch.stack([d, -b, -c, a], dim=-1).unflatten(-1, (2, 2)) / det[..., None, None]


def fold_actnorm(
    weight: Tensor, bias: Tensor, loc: Tensor, log_scale: Tensor
) -> tuple[Tensor, Tensor]:
    """A linear layer then ActNorm, (W h + b - loc) / e^ls, as one layer (weight, bias); for one
    layer or a stack of them (leading dims). The (batch, width) activations are then touched
    once, not three times (and their backward)."""
    scale = torch.exp(-log_scale)
    return weight * scale[..., :, None], (bias - loc) * scale


class AffineCoupling(Transform):
    """z_a = s(x_b) * x_a + t(x_b), z_b = x_b, with s = sigmoid(. + 2) as in Glow.

    The conditioner is an MLP 1 -> width -> ... -> 2 with ActNorm + ReLU after each hidden
    layer, its last layer zero-initialised, and a learned output scale exp(log_scale_factor).

    log s is floored at -scale_bound. Unbounded, a sample that strays far out meets a
    conditioner extrapolating linearly, s underflows to 0, and the inverse divides by it:
    FCE on spiral (seed 2) drew infinite samples at step 3,512. The floor caps each coupling's
    expansion when sampling at e^scale_bound; above it, s is exactly Glow's.
    """

    def __init__(
        self, width: int = 64, hidden_layers: int = 2, scale_bound: float = 10.0, dim: int = 2
    ) -> None:
        super().__init__()
        self.scale_bound = scale_bound
        # x_a, the first dim // 2 coordinates, is transformed; x_b, the rest, conditions.
        self.n_a = dim // 2
        sizes = [dim - self.n_a] + [width] * hidden_layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.norms = nn.ModuleList(ActNorm(width) for _ in range(hidden_layers))
        self.out = nn.Linear(width, 2 * self.n_a)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.log_scale_factor = nn.Parameter(torch.zeros(2 * self.n_a))

    def _shift_and_log_scale(self, x_b: Tensor) -> tuple[Tensor, Tensor]:
        h = x_b
        for linear, norm in zip(self.hidden, self.norms):
            if norm.init_pending:
                norm.init_from_data(linear(h))
            weight, bias = fold_actnorm(linear.weight, linear.bias, norm.loc, norm.log_scale)
            h = F.relu(F.linear(h, weight, bias))
        factor = torch.exp(self.log_scale_factor)
        h = F.linear(h, self.out.weight * factor[:, None], self.out.bias * factor)
        shift, raw_scale = h[:, : self.n_a], h[:, self.n_a :]
        return shift, F.logsigmoid(raw_scale + 2.0).clamp(min=-self.scale_bound)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = x[:, : self.n_a], x[:, self.n_a :]
        shift, log_s = self._shift_and_log_scale(x_b)
        z_a = x_a * torch.exp(log_s) + shift
        return torch.cat([z_a, x_b], dim=1), log_s.sum(1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z_a, z_b = z[:, : self.n_a], z[:, self.n_a :]
        shift, log_s = self._shift_and_log_scale(z_b)
        x_a = (z_a - shift) * torch.exp(-log_s)
        return torch.cat([x_a, z_b], dim=1), -log_s.sum(1)


class Glow(Flow):
    """K Glow steps on d-dimensional data. The reference ran 10 steps of width 64 in 2-D
    (46,840 parameters)."""

    name = "glow"

    def __init__(
        self,
        n_steps: int = 10,
        width: int = 64,
        hidden_layers: int = 2,
        scale_bound: float = 10.0,
        dim: int = 2,
    ) -> None:
        if n_steps < 1 or width < 1 or hidden_layers < 1 or not scale_bound > 0 or dim < 2:
            raise ValueError(
                f"Glow needs n_steps, width, hidden_layers >= 1, scale_bound > 0 and dim >= 2, "
                f"got {n_steps}, {width}, {hidden_layers}, {scale_bound}, {dim}"
            )
        steps: list[Transform] = []
        for _ in range(n_steps):  # in this order: it is the order of the random initialisation
            steps += [
                ActNorm(dim),
                InvertibleLinearLU(dim),
                AffineCoupling(width, hidden_layers, scale_bound, dim),
            ]
        super().__init__(steps, dim=dim)

    def folded(self) -> FoldedGlow:
        return FoldedGlow(self)


class FoldedGlow:
    """Glow's passes with the work that depends only on the parameters done once.

    A Glow step is ActNorm, then the LU linear map, then a coupling. The first two compose to
    one affine map x -> x A + c, and the coupling's ActNorms, output scale and Glow's +2 fold
    into its linear layers (as ``AffineCoupling`` does, but once, not in every pass). What is
    left per step is one 2x2 affine map, the conditioner's matmuls and a few elementwise ops:
    a flow step's two passes (data, samples) share one folding, and the EBM's step reuses a
    frozen one for as long as the flow does not change. Made with grad enabled it is
    differentiable; with no graph being recorded its passes work in place. Equal to
    ``Glow.log_prob`` and ``Glow.transform_noise`` up to float rounding (tests/test_flows.py).
    """

    def __init__(self, glow: Glow) -> None:
        if any(getattr(m, "init_pending", False) for m in glow.modules()):
            raise RuntimeError("FoldedGlow: the flow's data-dependent init has not run yet")
        transforms = list(glow.transforms)
        actnorms, linears, couplings = transforms[0::3], transforms[1::3], transforms[2::3]

        def stack(tensors) -> Tensor:  # one tensor per step -> (steps, ...)
            return torch.stack(list(tensors))

        # Every step's folding at once, on stacked parameters: a few dozen operator calls for
        # the whole flow instead of a few dozen per step (for Glow's tiny tensors, calls are
        # the cost), then unbound into per-step views (one call, one backward node each).
        # ActNorm then LU: z = ((x - loc) / e^ls) W^T = x A + c; the inverse is
        # x = z W^-T e^ls + loc.
        loc = stack(a.loc for a in actnorms)
        log_scale = stack(a.log_scale for a in actnorms)
        log_s = stack(lin.log_s for lin in linears)
        factors = (
            stack(lin.sign_s for lin in linears),
            log_s,
            stack(lin.lower for lin in linears),
            stack(lin.upper for lin in linears),
            stack(lin.perm for lin in linears),
        )
        weight = lu_matrix(*factors)
        if glow.dim == 2:
            det = stack(lin.det_sign for lin in linears) * torch.exp(log_s.sum(-1))
            inverse_weight = inverse_2x2(weight, det)
        else:
            inverse_weight = lu_inverse(*factors)
        inv_scale = torch.exp(-log_scale)
        matrix = inv_scale[..., :, None] * weight.mT
        offset = -((loc * inv_scale)[..., None, :] @ weight.mT).squeeze(-2)
        inverse_matrix = inverse_weight.mT * log_scale.exp()[..., None, :]
        # Their log|det|: constant, so added once per pass.
        self.affine_log_det = (log_s - log_scale).sum()
        # The conditioners: hidden layers with their ActNorm folded in, (bias, weight) in
        # nn.Linear's (out, in) layout; the last layer with its output scale and Glow's +2 on
        # the raw scale folded in.
        hidden = []
        for i in range(len(couplings[0].hidden)):
            layer_weight, layer_bias = fold_actnorm(
                stack(c.hidden[i].weight for c in couplings),
                stack(c.hidden[i].bias for c in couplings),
                stack(c.norms[i].loc for c in couplings),
                stack(c.norms[i].log_scale for c in couplings),
            )
            hidden.append(list(zip(layer_bias.unbind(), layer_weight.unbind(), strict=True)))
        factor = torch.exp(stack(c.log_scale_factor for c in couplings))
        out_weight = stack(c.out.weight for c in couplings) * factor[..., :, None]
        # Glow's +2 on the raw scale, the second half of the conditioner's outputs.
        n_a = couplings[0].n_a
        plus_two = loc.new_tensor([0.0] * n_a + [2.0] * n_a)
        out_bias = stack(c.out.bias for c in couplings) * factor + plus_two
        self.steps = [
            _FoldedStep(*affine, list(layers), bias, weight, coupling.scale_bound)
            for *affine, layers, bias, weight, coupling in zip(
                matrix.unbind(),
                offset.unbind(),
                inverse_matrix.unbind(),
                loc.unbind(),
                zip(*hidden, strict=True),
                out_bias.unbind(),
                out_weight.unbind(),
                couplings,
                strict=True,
            )
        ]

    def log_prob(self, x: Tensor) -> Tensor:
        log_det = self.affine_log_det.expand(x.shape[0])
        for step in self.steps:
            x, log_s = step.forward(x)
            log_det = log_det + log_s
        return standard_normal_log_prob(x) + log_det

    def transform_noise(self, z: Tensor) -> tuple[Tensor, Tensor]:
        log_det = self.affine_log_det.expand(z.shape[0])
        x = z
        for step in reversed(self.steps):
            x, log_s = step.inverse(x)
            log_det = log_det + log_s
        return x, standard_normal_log_prob(z) + log_det


@dataclass
class _FoldedStep:
    """One Glow step's parameters, folded (see ``FoldedGlow``), and its two directions."""

    matrix: Tensor  # ActNorm then LU: x -> x matrix + offset
    offset: Tensor
    inverse_matrix: Tensor  # and back: z -> z inverse_matrix + inverse_offset
    inverse_offset: Tensor
    hidden: list[tuple[Tensor, Tensor]]  # (bias, weight) of each hidden layer
    out_bias: Tensor
    out_weight: Tensor
    scale_bound: float

    @property
    def n_a(self) -> int:
        """How many coordinates the coupling transforms: the first d // 2."""
        return self.out_bias.shape[-1] // 2

    def conditioner(self, x_b: Tensor) -> tuple[Tensor, Tensor]:
        """(shift, log s) of the coupling at its conditioning columns ``x_b``, each (n, d // 2)."""
        bias, weight = self.hidden[0]
        if x_b.shape[1] == 1:
            # One input (2-D data): a broadcast multiply-add beats a K=1 matmul.
            h = torch.addcmul(bias, x_b, weight.T).relu_()
        else:
            h = torch.addmm(bias, x_b, weight.T).relu_()
        for bias, weight in self.hidden[1:]:
            h = torch.addmm(bias, h, weight.T).relu_()
        # weight.T of an (out, in) weight: the faster layout for a matmul of few outputs.
        out = torch.addmm(self.out_bias, h, self.out_weight.T)
        n_a = self.n_a
        return out[:, :n_a], F.logsigmoid(out[:, n_a:]).clamp(min=-self.scale_bound)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n_a = self.n_a
        x = torch.addmm(self.offset, x, self.matrix)
        shift, log_s = self.conditioner(x[:, n_a:])
        if torch.is_grad_enabled():
            x = torch.cat([x[:, :n_a] * log_s.exp() + shift, x[:, n_a:]], dim=1)
        else:  # no graph to keep: update the columns in place (x is this step's own tensor)
            x[:, :n_a].mul_(log_s.exp()).add_(shift)
        return x, log_s.sum(1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        n_a = self.n_a
        shift, log_s = self.conditioner(z[:, n_a:])
        z_a = (z[:, :n_a] - shift) * torch.exp(-log_s)
        x = torch.addmm(
            self.inverse_offset, torch.cat([z_a, z[:, n_a:]], dim=1), self.inverse_matrix
        )
        return x, log_s.sum(1)
