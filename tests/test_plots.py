from __future__ import annotations

import pytest
import torch

from fce.plots import PanelRow, density_panel, training_curves


def test_density_panel_has_data_flow_ebm_columns_per_row():
    grid = torch.randn(32, 32)
    rows = [PanelRow(name, torch.randn(500, 2), grid, grid) for name in ("a", "b")]
    fig = density_panel(rows)
    axes = fig.get_axes()
    assert len([ax for ax in axes if ax.get_title()]) == 3
    assert [ax.get_title() for ax in axes[:3]] == ["Data", "Flow", "EBM"]
    assert axes[0].get_ylabel() == "a" and axes[3].get_ylabel() == "b"


def test_training_curves_one_panel_per_present_metric():
    history = {"value": ([1, 2, 3], [0.1, 0.2, 0.3]), "acc": ([1, 2, 3], [0.5, 0.6, 0.7])}
    fig = training_curves(history)
    titles = [ax.get_title() for ax in fig.get_axes() if ax.get_visible()]
    assert titles == ["value", "acc"]
    with pytest.raises(ValueError, match="no metric"):
        training_curves({})
