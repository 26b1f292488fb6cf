"""The FCE value function and the classifier's accuracy, as pure functions of log-densities.

The classifier's logit is h(x) = log p_theta(x) - log q_alpha(x) and D(x) = sigmoid(h(x)).

References:
    Gao et al., "Flow Contrastive Estimation of Energy-Based Models", arXiv:1912.00589, eq. 5.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F


def fce_value(
    log_p_data: Tensor, log_q_data: Tensor, log_p_noise: Tensor, log_q_noise: Tensor
) -> Tensor:
    """V = mean_data log D(x) + mean_flow log(1 - D(x~)); the EBM ascends it, the flow descends.

    Computed with logsigmoid, exact for any logit. At p == q it equals 2 log(1/2).

    Args:
        log_p_data, log_q_data: log p_theta and log q_alpha at the data points x.
        log_p_noise, log_q_noise: the same at the flow's samples x~.
    """
    h_data = log_p_data - log_q_data
    h_noise = log_p_noise - log_q_noise
    return F.logsigmoid(h_data).mean() + F.logsigmoid(-h_noise).mean()


def fce_accuracy(
    log_p_data: Tensor, log_q_data: Tensor, log_p_noise: Tensor, log_q_noise: Tensor
) -> Tensor:
    """The classifier's accuracy on the batch: (#{h(x) >= 0} + #{h(x~) < 0}) / (n + m)."""
    correct = (log_p_data >= log_q_data).sum() + (log_p_noise < log_q_noise).sum()
    return correct / (log_p_data.numel() + log_p_noise.numel())


def ebm_ascent(
    ebm: torch.nn.Module, optimizer: torch.optim.Optimizer, noise_model: Any, x: Tensor, z: Tensor
) -> tuple[Tensor, Tensor]:
    """One step of gradient ascent on V over the EBM against a fixed noise model (FCE's EBM
    step, and NCE's only step); returns (V, accuracy) of the batch before the step."""
    log_q_data = noise_model.log_prob(x)
    x_noise, log_q_noise = noise_model.transform_noise(z)
    # Data and noise in one batch: one pass through the EBM instead of two.
    log_p_data, log_p_noise = ebm(torch.cat([x, x_noise])).split([x.shape[0], z.shape[0]])
    value = fce_value(log_p_data, log_q_data, log_p_noise, log_q_noise)
    optimizer.zero_grad(set_to_none=True)
    (-value).backward()
    optimizer.step()
    return value.detach(), fce_accuracy(log_p_data, log_q_data, log_p_noise, log_q_noise)
