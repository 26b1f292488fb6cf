"""The ``optimizer`` config node: one optimizer class, one instance per player."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

ALGORITHMS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


class Optimizers:
    """Makes the EBM's and the flow's optimizers: the same algorithm, each its own lr.

    Args:
        name: the algorithm, a key of ``ALGORITHMS``.
        lr_ebm: learning rate of the EBM (with its c).
        lr_flow: learning rate of the flow.
        betas, weight_decay: the algorithm's own settings.
        fused: one fused update kernel instead of a loop over the parameters.
    """

    def __init__(
        self,
        *,
        name: str,
        lr_ebm: float,
        lr_flow: float,
        betas: Iterable[float],
        weight_decay: float,
        fused: bool,
    ) -> None:
        self.algorithm = ALGORITHMS[name]
        self.lr = {"ebm": lr_ebm, "flow": lr_flow}
        self.settings = {"betas": tuple(betas), "weight_decay": weight_decay, "fused": fused}

    def for_ebm(self, model: nn.Module) -> torch.optim.Optimizer:
        # Its trainable weights: not those of a fixed density it sits on (``EBM.base``).
        weights = [p for p in model.parameters() if p.requires_grad]
        return self.algorithm(weights, lr=self.lr["ebm"], **self.settings)

    def for_flow(self, model: nn.Module) -> torch.optim.Optimizer:
        return self.algorithm(model.parameters(), lr=self.lr["flow"], **self.settings)
