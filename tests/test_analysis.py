"""analysis/: the loader and aggregation on a small store made by short real runs, and every
notebook executed headless against it."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from analysis.loader import aggregate, cast, format_table, load_history, load_runs
from tests.helpers import GRID_TINY, HANG_GUARD_S, ROOT, run_cli, runs, store_uri

# These tests read one store made by 8 runs and a study (about a minute to make).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A grid of 2 datasets x 2 flows x 2 seeds and a 3-trial study, all tiny."""
    path = tmp_path_factory.mktemp("store")
    grid = [
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "dataset=8gaussians,pinwheel",
        "flow=glow,maf",
        "seed=0,1",
        *GRID_TINY,
        f"tracking.uri={store_uri(path)}",
    ]
    # No wall-clock limits here: the work is bounded (30-step runs, 3 trials), and a busy
    # machine only makes it slower, not wrong.
    result = run_cli(grid, cwd=path, timeout=None)
    assert result.returncode == 0, result.stderr[-3000:]
    study = [
        "sweep=threshold_lr",
        "sweep.n_trials=3",
        f"sweep.storage=sqlite:///{path / 'optuna.db'}",
        f"tracking.uri={store_uri(path)}",
        *GRID_TINY,
        "tracking.experiment=study",
    ]
    result = run_cli(study, cwd=path, timeout=None, script="sweeps/tune.py")
    assert result.returncode == 0, result.stderr[-3000:]
    return path


def test_cast_restores_param_types():
    assert cast("42") == 42 and isinstance(cast("42"), int)
    assert cast("0.001") == 0.001
    assert cast("null") is None and cast("True") is True
    assert cast("8gaussians") == "8gaussians"


def test_load_runs_one_typed_row_per_run(store):
    runs = load_runs(store_uri(store), ["fce"])
    assert len(runs) == 8
    assert set(runs["status"]) == {"FINISHED"}
    assert runs["seed"].dtype.kind == "i"
    assert runs["optimizer.lr_ebm"].dtype.kind == "f"
    assert set(runs["dataset.name"]) == {"8gaussians", "pinwheel"}
    assert runs["sweep_id"].nunique() == 1
    assert runs["kl_data_ebm"].notna().all()  # every dataset has its density


def test_study_runs_carry_study_and_trial_tags(store):
    runs = load_runs(store_uri(store), ["study"])
    children = runs[runs["parent_run_id"].notna()]
    assert len(children) == 3
    assert set(children["optuna.study"]) == {"threshold_lr-8gaussians-glow"}
    assert sorted(children["optuna.trial"].astype(int)) == [0, 1, 2]


def test_history_is_long_and_complete(store):
    runs = load_runs(store_uri(store), ["fce"])
    history = load_history(runs["run_id"][:2], ["value", "nll_ebm"], store_uri(store))
    assert list(history.columns) == ["run_id", "metric", "step", "value"]
    per_run = history[history.metric == "value"].groupby("run_id")["step"].apply(list)
    assert all(steps == list(range(1, 31)) for steps in per_run)


def test_aggregate_over_seeds(store):
    runs = load_runs(store_uri(store), ["fce"])
    table = aggregate(runs)
    assert len(table) == 4 and set(table["n"]) == {2}
    row = table[(table["dataset.name"] == "8gaussians") & (table["flow.name"] == "glow")].iloc[0]
    values = runs[(runs["dataset.name"] == "8gaussians") & (runs["flow.name"] == "glow")][
        "nll_ebm"
    ]
    assert row["nll_ebm_mean"] == pytest.approx(values.mean())
    assert row["nll_ebm_std"] == pytest.approx(values.std())
    text = format_table(table, ["nll_ebm", "mse_logp", "not_logged"])
    assert " ± " in text["nll_ebm"].iloc[0]
    assert "not_logged" not in text
    assert not math.isnan(row["nll_flow_mean"])


