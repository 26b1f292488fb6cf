"""analysis/figures.py on what users log: a finished run resumed for more steps (two checkpoint
artifacts), run as `python analysis/figures.py` against a temp store."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from analysis.figures import final_checkpoint
from tests.helpers import ROOT, TINY, run_cli, runs, store_uri


def test_the_final_checkpoint_is_the_highest_step():
    paths = ["checkpoints/step_0000060.pt", "checkpoints/step_0000120.pt", "checkpoints/x.txt"]
    assert final_checkpoint(paths) == "checkpoints/step_0000120.pt"
    # Steps are numbers, not strings: 10,000,000 outgrows the zero padding.
    assert final_checkpoint(["checkpoints/step_9999999.pt", "checkpoints/step_10000000.pt"]) == (
        "checkpoints/step_10000000.pt"
    )
    with pytest.raises(ValueError, match=r"no checkpoints/step_<N>\.pt"):
        final_checkpoint(["checkpoints/notes.txt"])


@pytest.mark.slow  # three processes: a run, its resume, figures.py (20 to 45 s)
def test_figures_reads_a_run_resumed_for_more_steps(tmp_path):
    uri = store_uri(tmp_path)
    run_dir = tmp_path / "run"
    first = [*TINY, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"]
    done = run_cli(first, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    more = [*first, "train.max_steps=80", f"train.resume={run_dir}"]
    done = run_cli(more, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client, (run,) = runs(uri)
    logged = sorted(a.path for a in client.list_artifacts(run.info.run_id, "checkpoints"))
    assert logged == ["checkpoints/step_0000060.pt", "checkpoints/step_0000080.pt"]

    out = tmp_path / "figures"
    script = [sys.executable, "analysis/figures.py", "--uri", uri, "--out", str(out)]
    done = subprocess.run(
        [*script, "--reevaluate"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "fce-glow.png").stat().st_size > 0
    table = (out / "results.md").read_text().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    (row,) = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert row[header.index("n")] == "1"
    # Re-evaluated from the step-80 checkpoint: the same numbers the resumed run logged last.
    nll = client.get_metric_history(run.info.run_id, "nll_ebm")
    assert max(m.step for m in nll) == 80
    final = max(nll, key=lambda m: m.step).value
    assert float(row[header.index("nll_ebm")]) == pytest.approx(final, abs=1e-3)
