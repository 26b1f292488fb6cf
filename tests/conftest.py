from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    # Tiny models: one torch thread per process is the fast setting (docs/performance.md).
    torch.set_num_threads(1)
    torch.manual_seed(0)
