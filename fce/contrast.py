"""What FCE's EBM is contrasted against: densities with exact log q and samples.

The classifier of FCE's value is between the data and a contrast q; the paper's contrast is
the flow itself. The others here keep an exact log-density so that the value's logit
h = log p_theta - log q stays exact:

- ``WidenedFlow`` (``fce.flows.widened``): the flow with its base widened, x = g(T z),
  z ~ N(0, I), so log q_T(x) = log N(f(x); 0, T^2 I) + log|det df/dx|. T > 1 spreads the
  flow's samples beyond the data.
- ``Mixture``: w q_1 + (1 - w) q_2, its log-density the logsumexp of the weighted
  components; its samples are stratified (below), which draws no random numbers of its own.

Each meets the passes protocol of ``fce.flows.base.FlowPasses`` (``log_prob`` and
``transform_noise``), so ``fce.objective.ebm_ascent`` takes any of them.

References:
    Gao et al., "Flow Contrastive Estimation of Energy-Based Models", arXiv:1912.00589
    (the flow as the contrast; eq. 5, the value).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fce.flows.base import Flow, FlowPasses
from fce.flows.widened import WidenedFlow

CONTRASTS = ("flow", "mixture", "gaussian")


class Mixture:
    """q = w q_1 + (1 - w) q_2 with exact log q = logsumexp(log w + log q_1, log(1-w) + log q_2).

    Sampling is stratified: of m base draws z, the first k = round(w m) go through q_1 and
    the other m - k through q_2, so the batch holds exactly k samples of q_1. A mean over the
    batch is then an unbiased estimate of the mixture's expectation when k / m = w (exactly
    so at m = 1,000 for any w with three decimals), with less variance than drawing each
    sample's component at random, and no random numbers beyond z are drawn (the default
    path's streams are untouched, and a resumed run draws what an uninterrupted one does).

    Args:
        first, second: the components (``log_prob``, ``transform_noise``).
        weight: w, the first component's share, in (0, 1).
    """

    def __init__(self, first: FlowPasses, second: FlowPasses, weight: float) -> None:
        if not 0 < weight < 1:
            raise ValueError(f"Mixture: weight={weight}: must be in (0, 1)")
        self.first = first
        self.second = second
        self.weight = float(weight)
        self.log_weights = (math.log(self.weight), math.log1p(-self.weight))

    def split(self, m: int) -> int:
        """k: how many of ``m`` draws the first component makes."""
        return round(self.weight * m)

    def _mix(self, log_q1: Tensor, log_q2: Tensor) -> Tensor:
        log_w1, log_w2 = self.log_weights
        return torch.logaddexp(log_q1 + log_w1, log_q2 + log_w2)

    def log_prob(self, x: Tensor) -> Tensor:
        return self._mix(self.first.log_prob(x), self.second.log_prob(x))

    def transform_noise(self, z: Tensor) -> tuple[Tensor, Tensor]:
        k = self.split(z.shape[0])
        # Each component's own samples come with their log-density from the same pass; the
        # other component's density at them costs one more pass. An empty part is skipped
        # (not every flow takes an empty batch).
        parts = []
        if k > 0:
            x1, log_q1 = self.first.transform_noise(z[:k])
            parts.append((x1, self._mix(log_q1, self.second.log_prob(x1))))
        if k < z.shape[0]:
            x2, log_q2 = self.second.transform_noise(z[k:])
            parts.append((x2, self._mix(self.first.log_prob(x2), log_q2)))
        if len(parts) == 1:
            return parts[0]
        return torch.cat([parts[0][0], parts[1][0]]), torch.cat([parts[0][1], parts[1][1]])


def make_contrast(
    kind: str,
    flow: FlowPasses,
    flow_module: Flow,
    base_scale: float,
    gaussian: FlowPasses | None,
    weight: float,
) -> FlowPasses:
    """The contrast ``kind`` of the flow (its passes ``flow``, or its module widened by
    ``base_scale`` when that is not 1) and the fitted ``gaussian``.

    ``flow``: the flow (widened when ``base_scale`` != 1); ``mixture``: ``weight`` of that and
    ``1 - weight`` of the Gaussian; ``gaussian``: the Gaussian alone (the flow out of it).
    """
    if kind == "gaussian":
        assert gaussian is not None
        return gaussian
    flow_part = flow if base_scale == 1 else WidenedFlow(flow_module, base_scale)
    if kind == "flow":
        return flow_part
    if kind == "mixture":
        assert gaussian is not None
        return Mixture(flow_part, gaussian, weight)
    raise ValueError(f"contrast={kind!r}: unknown; choose one of: {', '.join(CONTRASTS)}")
