"""The comparison of FCE with NCE, EBM-MLE and flow-MLE: the table's logic on known numbers,
and the command end to end on a tiny grid."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shlex
import sqlite3

import pandas as pd
import pytest

from analysis.compare import comparison_table, verdict
from tests.helpers import GRID_TINY, HANG_GUARD_S, ROOT, run_cli, store_uri


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
    # No wall-clock limit: the work is bounded (8 runs of 30 steps); load only slows it.
    done = run_cli([*args, *GRID_TINY], cwd=tmp_path, script="sweeps/compare.py", timeout=None)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(out / "compare.csv")
    assert list(table["dataset"]) == ["8gaussians"] and table["seeds"].tolist() == [2]
    for column in ("nll_ebm FCE", "nll_ebm NCE", "nll_ebm MLE", "nll_flow FCE", "nll_flow MLE"):
        assert " ± " in table.loc[0, column]
    assert (out / "compare.png").stat().st_size > 10_000
    assert "| 8gaussians |" in (out / "compare.md").read_text()
    # --report-only reads the same runs again, runs nothing new; by default into ./figures.
    args = [a for a in args if a not in ("--out", str(out))]
    again = run_cli([*args, "--report-only"], cwd=tmp_path, script="sweeps/compare.py")
    assert again.returncode == 0, again.stderr[-3000:]
    assert pd.read_csv(tmp_path / "figures" / "compare.csv").equals(table)


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
            "error: --estimators mcmc: unknown; choose from fce, flow_mle, mle, nce",
        ),
        (
            ["--flow", "glow", "max_steps"],
            "error: max_steps: not an option of compare.py nor a key=value override of run.py",
        ),
        (
            ["--seeds", "0", "1", "seed=3"],
            "error: seed=3: compare.py sweeps seed itself; use --seeds",
        ),
        (["flow=maf"], "error: flow=maf: compare.py sweeps flow itself; use --flow"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, argv, message):
    done = run_cli([*argv, "--report-only"], cwd=tmp_path, script="sweeps/compare.py")
    assert done.returncode == 2
    assert done.stderr.strip() == message


def test_one_seed_is_its_value_and_n_not_plus_minus_nan():
    runs = fake_runs()
    table = comparison_table(runs[runs["seed"] == 0])
    (row,) = table.to_dict("records")
    assert row["nll_ebm FCE"] == f"{runs.loc[0, 'nll_ebm']:.3f} (n=1)"
    assert not [k for k, v in row.items() if "nan" in str(v)]


def test_every_flow_is_a_row_and_estimators_without_a_flow_stand_in_each():
    runs = fake_runs()
    maf = runs[runs["estimator.name"].isin(["fce", "flow_mle"])].assign(**{"flow.name": "maf"})
    runs.loc[runs["estimator.name"].isin(["nce", "mle"]), "flow.name"] = "—"
    table = comparison_table(pd.concat([runs, maf], ignore_index=True))
    assert list(zip(table["dataset"], table["flow"])) == [("rings", "glow"), ("rings", "maf")]
    assert (table["nll_ebm NCE"] == "2.900 ± 0.010").all()


def dry_run(tmp_path, *argv):
    done = run_cli(["--dry-run", *argv], cwd=tmp_path, script="sweeps/compare.py")
    assert done.returncode == 0, done.stderr[-3000:]
    first = done.stdout.splitlines()[0]
    minutes = float(re.search(r"about (\d+) minutes", first).group(1))
    return first, minutes


def test_dry_run_says_how_many_runs_and_how_long_and_runs_nothing(tmp_path):
    import json

    first, minutes = dry_run(tmp_path)
    n = 4 * 6 * 3
    assert first.startswith(f"{n} runs (4 estimators x 6 datasets x 3 seeds), 2 at a time")
    assert "5000 steps each" in first and "estimator_steps.json" in first
    # The estimate is the benchmarks' step times times the steps: a tenth of the steps, about
    # a tenth of the time (plus each run's start), and fce alone costs its own steps only.
    steps = json.loads((ROOT / "benchmarks/results/estimator_steps.json").read_text())
    _, shorter = dry_run(tmp_path, "train.max_steps=500")
    assert shorter < minutes / 5
    _, nce = dry_run(tmp_path, "--estimators", "nce", "--seeds", "0", "--jobs", "1")
    per_step = steps["ms_per_step"]["nce_step"] / 1e3
    assert nce == pytest.approx(6 * 5000 * per_step / 60, rel=0.5, abs=1)
    assert not list(tmp_path.iterdir())  # no store, no outputs


@pytest.mark.slow  # starts a real grid and interrupts it
def test_ctrl_c_ends_in_one_line_that_says_how_to_continue(tmp_path):
    import signal
    import time

    from tests.helpers import start_cli

    uri = store_uri(tmp_path)
    args = ["--seeds", "0", "--datasets", "8gaussians", "--uri", uri, "--jobs", "1"]
    proc = start_cli(
        [*args, *GRID_TINY, "train.max_steps=100000"],
        tmp_path,
        script="sweeps/compare.py",
        new_session=True,
    )
    first = proc.stdout.readline()  # the plan, printed before the grid starts
    assert first.startswith("4 runs"), first
    # Into the first run (of 100,000 steps: still running), once the store holds it: on a
    # loaded machine (tests in parallel) a fixed sleep may end before the grid's first run.
    store = tmp_path / "mlflow.db"
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(store) as connection:
                if connection.execute("SELECT count(*) FROM runs").fetchone()[0]:
                    break
        except sqlite3.Error:  # not created, or not migrated, yet
            pass
        time.sleep(0.5)
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(
        "interrupted: the FINISHED runs are kept in experiment 'compare'; "
        "continue with: python sweeps/compare.py --datasets 8gaussians"
    )
    assert "Traceback" not in stderr


def test_the_reverse_kl_stands_beside_the_forward_one_and_an_inf_is_counted():
    runs = fake_runs()
    flows = runs["estimator.name"].isin(["fce", "flow_mle"])
    runs.loc[flows, "kl_data_flow"] = 0.2
    # Rows by seed, fce then flow_mle: fce 0.4, inf, 0.6; flow_mle 0.5, 0.3, 0.7.
    runs.loc[flows, "kl_flow_data"] = [0.4, 0.5, math.inf, 0.3, 0.6, 0.7]
    ebms = runs["estimator.name"].isin(["fce", "nce", "mle"])
    runs.loc[ebms, "kl_ebm_data"] = 0.1
    (row,) = comparison_table(runs).to_dict("records")
    columns = list(row)
    for forward, reverse in (("kl_data_ebm", "kl_ebm_data"), ("kl_data_flow", "kl_flow_data")):
        labels = ("FCE", "NCE", "MLE") if forward == "kl_data_ebm" else ("FCE", "MLE")
        start = columns.index(f"{forward} FCE")
        expected = [f"{m} {label}" for m in (forward, reverse) for label in labels]
        assert columns[start : start + len(expected)] == expected
    assert row["kl_flow_data FCE"] == "inf on 1/3; others 0.500 ± 0.141"
    assert row["kl_flow_data MLE"] == "0.500 ± 0.200"
    assert row["kl_ebm_data NCE"] == "0.100 ± 0.000"
