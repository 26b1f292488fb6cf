"""benchmarks/truth.py: runs on held-out seeds, their timelines, time to truth, the tables."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "truth.py"
TINY = [
    "train.max_steps=30",
    "train.eval_every=10",
    "dataset.n_samples=2000",
    "train.batch_size=100",
    "eval.n_points=500",
    "eval.grid_cells=32",
    "flow.n_layers=1",
    "ebm.hidden=[16]",
]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True
    )


def test_runs_record_timelines_continue_and_report(tmp_path):
    out = tmp_path / "truth.json"
    first = run(
        "--datasets", "8gaussians", "--seeds", "0", "--jobs", "1", "--out", str(out), *TINY
    )
    assert first.returncode == 0, first.stderr
    (record,) = json.loads(out.read_text())
    assert (record["dataset"], record["seed"], record["label"]) == ("8gaussians", 0, "fce")
    assert record["error"] is None and record["steps"] == 30
    assert [p["step"] for p in record["timeline"]] == [0, 10, 20, 30]
    seconds = [p["seconds"] for p in record["timeline"]]
    assert seconds == sorted(seconds) and seconds[-1] <= record["seconds"]
    assert record["final"]["kl_data_ebm"] == record["timeline"][-1]["kl_data_ebm"]
    # A second batch with another label adds to the file; the same label is not run again.
    again = run(
        "--datasets", "8gaussians", "--seeds", "0", "--jobs", "1", "--out", str(out), *TINY
    )
    assert again.returncode == 0 and len(json.loads(out.read_text())) == 1
    nce = run(
        "--datasets",
        "8gaussians",
        "--seeds",
        "0",
        "--jobs",
        "1",
        "--label",
        "nce",
        "--out",
        str(out),
        *TINY,
        "estimator=nce",
    )
    assert nce.returncode == 0, nce.stderr
    report = run("--report", str(out), "--equal-time", "fce")
    assert report.returncode == 0, report.stderr
    rows = [line for line in report.stdout.splitlines() if line.startswith("| 8gaussians")]
    assert len(rows) == 3  # fce, nce, and the equal-time row
    assert f"{record['final']['kl_data_ebm']:.3f}" in rows[0]


def test_time_to_truth_is_the_first_evaluation_at_or_under_the_target():
    from analysis import truth  # the script's tables

    timeline = [
        {"step": 0, "seconds": 0.0, "kl_data_ebm": 2.0},
        {"step": 500, "seconds": 9.0, "kl_data_ebm": 0.08},
        {"step": 1000, "seconds": 18.0, "kl_data_ebm": 0.12},
        {"step": 1500, "seconds": 27.0, "kl_data_ebm": 0.04},
    ]
    run_ = {"metric": "kl_data_ebm", "timeline": timeline}
    assert truth.first_reach(run_, 0.1) == (9.0, 500)
    assert truth.first_reach(run_, 0.05) == (27.0, 1500)
    assert truth.first_reach(run_, 0.01) is None
    assert truth.at_time(run_, 20.0) == 0.12