NOTEBOOKS = sorted(p.stem for p in (ROOT / "analysis").glob("*.ipynb"))
# What each notebook ends with, dumped by a cell the test appends: its table of runs.
DUMPED = {"datasets_x_flows": "table", "optuna_study": "children", "training_dynamics": "chosen"}


@pytest.mark.parametrize(
    ("name", "experiment"),
    [(n, "study" if n == "optuna_study" else "fce") for n in NOTEBOOKS]
    + [("datasets_x_flows", "study")],  # a study's parent run is in the store: no NaN row
)
def test_notebook_runs_headless(store, name, experiment, monkeypatch, tmp_path):
    assert set(DUMPED) == set(NOTEBOOKS)
    path = ROOT / "analysis" / f"{name}.ipynb"
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    assert "sys.path" not in path.read_text()  # the package is installed
    dump = tmp_path / "dump.csv"
    notebook.cells.append(nbformat.v4.new_code_cell(f"{DUMPED[name]}.to_csv({str(dump)!r})"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(store))
    monkeypatch.setenv("OPTUNA_STORAGE", f"sqlite:///{store / 'optuna.db'}")
    monkeypatch.setenv("FCE_EXPERIMENT", experiment)
    # Run from analysis/, as `jupyter lab analysis/` would.
    resources = {"metadata": {"path": str(ROOT / "analysis")}}
    NotebookClient(notebook, timeout=None, resources=resources).execute()
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [
        sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))
        for cell in notebook.cells
    ]
    assert max(images) == 1  # every figure shown, and shown once

    table = pd.read_csv(dump)
    _, logged = runs(store_uri(store), experiment)
    # A study's parent run holds its trials and trains nothing.
    trained = [
        r
        for r in logged
        if "optuna.study" not in r.data.tags or "mlflow.parentRunId" in r.data.tags
    ]
    assert len(trained) == len(logged) - (experiment == "study")
    if name == "datasets_x_flows":
        assert table["dataset.name"].notna().all()
        assert table["n"].sum() == len(trained)
        # The grid's rows are its seeds; a study's trials differ in their settings: one each.
        assert set(table["n"]) == ({2} if experiment == "fce" else {1})
    if name == "optuna_study":
        assert sorted(table["optuna.trial"]) == sorted(
            int(r.data.tags["optuna.trial"]) for r in trained
        )
    if name == "training_dynamics":
        assert set(table["seed"]) == {0, 1} and len(table) == 4  # glow and maf, 2 seeds each


def test_figures_command_regenerates_figures_and_table(store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri(store)}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "analysis" / "figures.py"),
            "--out",
            str(tmp_path),
            "--reevaluate",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("fce-glow.png", "fce-maf.png", "curves-8gaussians.png", "results.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = (tmp_path / "results.md").read_text()
    assert "| 8gaussians | fce | glow | fixed |" in table and "| 2 |" in table
    header = table.splitlines()[0]
    assert "tv_ebm" in header and "kl_data_flow" in header  # recomputed from checkpoints


def test_make_notebooks_serves_the_notebooks(tmp_path):
    """`make notebooks` (the README's command) starts JupyterLab on analysis/. The first time,
    it installs the `notebooks` extra (jupyterlab) into .venv."""
    import json
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = f"ARGS=--no-browser --port={port} --IdentityProvider.token=fce-test"
    log = open(tmp_path / "jupyter.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        ["make", "notebooks", args], cwd=ROOT, stdout=log, stderr=log, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "jupyter.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "JupyterLab did not answer in 10 minutes"
            try:
                url = f"http://127.0.0.1:{port}/api/contents?token=fce-test"
                with urllib.request.urlopen(url, timeout=5) as reply:
                    listing = json.load(reply)
                break
            except OSError:
                time.sleep(1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=HANG_GUARD_S)
        log.close()
    served = {item["name"] for item in listing["content"] if item["type"] == "notebook"}
    assert served == {f"{name}.ipynb" for name in NOTEBOOKS}
