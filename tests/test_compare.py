"""The comparison of FCE with NCE, EBM-MLE and flow-MLE: the table's logic on known numbers,
and the command end to end on a tiny grid."""

from __future__ import annotations

import importlib.util
import shlex

import pandas as pd
import pytest

from analysis.compare import comparison_table, verdict
from tests.helpers import GRID_TINY, ROOT, run_cli, store_uri


def compare_script():
    """sweeps/compare.py as a module (sweeps/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("compare_script", ROOT / "sweeps" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_runs() -> pd.DataFrame:
    rows = []
    for seed, noise in enumerate((-0.01, 0.0, 0.01)):
        common = {"dataset.name": "rings", "flow.name": "glow", "seed": seed, "nll_data": 2.6}
        rows.append({**common, "estimator.name": "fce", "nll_ebm": 2.7 + noise, "nll_flow": 3.0})
        rows.append({**common, "estimator.name": "nce", "nll_ebm": 2.9 + noise, "nll_flow": 4.0})
        rows.append({**common, "estimator.name": "flow_mle", "nll_flow": 2.8 + noise})
        rows.append({**common, "estimator.name": "mle", "nll_ebm": 2.65 + noise})
    return pd.DataFrame(rows)


def test_the_table_has_mean_and_std_per_estimator_and_names_the_winner():
    table = comparison_table(fake_runs())
    (row,) = table.to_dict("records")
    assert row["nll_ebm FCE"] == "2.700 ± 0.010"
    assert row["nll_ebm NCE"] == "2.900 ± 0.010"
    assert row["nll_ebm MLE"] == "2.650 ± 0.010"  # the ceiling, in no verdict
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
def test_compare_command_runs_every_estimator_and_writes_the_report(tmp_path):
    uri = store_uri(tmp_path)
    out = tmp_path / "report"
    args = ["--seeds", "0", "1", "--uri", uri, "--out", str(out), "--datasets", "8gaussians"]
    # The overrides right after --datasets, as the docstring's example writes them.
    done = run_cli([*args, *GRID_TINY], cwd=tmp_path, script="sweeps/compare.py", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(out / "compare.csv")
    assert list(table["dataset"]) == ["8gaussians"] and table["seeds"].tolist() == [2]
    for column in ("nll_ebm FCE", "nll_ebm NCE", "nll_ebm MLE", "nll_flow FCE", "nll_flow MLE"):
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


EXAMPLE = "python sweeps/compare.py --seeds 0 1 --datasets 8gaussians rings train.max_steps=2000"


def test_the_docstrings_example_with_an_override_parses():
    script = compare_script()
    assert EXAMPLE in script.__doc__
    args, overrides = script.parse_args(shlex.split(EXAMPLE)[2:])
    assert args.datasets == ["8gaussians", "rings"]
    assert args.seeds == [0, 1]
    assert overrides == ["train.max_steps=2000"]
    # Every example of the docstring parses (a bad one would exit 2 here).
    for line in script.__doc__.splitlines():
        if line.strip().startswith("python sweeps/compare.py"):
            script.parse_args(shlex.split(line.split("  #")[0])[2:])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--seeds", "0", "one"],
            "error: --seeds one: not an integer; seeds are integers, e.g. --seeds 0 1 2",
        ),
        (
            ["--datasets", "train.max_steps=5"],
            "error: --datasets: no dataset given; choose from "
            "8gaussians, spiral, 2spirals, checkerboard, rings, pinwheel",
        ),
        (
            ["--estimators", "fce", "mcmc"],
            "error: --estimators mcmc: unknown; choose from fce, nce, flow_mle, mle",
        ),
        (
            ["--flow", "glow", "max_steps"],
            "error: max_steps: not an option of compare.py nor a key=value override of run.py",
        ),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, argv, message):
    done = run_cli([*argv, "--report-only"], cwd=tmp_path, script="sweeps/compare.py")
    assert done.returncode == 2
    assert done.stderr.strip() == message
