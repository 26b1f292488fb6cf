"""The one interface every flow meets, and the pieces flows are built from."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor, nn

_LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I), summed over the last dimension."""
    return -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * _LOG_2PI)


class Transform(nn.Module):
    """An invertible map x -> z with the log |det| of its Jacobian, per row."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x -> z (the normalising direction) and log|det dz/dx|."""
        raise NotImplementedError

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z -> x (the sampling direction) and log|det dx/dz|."""
        raise NotImplementedError


class FlowPasses(Protocol):
    """The two passes FCE makes through a flow: exact log q, and samples with their log q."""

    def log_prob(self, x: Tensor) -> Tensor: ...

    def transform_noise(self, z: Tensor) -> tuple[Tensor, Tensor]: ...


class NoGradPasses:
    """Passes run under ``torch.no_grad``: a fixed contrast, scored and sampled."""

    def __init__(self, passes: FlowPasses) -> None:
        self.passes = passes

    @torch.no_grad()
    def log_prob(self, x: Tensor) -> Tensor:
        return self.passes.log_prob(x)

    @torch.no_grad()
    def transform_noise(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.passes.transform_noise(z)


class FrozenFlow(NoGradPasses):
    """A flow's gradient-free passes while its parameters stay fixed.

    The EBM's steps and NCE's noise score data and draw samples through a flow that is not
    being trained: its ``folded()`` form, made once under ``no_grad`` and run under it. It is
    a snapshot, valid until the parameters change: whoever changes them makes a new one.
    """

    def __init__(self, flow: Flow) -> None:
        with torch.no_grad():
            super().__init__(flow.folded())


class Flow(nn.Module):
    """q_alpha(x): a standard normal base pushed through a stack of transforms.

    ``forward`` maps data to noise, ``inverse`` maps noise to data; ``log_prob`` is exact and
    ``sample_and_log_prob`` returns reparameterised samples with their log-density from the same
    pass, so gradients flow through both the samples and log q.
    """

    name = "flow"
    # Whether compiling its no-grad passes pays (``train.compile=auto``, ``fce.flows.fused``):
    # measured for the spline only.
    compile_pays = False

    def __init__(self, transforms: list[Transform], dim: int = 2) -> None:
        super().__init__()
        self.dim = dim
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for transform in self.transforms:
            x, ld = transform(x)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        log_det = z.new_zeros(z.shape[0])
        for transform in reversed(self.transforms):
            z, ld = transform.inverse(z)
            log_det = log_det + ld
        return z, log_det

    def log_prob(self, x: Tensor) -> Tensor:
        """log q_alpha(x) = log N(f(x)) + log|det df/dx|."""
        z, log_det = self.forward(x)
        return standard_normal_log_prob(z) + log_det

    def transform_noise(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """x~ = g(z) and log q_alpha(x~) = log N(z) - log|det dg/dz|, in one pass."""
        x, log_det = self.inverse(z)
        return x, standard_normal_log_prob(z) - log_det

    def sample_and_log_prob(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``n`` reparameterised samples and their log-density."""
        ref = next(self.parameters())
        z = torch.randn(n, self.dim, generator=generator, device=ref.device, dtype=ref.dtype)
        return self.transform_noise(z)

    def folded(self) -> FlowPasses:
        """``log_prob`` and ``transform_noise`` with the work that depends only on the
        parameters done once, for several passes between two updates (Glow folds its
        normalisations into its weights). Differentiable when made with grad enabled. A flow
        with nothing to fold returns itself."""
        return self

    def frozen(self) -> FrozenFlow:
        """A snapshot for fast no-grad passes, valid until the parameters change."""
        return FrozenFlow(self)

    @torch.no_grad()
    def data_init(self, x: Tensor) -> None:
        """Data-dependent initialisation (ActNorm) from a first batch; a no-op for most flows."""
        for module in self.modules():
            if hasattr(module, "init_from_data"):
                module.init_pending = True
        self.forward(x)
