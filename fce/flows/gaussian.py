"""A fixed Gaussian as a flow: NCE's default noise, fitted to the data and never trained."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fce.flows.base import Flow, Transform


class AffineTransform(Transform):
    """x = mean + L z with L lower-triangular (a Cholesky factor); x -> z solves for z."""

    def __init__(self, mean: Tensor, scale_tril: Tensor) -> None:
        super().__init__()
        self.mean = nn.Parameter(mean.clone(), requires_grad=False)
        self.scale_tril = nn.Parameter(scale_tril.clone(), requires_grad=False)

    def _log_det(self, like: Tensor) -> Tensor:
        return self.scale_tril.diagonal().abs().log().sum().expand(like.shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        centred = (x - self.mean).unsqueeze(-1)
        z = torch.linalg.solve_triangular(self.scale_tril, centred, upper=False).squeeze(-1)
        return z, -self._log_det(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.mean + z @ self.scale_tril.T, self._log_det(z)


class Gaussian(Flow):
    """N(mean, L L^T) behind the flow interface, with no trainable parameters."""

    def __init__(self, mean: Tensor, scale_tril: Tensor) -> None:
        super().__init__([AffineTransform(mean, scale_tril)], dim=mean.shape[-1])

    @classmethod
    def fit(cls, x: Tensor) -> Gaussian:
        """The maximum-likelihood Gaussian of the rows of ``x`` (mean and covariance)."""
        x64 = x.double()
        mean = x64.mean(0)
        cov = torch.cov(x64.T, correction=0)
        return cls(mean.to(x.dtype), torch.linalg.cholesky(cov).to(x.dtype))
