"""MLflow runs -> tidy pandas: one row per run, metric histories, aggregates over seeds.

from analysis.loader import load_runs, load_history, aggregate
runs = load_runs()                                  # MLFLOW_TRACKING_URI or the project store
table = aggregate(runs[runs.status == "FINISHED"])  # mean, std, n per dataset x flow x rule
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from fce.config import EVAL_METRICS

ROOT = Path(__file__).resolve().parents[1]
GROUP_BY = ("dataset.name", "estimator.name", "flow.name", "threshold.name")
FINAL_METRICS = EVAL_METRICS
TAGS = ("sweep_id", "job_num", "optuna.study", "optuna.trial", "optuna.state", "git_commit")


def tracking_uri(uri: str | None = None) -> str:
    """The store to read: the argument, else $MLFLOW_TRACKING_URI, else the project's."""
    if uri:
        return uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlflow.db'}"


def cast(value: str | None) -> object:
    """A logged param back to its type: int, float, bool, None or the string itself."""
    if value is None or value in ("null", "None"):
        return None
    if value in ("True", "true"):
        return True
    if value in ("False", "false"):
        return False
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _client(uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(uri))


def load_runs(
    uri: str | None = None,
    experiments: Sequence[str] = ("fce",),
    filter_string: str = "",
) -> pd.DataFrame:
    """One row per run: ids, status, times, every param (typed), final metrics, tags.

    Params keep their dotted names (``dataset.name``); metrics are the last logged values;
    the tags of ``TAGS`` are columns (missing ones are NaN).
    """
    client = _client(uri)
    ids = [e.experiment_id for name in experiments if (e := client.get_experiment_by_name(name))]
    if not ids:
        return pd.DataFrame(columns=["run_id", "experiment", "status"])
    names = {i: client.get_experiment(i).name for i in ids}
    rows = []
    page_token = None
    while True:
        page = client.search_runs(ids, filter_string, max_results=1000, page_token=page_token)
        for run in page:
            info, data = run.info, run.data
            row: dict[str, object] = {
                "run_id": info.run_id,
                "run_name": info.run_name,
                "experiment": names[info.experiment_id],
                "status": info.status,
                "start_time": pd.to_datetime(info.start_time, unit="ms", utc=True),
                "duration_s": (info.end_time - info.start_time) / 1000
                if info.end_time
                else math.nan,
            }
            row.update({k: cast(v) for k, v in data.params.items()})
            row.update(data.metrics)
            row.update({k: data.tags.get(k) for k in TAGS})
            row["parent_run_id"] = data.tags.get("mlflow.parentRunId")
            rows.append(row)
        page_token = page.token
        if not page_token:
            break
    frame = pd.DataFrame(rows)
    if not len(frame):
        return frame
    # Runs logged before the estimator group existed were all FCE.
    frame["estimator.name"] = frame.get("estimator.name", pd.Series(index=frame.index)).fillna(
        "fce"
    )
    return frame.sort_values("start_time", ignore_index=True)


def load_history(
    run_ids: Iterable[str],
    metrics: Sequence[str] = ("value", "acc", "mse_logp"),
    uri: str | None = None,
) -> pd.DataFrame:
    """Long format: one row per (run_id, metric, step) with its value."""
    client = _client(uri)
    rows = [
        {"run_id": run_id, "metric": name, "step": m.step, "value": m.value}
        for run_id in run_ids
        for name in metrics
        for m in client.get_metric_history(run_id, name)
    ]
    frame = pd.DataFrame(rows, columns=["run_id", "metric", "step", "value"])
    return frame.sort_values(["run_id", "metric", "step"], ignore_index=True)


def aggregate(
    runs: pd.DataFrame,
    by: Sequence[str] = GROUP_BY,
    metrics: Sequence[str] = FINAL_METRICS,
) -> pd.DataFrame:
    """Mean and std of each final metric per group, with the number of seeds behind them.

    Returns columns ``<metric>_mean``, ``<metric>_std`` and ``n_seeds``, one row per group.
    """
    present = [m for m in metrics if m in runs.columns]
    grouped = runs.groupby(list(by), dropna=False)
    table = grouped[present].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    seeds = grouped["seed"].nunique() if "seed" in runs.columns else grouped.size()
    return table.assign(n_seeds=seeds).reset_index()


def format_table(table: pd.DataFrame, metrics: Sequence[str], digits: int = 3) -> pd.DataFrame:
    """``mean ± std`` strings, for a README or a notebook."""
    keys = [c for c in table.columns if not c.endswith(("_mean", "_std")) and c != "n_seeds"]
    out = table[keys].copy()
    for metric in metrics:
        if f"{metric}_mean" not in table:
            continue
        mean, std = table[f"{metric}_mean"], table[f"{metric}_std"].fillna(0.0)
        out[metric] = [
            "-" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(mean, std)
        ]
    out["seeds"] = table["n_seeds"]
    return out
