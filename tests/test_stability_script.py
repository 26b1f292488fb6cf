"""benchmarks/stability.py: records every job, resumes without redoing one, reports a table."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli

TINY_JOB = [
    "dataset.n_samples=2000",
    "train.batch_size=100",
    "train.max_steps=20",
    "train.eval_every=10",
    "eval.n_points=500",
    "eval.grid_cells=32",
    "flow.n_blocks=2",
    "flow.hidden=16",
]


@pytest.mark.slow  # the benchmark's runs, end to end
def test_stability_sweep_records_resumes_and_reports(tmp_path):
    out = tmp_path / "stability.json"
    first = ["--flows", "maf", "--datasets", "8gaussians", "--seeds", "0", "--jobs", "1"]
    done = run_cli(
        [*first, "--out", str(out), *TINY_JOB], tmp_path, script="benchmarks/stability.py"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = json.loads(out.read_text())["runs"]
    assert record["diverged"] is None and record["steps"] == 20 and record["samples_finite"]

    # --resume keeps seed 0 as it was and runs only seed 1.
    more = [*first[:-3], "0", "1", "--jobs", "1", "--resume", "--out", str(out), *TINY_JOB]
    done = run_cli(more, tmp_path, script="benchmarks/stability.py")
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads(out.read_text())["runs"]
    assert [r["seed"] for r in records] == [0, 1] and records[0] == record
    assert done.stdout.count("seed 0") == 0 and done.stdout.count("seed 1") == 1

    done = run_cli(["--report", str(out)], tmp_path, script="benchmarks/stability.py")
    assert done.returncode == 0
    assert "| maf | 8gaussians | 2 | 0 |" in done.stdout
