"""analysis/loader.py groups only repeats: on a store holding what a user's store holds after a
few weeks (single runs, a grid, a tuned study with its parent run), each table row averages
runs that differ by the seed alone, and says how many went in."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping

import pandas as pd
import pytest
from omegaconf import OmegaConf

from analysis.loader import (
    aggregate,
    cast,
    format_table,
    load_history,
    load_runs,
    newest_group,
    repeats,
)
from fce.compose import compose
from tests.helpers import ROOT, store_uri

EXPERIMENT = "fce"


def flat(tree: Mapping, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = "null" if value is None else str(value)
    return out


def params(*overrides: str) -> dict[str, str]:
    """The params run.py logs for these overrides: the composed config, flattened."""
    cfg = compose(list(overrides))
    return flat(OmegaConf.to_container(cfg, resolve=True))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Runs logged as run.py and sweeps/tune.py log them, without training (nll_ebm made up)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = store_uri(tmp_path_factory.mktemp("loader"))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(EXPERIMENT)
    clock = itertools.count(1_700_000_000_000, 60_000)
    nll = itertools.count(30)

    def log(name: str, overrides: list[str], tags: dict[str, str] | None = None) -> str:
        run = client.create_run(experiment, run_name=name, tags=tags, start_time=next(clock))
        given = params(*overrides) if overrides else {}
        metrics = [] if not given else [Metric("nll_ebm", next(nll) / 10, 0, 300)]
        client.log_batch(
            run.info.run_id,
            params=[Param(k, v) for k, v in given.items()],
            metrics=metrics,
        )
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    # A 5,000-step run at seed 42, then the same at seeds 0 and 1, one of them with another
    # store and progress setting (bookkeeping: still a repeat).
    log("8gaussians-glow-s42", ["seed=42"])
    log("8gaussians-glow-s0", ["seed=0"])
    log("8gaussians-glow-s1", ["seed=1", "progress=none", "tracking.uri=sqlite:///x.db"])
    # A 300-step grid over two datasets and three seeds (a Hydra multirun: sweep_id).
    for dataset, seed in itertools.product(("8gaussians", "pinwheel"), (0, 1, 2)):
        tags = {"sweep_id": "multirun/2026-12-01/10-00-00", "job_num": str(seed)}
        log(
            f"{dataset}-glow-s{seed}",
            [f"dataset={dataset}", f"seed={seed}", "train.max_steps=300"],
            tags,
        )
    # A study: its parent run (no params), four trials with tuned learning rates.
    study = "threshold_lr-8gaussians-glow"
    parent = log(f"study-{study}", [], {"optuna.study": study})
    for trial, lr in enumerate((1e-4, 3e-4, 1e-3, 3e-3)):
        tags = {"optuna.study": study, "optuna.trial": str(trial), "mlflow.parentRunId": parent}
        log("8gaussians-glow-s42", [f"optimizer.lr_ebm={lr}", "train.max_steps=300"], tags)
    # The grid's seed 0 of 8gaussians run again in the same sweep: the newest counts once.
    tags = {"sweep_id": "multirun/2026-12-01/10-00-00", "job_num": "0"}
    log("8gaussians-glow-s0", ["dataset=8gaussians", "seed=0", "train.max_steps=300"], tags)
    return uri


def test_rows_average_only_runs_that_differ_by_seed(store):
    runs = load_runs(store, [EXPERIMENT])
    table = aggregate(runs, metrics=["nll_ebm"])
    assert table["dataset.name"].notna().all()  # the study's parent is no row
    eight = table[table["dataset.name"] == "8gaussians"]
    by_steps = eight.groupby(eight["train.max_steps"].astype(str))["n"].apply(sorted).to_dict()
    # 5,000 steps: one row of 3 seeds; 300 steps: the grid's row of 3 and one row per trial.
    assert by_steps == {"null": [3], "300": [1, 1, 1, 1, 3]}
    assert "optimizer.lr_ebm" in table.columns and "sweep" in table.columns

    # Each row again, from the runs themselves: same sweep, same settings, newest per seed.
    sweep = runs["sweep_id"].fillna(runs["optuna.study"]).fillna("-")
    for _, row in eight.iterrows():
        same = runs[
            (runs["dataset.name"] == "8gaussians")
            & equal(runs["train.max_steps"], row["train.max_steps"])
            & equal(runs["optimizer.lr_ebm"], row["optimizer.lr_ebm"])
            & (sweep == row["sweep"])
        ]
        same = same.sort_values("start_time").drop_duplicates("seed", keep="last")
        assert len(same) == row["n"]
        assert row["nll_ebm_mean"] == pytest.approx(same["nll_ebm"].mean())
        if row["n"] > 1:
            assert row["nll_ebm_std"] == pytest.approx(same["nll_ebm"].std())


def equal(column: pd.Series, logged: str) -> pd.Series:
    """Which typed values of ``column`` are the param value ``logged``."""
    value = cast(logged)
    return column.map(lambda v: pd.isna(v) if value is None else v == value)


def test_a_rerun_of_a_seed_counts_once_and_the_newest_wins(store):
    runs = load_runs(store, [EXPERIMENT])
    grid = repeats(runs[runs["sweep_id"].notna() & (runs["dataset.name"] == "8gaussians")])
    assert sorted(grid["seed"]) == [0, 1, 2]
    reruns = runs[runs["sweep_id"].notna() & (runs["run_name"] == "8gaussians-glow-s0")]
    assert len(reruns) == 2
    newest = reruns.sort_values("start_time")["run_id"].iloc[-1]
    assert newest in set(grid["run_id"])


def test_the_formatted_table_says_how_many_runs_went_in(store):
    runs = load_runs(store, [EXPERIMENT])
    text = format_table(aggregate(runs, metrics=["nll_ebm"]), ["nll_ebm"])
    assert "n" in text.columns and "seeds" not in text.columns
    assert text["n"].sum() == len(repeats(runs))
    assert all((" ± " in value) == (n > 1) for value, n in zip(text["nll_ebm"], text["n"]))


def test_the_newest_group_per_cell_for_figures(store):
    runs = load_runs(store, [EXPERIMENT])
    chosen = newest_group(runs, ["dataset.name", "flow.name"])
    # 8gaussians: the last group run is the grid (its seed 0 was rerun last).
    eight = chosen[chosen["dataset.name"] == "8gaussians"]
    assert set(eight["sweep_id"]) == {"multirun/2026-12-01/10-00-00"}
    assert sorted(eight["seed"]) == [0, 1, 2]
    assert sorted(chosen[chosen["dataset.name"] == "pinwheel"]["seed"]) == [0, 1, 2]


def test_parents_are_marked_and_configs_leave_bookkeeping_out(store):
    runs = load_runs(store, [EXPERIMENT])
    (parent,) = runs[runs["is_parent"]]["run_name"]
    assert parent.startswith("study-")
    config = json.loads(runs[runs["run_name"] == "8gaussians-glow-s1"]["config"].iloc[0])
    assert "seed" not in config and "progress" not in config
    assert not [k for k in config if k.startswith("tracking.") or k.endswith("._target_")]
    assert config["train.max_steps"] == "null" and config["dataset.name"] == "8gaussians"


def test_repeats_needs_the_loader_columns():
    frame = pd.DataFrame({"dataset.name": ["rings"], "seed": [0], "nll_ebm": [math.pi]})
    with pytest.raises(ValueError, match="load_runs"):
        repeats(frame)


def test_the_comparison_takes_one_group_per_cell_not_the_newest_run_per_seed(tmp_path):
    """An older 5,000-step comparison at seeds 0-2, a newer 2,000-step one at seeds 0-1: the
    table is made of the newer runs only, not of two 2,000-step runs and a 5,000-step one."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from analysis.compare import load_comparison

    uri = store_uri(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("compare")
    clock = itertools.count(1_700_000_000_000, 60_000)
    for sweep, steps, seeds in (
        ("multirun/compare/a", 5000, (0, 1, 2)),
        ("multirun/compare/b", 2000, (0, 1)),
    ):
        for estimator, seed in itertools.product(("fce", "nce"), seeds):
            given = params(f"estimator={estimator}", f"seed={seed}", f"train.max_steps={steps}")
            run = client.create_run(experiment, tags={"sweep_id": sweep}, start_time=next(clock))
            client.log_batch(
                run.info.run_id,
                params=[Param(k, v) for k, v in given.items()],
                metrics=[Metric("nll_ebm", steps / 1000 + seed, 0, steps)],
            )
            client.set_terminated(run.info.run_id, "FINISHED")
    chosen = load_comparison(uri, "compare")
    assert set(chosen["train.max_steps"]) == {2000}
    assert sorted(chosen["seed"]) == [0, 0, 1, 1]


def test_runs_logged_before_a_setting_existed_group_with_runs_at_its_default():
    from analysis.loader import config_of

    old = {"dataset.name": "rings", "seed": "0", "ebm.hidden": "[128, 128]"}
    new = {
        **old,
        "seed": "1",
        "schedule.name": "constant",
        "train.ema_decay": "0.0",
        "ebm.activation": "leaky_relu",
        "ebm.fourier_features": "0",
        "ebm.fourier_scale": "1.0",
    }
    assert config_of(old) == config_of(new)
    assert config_of(old) != config_of({**new, "schedule.name": "cosine"})


def log_runs(uri: str, experiment: str, runs: list[list[str]]) -> list[str]:
    """Runs logged as run.py logs them (params of the composed config), without training."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    exp = found.experiment_id if found else client.create_experiment(experiment)
    clock = itertools.count(1_700_000_000_000, 60_000)
    ids = []
    for k, overrides in enumerate(runs):
        run = client.create_run(exp, start_time=next(clock))
        metrics = [Metric(m, 1.0 + k, 0, 300) for m in ("nll_ebm", "kl_data_flow")]
        client.log_batch(
            run.info.run_id,
            params=[Param(k, v) for k, v in params(*overrides).items()],
            metrics=metrics,
        )
        client.set_terminated(run.info.run_id, "FINISHED")
        ids.append(run.info.run_id)
    return ids


def test_an_nce_run_is_not_counted_as_its_configs_flow(tmp_path):
    """NCE against a fitted Gaussian logs flow=glow and the Gaussian's kl_data_flow: it is
    not a Glow run, and its table row shows the flow's settings and metrics as not applicable
    (and an exact-MLE run likewise)."""
    from analysis.loader import NOT_APPLICABLE

    uri = store_uri(tmp_path)
    fce, nce, nce_maf, mle = log_runs(
        uri,
        EXPERIMENT,
        [
            ["estimator=fce", "seed=0"],
            ["estimator=nce", "seed=0"],
            ["estimator=nce", "seed=1", "flow=maf"],  # the same experiment: NCE uses no flow
            ["estimator=mle", "seed=0"],
        ],
    )
    runs = load_runs(uri, [EXPERIMENT]).set_index("run_id")
    assert runs.loc[fce, "flow.name"] == "glow"
    assert runs.loc[[nce, nce_maf, mle], "flow.name"].eq(NOT_APPLICABLE).all()
    assert runs.loc[[nce, mle], "flow.width"].eq(NOT_APPLICABLE).all()
    assert math.isnan(runs.loc[nce, "kl_data_flow"])
    chosen = newest_group(runs.reset_index(), ["dataset.name", "estimator.name", "flow.name"])
    glow = chosen[chosen["flow.name"] == "glow"]
    assert list(glow["run_id"]) == [fce]

    metrics = ["nll_ebm", "kl_data_flow"]
    text = format_table(aggregate(runs.reset_index(), metrics=metrics), metrics)
    rows = text.set_index("estimator.name")
    assert rows.loc["nce", "n"] == 2  # seeds 0 and 1 are repeats, whatever flow= said
    assert rows.loc["nce", "kl_data_flow"] == NOT_APPLICABLE
    assert rows.loc["mle", "kl_data_flow"] == NOT_APPLICABLE
    assert rows.loc["fce", "kl_data_flow"] != NOT_APPLICABLE
    assert rows.loc["nce", "flow.name"] == NOT_APPLICABLE
    # Which runs each row drew.
    assert set(rows.loc["nce", "runs"].split()) == {nce[:8], nce_maf[:8]}


def test_titles_are_derived_from_names():
    from analysis.loader import model_title, title_of

    assert [title_of(n) for n in ("glow", "maf", "spline")] == ["Glow", "MAF", "Spline"]
    assert title_of("flow_mle") == "Flow-MLE"
    assert model_title("fce", "spline") == "Spline (FCE)" and model_title("nce", "—") == "NCE"


def test_reading_a_missing_store_creates_nothing(tmp_path):
    from analysis.loader import StoreError

    missing = tmp_path / "no-such-folder" / "mistyped.db"
    with pytest.raises(StoreError, match=r"mistyped\.db: no MLflow store there"):
        load_runs(f"sqlite:///{missing}", [EXPERIMENT])
    assert not missing.parent.exists()
    with pytest.raises(StoreError, match="no MLflow store there"):
        load_runs(str(tmp_path / "mlruns"), [EXPERIMENT])
    assert not (tmp_path / "mlruns").exists()


def test_reading_another_programs_database_changes_nothing(tmp_path):
    """An Optuna storage (or any SQLite file, or a file that is no database) given as the
    MLflow store is refused in one line and left byte for byte as it was."""
    import sqlite3

    from analysis.loader import StoreError

    optuna_db, text = tmp_path / "optuna.db", tmp_path / "notes.txt"
    with sqlite3.connect(optuna_db) as connection:
        connection.execute("CREATE TABLE studies (study_id INTEGER PRIMARY KEY)")
    text.write_text("not a database\n")
    for path, what in ((optuna_db, "not an MLflow store"), (text, "not a SQLite database")):
        before = path.read_bytes()
        with pytest.raises(StoreError, match=f"{path.name} is {what}"):
            load_runs(f"sqlite:///{path}", [EXPERIMENT])
        assert path.read_bytes() == before


def test_a_server_that_does_not_answer_is_one_line_in_seconds():
    import socket

    from analysis.loader import StoreError

    with socket.socket() as sock:  # a port nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StoreError, match=f"http://127.0.0.1:{port}: no MLflow server answers"):
        load_runs(f"http://127.0.0.1:{port}", [EXPERIMENT])


def test_a_missing_experiment_or_no_finished_run_is_one_line(tmp_path):
    from mlflow.tracking import MlflowClient

    from analysis.loader import StoreError, finished

    uri = store_uri(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("empty")
    with pytest.raises(StoreError, match=r"no experiment 'fce' in .*; it holds .*empty"):
        load_runs(uri, ["fce"])
    with pytest.raises(StoreError, match="no FINISHED run in empty; it holds no run"):
        finished(load_runs(uri, ["empty"]), "empty")
    run = client.create_run(client.get_experiment_by_name("empty").experiment_id)
    client.set_terminated(run.info.run_id, "FAILED")
    with pytest.raises(StoreError, match="1 FAILED run"):
        finished(load_runs(uri, ["empty"]), "empty")


def test_a_notebook_on_a_missing_store_says_one_line(tmp_path, monkeypatch):
    """The notebooks open existing stores only: one line, no traceback, nothing created."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    missing = tmp_path / "nowhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    notebook = nbformat.read(ROOT / "analysis" / "datasets_x_flows.ipynb", as_version=4)
    client = NotebookClient(notebook, resources={"metadata": {"path": str(ROOT / "analysis")}})
    with pytest.raises(CellExecutionError) as raised:
        client.execute()
    assert raised.value.ename == "StoreError"
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]  # no traceback shown
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert f"error: sqlite:///{missing}: no MLflow store there" in stderr
    assert not missing.parent.exists()


