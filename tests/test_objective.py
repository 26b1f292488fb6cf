from __future__ import annotations

import math

import pytest
import torch

from fce.objective import fce_accuracy, fce_value


def test_value_is_two_log_half_when_p_equals_q():
    log_data = torch.randn(100, dtype=torch.float64)
    log_noise = torch.randn(80, dtype=torch.float64)
    value = fce_value(log_data, log_data, log_noise, log_noise)
    assert value.item() == pytest.approx(2 * math.log(0.5), abs=1e-12)


def test_value_matches_the_definition():
    lp_d, lq_d, lp_n, lq_n = torch.randn(4, 50, dtype=torch.float64)
    expected = (
        torch.log(torch.sigmoid(lp_d - lq_d)).mean()
        + torch.log(1 - torch.sigmoid(lp_n - lq_n)).mean()
    )
    assert fce_value(lp_d, lq_d, lp_n, lq_n).item() == pytest.approx(expected.item(), abs=1e-12)


def test_value_is_finite_for_extreme_logits():
    big = torch.tensor([1e4, -1e4])
    value = fce_value(big, -big, big, -big)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(0.5 * (-2e4) + 0.5 * (-2e4), rel=1e-6)


def test_accuracy_counts_ties_as_data():
    # h(x) >= 0 is correct for data; h(x~) < 0 for noise (a tie counts against the noise).
    lp_d = torch.tensor([1.0, 0.0, -1.0])
    lq_d = torch.zeros(3)
    lp_n = torch.tensor([-1.0, 0.0])
    lq_n = torch.zeros(2)
    assert fce_accuracy(lp_d, lq_d, lp_n, lq_n).item() == pytest.approx(3 / 5)
