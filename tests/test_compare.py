"""The comparison of FCE with NCE and flow-MLE: the table's logic on known numbers, and the
command end to end on a tiny grid."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.compare import comparison_table, verdict
from tests.helpers import GRID_TINY, run_cli, store_uri


def fake_runs() -> pd.DataFrame:
    rows = []
    for seed, noise in enumerate((-0.01, 0.0, 0.01)):
        common = {"dataset.name": "rings", "flow.name": "glow", "seed": seed, "nll_data": 2.6}
        rows.append({**common, "estimator.name": "fce", "nll_ebm": 2.7 + noise, "nll_flow": 3.0})
        rows.append({**common, "estimator.name": "nce", "nll_ebm": 2.9 + noise, "nll_flow": 4.0})
        rows.append({**common, "estimator.name": "flow_mle", "nll_flow": 2.8 + noise})
    return pd.DataFrame(rows)


def test_the_table_has_mean_and_std_per_estimator_and_names_the_winner():
    table = comparison_table(fake_runs())
    (row,) = table.to_dict("records")
    assert row["nll_ebm FCE"] == "2.700 ± 0.010"
    assert row["nll_ebm NCE"] == "2.900 ± 0.010"
    assert row["nll_flow MLE"] == "2.800 ± 0.010"
    assert row["nll_flow FCE"] == "3.000 ± 0.000"
    assert row["EBM winner"] == "FCE" and row["flow winner"] == "MLE"
    assert row["EBM: FCE better on"] == "3/3" and row["flow: FCE better on"] == "0/3"
    assert row["kl_data_ebm FCE"] == "-"  # not logged in these runs
    assert row["seeds"] == 3 and row["nll_data"] == "2.600"


def test_a_difference_within_two_standard_errors_is_a_tie():
    a = pd.Series({"mean": 1.00, "std": 0.1, "n": 3})
    b = pd.Series({"mean": 1.05, "std": 0.1, "n": 3})
    assert verdict(a, b, ("A", "B")) == "tie"
    assert verdict(a, pd.Series({**b, "mean": 1.5}), ("A", "B")) == "A"
    assert verdict(pd.Series({**a, "n": 1}), b, ("A", "B")) == "-"


@pytest.mark.slow
def test_compare_command_runs_the_three_estimators_and_writes_the_report(tmp_path):
    uri = store_uri(tmp_path)
    out = tmp_path / "report"
    args = ["--datasets", "8gaussians", "--seeds", "0", "1", "--uri", uri, "--out", str(out)]
    done = run_cli([*args, *GRID_TINY], cwd=tmp_path, script="sweeps/compare.py", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(out / "compare.csv")
    assert list(table["dataset"]) == ["8gaussians"] and table["seeds"].tolist() == [2]
    for column in ("nll_ebm FCE", "nll_ebm NCE", "nll_flow FCE", "nll_flow MLE"):
        assert " ± " in table.loc[0, column]
    assert (out / "compare.png").stat().st_size > 10_000
    assert "| 8gaussians |" in (out / "compare.md").read_text()
    # --report-only reads the same runs again, runs nothing new.
    again = run_cli([*args, "--report-only"], cwd=tmp_path, script="sweeps/compare.py")
    assert again.returncode == 0, again.stderr[-3000:]
    assert pd.read_csv(out / "compare.csv").equals(table)


def test_compare_rejects_an_unknown_dataset_in_one_line(tmp_path):
    done = run_cli(["--datasets", "moons"], cwd=tmp_path, script="sweeps/compare.py")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: --datasets moons: unknown; choose from "
        "8gaussians, spiral, 2spirals, checkerboard, rings, pinwheel"
    )