def log_metrics(uri: str, runs: list[tuple[dict[str, str], dict[str, list[float]]]]) -> list[str]:
    """Runs with these params and metric histories (a value per step 10, 20, ...)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(EXPERIMENT)
    ids = []
    for given, histories in runs:
        run = client.create_run(experiment)
        metrics = [
            Metric(name, value, 0, 10 * (k + 1))
            for name, values in histories.items()
            for k, value in enumerate(values)
        ]
        client.log_batch(
            run.info.run_id,
            params=[Param(k, v) for k, v in given.items()],
            metrics=metrics,
        )
        client.set_terminated(run.info.run_id, "FINISHED")
        ids.append(run.info.run_id)
    return ids


def checkerboard(estimator: str) -> dict[str, str]:
    return {
        "estimator.name": estimator,
        "dataset.name": "checkerboard",
        "flow.name": "spline",
        "threshold.name": "fixed",
        "seed": "0",
    }


def test_an_inf_reads_back_as_inf_and_each_model_keeps_only_its_own_divergences(tmp_path):
    """A reverse KL logged as inf (the flow has mass on an empty square) is inf again, not
    MLflow's stored 1.8e308; flow_mle's EBM divergences and mle's flow ones are NaN."""
    uri = store_uri(tmp_path)
    every = {
        "kl_data_ebm": [0.1],
        "kl_ebm_data": [0.2],
        "js_ebm_data": [0.03],
        "kl_data_flow": [0.3],
        "kl_flow_data": [2.0, math.inf],
        "js_flow_data": [0.04],
    }
    fce, flow_mle, mle = log_metrics(
        uri, [(checkerboard(e), every) for e in ("fce", "flow_mle", "mle")]
    )
    runs = load_runs(uri, [EXPERIMENT]).set_index("run_id")
    assert runs.loc[fce, "kl_flow_data"] == math.inf
    assert runs.loc[fce, ["kl_ebm_data", "js_ebm_data", "js_flow_data"]].tolist() == [
        0.2,
        0.03,
        0.04,
    ]
    assert runs.loc[flow_mle, "kl_flow_data"] == math.inf
    assert runs.loc[flow_mle, ["kl_data_ebm", "kl_ebm_data", "js_ebm_data"]].isna().all()
    assert runs.loc[mle, ["kl_data_flow", "kl_flow_data", "js_flow_data"]].isna().all()
    assert runs.loc[mle, "kl_ebm_data"] == 0.2
    history = load_history([fce], ["kl_flow_data"], uri)
    assert history["value"].tolist() == [2.0, math.inf]
    text = format_table(aggregate(runs.reset_index(), metrics=["kl_flow_data"]), ["kl_flow_data"])
    assert text.set_index("estimator.name")["kl_flow_data"].to_dict() == {
        "fce": "inf",
        "flow_mle": "inf",
        "mle": "—",
    }
