from __future__ import annotations

import pytest
import torch

from fce.ebm import EBM


def test_reference_architecture():
    ebm = EBM()
    # 2-128-128-1 weights and biases, and c.
    assert sum(p.numel() for p in ebm.parameters()) == (2 + 1) * 128 + (128 + 1) * 128 + 129 + 1
    assert ebm.log_z.item() == 1.0
    slopes = {m.negative_slope for m in ebm.modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.2}


def test_log_prob_is_minus_energy_minus_c():
    ebm = EBM(hidden=(16, 16, 16), log_z_init=-0.5)
    x = torch.randn(7, 2)
    assert ebm(x).shape == (7,)
    torch.testing.assert_close(ebm(x), -ebm.energy(x) + 0.5)


def test_c_is_trained():
    ebm = EBM(hidden=(8,))
    ebm(torch.randn(3, 2)).sum().backward()
    assert ebm.log_z.grad is not None and ebm.log_z.grad.item() == -3.0


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="hidden sizes"):
        EBM(hidden=(128, 0))
