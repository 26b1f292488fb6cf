"""analysis/figures.py on what users log: a finished run resumed for more steps (two checkpoint
artifacts), run as `python analysis/figures.py` against a temp store."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from analysis.figures import final_checkpoint
from tests.helpers import ROOT, TINY, TINY_FLOW, run_cli, runs, store_uri


def test_the_final_checkpoint_is_the_highest_step():
    paths = ["checkpoints/step_0000060.pt", "checkpoints/step_0000120.pt", "checkpoints/x.txt"]
    assert final_checkpoint(paths) == "checkpoints/step_0000120.pt"
    # Steps are numbers, not strings: 10,000,000 outgrows the zero padding.
    assert final_checkpoint(["checkpoints/step_9999999.pt", "checkpoints/step_10000000.pt"]) == (
        "checkpoints/step_10000000.pt"
    )
    with pytest.raises(ValueError, match=r"no checkpoints/step_<N>\.pt"):
        final_checkpoint(["checkpoints/notes.txt"])


@pytest.mark.slow  # three processes: a run, its resume, figures.py
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
    # No wall-clock limit: the work is bounded (one 80-step run), a busy machine only slows it.
    done = subprocess.run(
        [*script, "--reevaluate"],
        cwd=ROOT,
        capture_output=True,
        text=True,
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


def figures(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "analysis" / "figures.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.slow  # four tiny runs and figures.py
def test_figures_groups_by_estimator_and_draws_every_flow_into_the_working_directory(tmp_path):
    """FCE and NCE runs of 8gaussians with flow=glow, and FCE with the spline flow: the panel
    titled Glow (FCE) is FCE's run, NCE gets its own figure, spline has its own, and all of it
    goes to ./figures, not to the project's docs/figures."""
    uri = store_uri(tmp_path)
    for estimator, flow in (("fce", "glow"), ("nce", "glow"), ("fce", "spline")):
        extra = [f"estimator={estimator}", f"flow={flow}", *TINY_FLOW[flow]]
        done = run_cli([*TINY, *extra, f"tracking.uri={uri}"], cwd=tmp_path, timeout=None)
        assert done.returncode == 0, done.stderr[-3000:]
    # A run that did not finish is left out, and said to be.
    client, logged = runs(uri)
    failed = client.create_run(logged[0].info.experiment_id)
    client.set_terminated(failed.info.run_id, "FAILED")
    ids = {
        (r.data.params["estimator.name"], r.data.params["flow.name"]): r.info.run_id
        for r in logged
        if r.info.status == "FINISHED"
    }
    docs = {p.name: p.stat().st_mtime_ns for p in (ROOT / "docs" / "figures").iterdir()}

    done = figures(["--uri", uri], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 FAILED run(s) left out" in done.stdout
    out = tmp_path / "figures"
    for name in ("fce-glow.png", "fce-spline.png", "nce.png", "curves-8gaussians.png"):
        assert (out / name).stat().st_size > 0, name
    drew = {
        line.split(" ", 1)[0].rstrip(":"): line
        for line in done.stdout.splitlines()
        if ".png" in line
    }
    assert ids["fce", "glow"][:8] in drew["fce-glow.png"]
    assert ids["nce", "glow"][:8] not in drew["fce-glow.png"]
    assert ids["nce", "glow"][:8] in drew["nce.png"]
    assert ids["fce", "spline"][:8] in drew["fce-spline.png"]
    assert all(i[:8] in drew["curves-8gaussians.png"] for i in ids.values())
    table = (out / "results.md").read_text()
    (nce_row,) = [line for line in table.splitlines() if "| nce |" in line]
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    cells = dict(zip(header, (c.strip() for c in nce_row.strip("|").split("|"))))
    assert cells["flow.name"] == "—" and cells["kl_data_flow"] == "—"
    assert {p.name: p.stat().st_mtime_ns for p in (ROOT / "docs" / "figures").iterdir()} == docs


@pytest.mark.slow  # figures.py twice, end to end
def test_figures_on_a_missing_store_or_experiment_is_one_line(tmp_path):
    missing = tmp_path / "no-such-folder" / "mistyped.db"
    done = figures(["--uri", f"sqlite:///{missing}"], cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"error: sqlite:///{missing}: no MLflow store there (no such file); give an existing "
        "one (--uri, or $MLFLOW_TRACKING_URI)"
    )
    assert not missing.parent.exists() and not (tmp_path / "figures").exists()

    from mlflow.tracking import MlflowClient

    uri = store_uri(tmp_path)
    MlflowClient(tracking_uri=uri).create_experiment("empty")
    done = figures(["--uri", uri, "--experiment", "empty"], cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == "error: no FINISHED run in experiment 'empty'; it holds no run"


def test_the_results_table_has_each_reverse_kl_beside_the_forward_one(tmp_path):
    """A reverse KL logged as inf (mass on an empty square) is "inf" in the table."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from analysis.figures import results_table
    from analysis.loader import load_runs

    uri = store_uri(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("fce")
    for seed, reverse in ((0, 0.3), (1, math.inf)):
        run = client.create_run(experiment)
        params = {"estimator.name": "fce", "dataset.name": "checkerboard", "seed": str(seed)}
        params |= {"flow.name": "spline", "threshold.name": "fixed"}
        metrics = {"kl_data_ebm": 0.1, "kl_ebm_data": 0.2, "kl_data_flow": 0.4}
        metrics |= {"kl_flow_data": reverse}
        client.log_batch(
            run.info.run_id,
            params=[Param(k, v) for k, v in params.items()],
            metrics=[Metric(k, v, 0, 100) for k, v in metrics.items()],
        )
        client.set_terminated(run.info.run_id, "FINISHED")
    header, _, row = results_table(load_runs(uri, ["fce"])).splitlines()
    names = [c.strip() for c in header.strip("|").split("|")]
    values = dict(zip(names, (c.strip() for c in row.strip("|").split("|"))))
    assert names.index("kl_ebm_data") == names.index("kl_data_ebm") + 1
    assert names.index("kl_flow_data") == names.index("kl_data_flow") + 1
    assert values["kl_ebm_data"] == "0.200 ± 0.000" and values["kl_flow_data"] == "inf"
