"""MLflow runs -> tidy pandas: one row per run, metric histories, aggregates over seeds.

from analysis.loader import load_runs, load_history, aggregate
runs = load_runs()                                  # MLFLOW_TRACKING_URI or the project store
table = aggregate(runs[runs.status == "FINISHED"])  # mean, std and n per group of repeats

Only repeats are averaged: runs of one sweep (a Hydra grid's ``sweep_id``, an Optuna study)
whose configs differ by the seed alone. A 5,000-step run, a 300-step grid and a study's tuned
trials on the same dataset and flow are separate rows, each with the number of runs behind it,
and a study's parent run (it trains nothing) is never a row.
"""

from __future__ import annotations

import hashlib
import json
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
# Params that say where and how a run was executed, logged and shown, not what it trained:
# runs that differ only in these and the seed are repeats of one experiment. (Hydra's
# ``_target_``/``_partial_`` say how an object is built, not what it is.)
BOOKKEEPING = (
    "seed",
    "tracking.",
    "progress",
    "device",
    "threads",
    "train.resume",
    "train.eval_every",
    "train.plot_every",
    "train.checkpoint_every",
)
HYDRA_KEYS = ("._target_", "._partial_")


def is_bookkeeping(param: str) -> bool:
    """True for a param that does not change what a run trains (see ``BOOKKEEPING``)."""
    return param.endswith(HYDRA_KEYS) or any(
        param == key or (key.endswith(".") and param.startswith(key)) for key in BOOKKEEPING
    )


# Params of settings added after runs were logged, as those runs had them: a run logged before
# a setting existed groups with today's runs that leave it at its default.
ADDED_PARAMS = {
    "schedule.name": "constant",
    "train.ema_decay": "0.0",
    "ebm.activation": "leaky_relu",
    "ebm.fourier_features": "0",
    "ebm.fourier_scale": "1.0",
}


def config_of(params: dict[str, str]) -> str:
    """The run's experiment as canonical JSON: every param but the seed and bookkeeping."""
    kept = {k: v for k, v in sorted({**ADDED_PARAMS, **params}.items()) if not is_bookkeeping(k)}
    return json.dumps(kept, sort_keys=True)


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
            # What makes runs comparable, kept apart from the columns above, which a
            # merge or a selection of columns may drop.
            row["config"] = config_of(data.params)
            row["is_parent"] = is_parent(
                info.run_name, data.params, data.tags.get("optuna.study"), row["parent_run_id"]
            )
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


def is_parent(
    run_name: str | None, params: dict, study: str | None, parent_run_id: str | None
) -> bool:
    """A run that holds others and trains nothing: a study's parent (``study-<name>``)."""
    study_parent = study is not None and parent_run_id is None
    return not params or study_parent or (run_name or "").startswith("study-")


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


def sweep_of(runs: pd.DataFrame) -> pd.Series:
    """Each run's sweep: its Hydra grid (``sweep_id``), else its Optuna study, else None."""
    sweep = pd.Series(None, index=runs.index, dtype=object)
    for tag in ("optuna.study", "sweep_id"):  # a grid's id wins over a study's name
        if tag in runs.columns:
            sweep = runs[tag].where(runs[tag].notna(), sweep)
    return sweep


def repeats(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that can be averaged, each with the ``group`` of repeats it belongs to.

    Parent runs are left out. A group is one sweep (or no sweep) and one config: runs in it
    differ by the seed alone (and by bookkeeping such as ``tracking.*`` or ``progress``). Of
    two runs of a group with the same seed, the newest is kept, so ``n`` counts seeds.

    Returns:
        ``runs`` without parents and duplicates, plus columns ``sweep`` and ``group`` (an id
        of 8 hex digits, stable across calls).
    """
    if "config" not in runs.columns:
        raise ValueError("runs: no 'config' column; load them with analysis.loader.load_runs")
    if "is_parent" in runs.columns:
        runs = runs[~runs["is_parent"].astype(bool)]
    runs = runs.assign(sweep=sweep_of(runs))
    keys = runs["sweep"].fillna("").astype(str) + "\n" + runs["config"]
    group = keys.map(lambda k: hashlib.sha1(k.encode()).hexdigest()[:8])
    runs = runs.assign(group=group)
    if "start_time" in runs.columns:
        runs = runs.sort_values("start_time")
    if "seed" in runs.columns:
        runs = runs.drop_duplicates(["group", "seed"], keep="last")
    return runs


def newest_group(runs: pd.DataFrame, cell: Sequence[str]) -> pd.DataFrame:
    """Per ``cell`` (e.g. dataset x flow), only the runs of its most recently run group.

    For a figure that shows one curve or panel per cell, from repeats of one experiment.
    """
    runs = repeats(runs)
    if not len(runs):
        return runs
    last = runs.groupby("group")["start_time"].transform("max")
    newest = runs.assign(_last=last).groupby(list(cell), dropna=False)["_last"].transform("max")
    return runs[last == newest]


def settings_that_differ(runs: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """The params, beyond ``by``, whose values tell the groups of ``repeats(runs)`` apart.

    Returns one column per such param, one row per run (values as logged, strings).
    """
    settings = pd.DataFrame(list(runs["config"].map(json.loads)), index=runs.index)
    settings = settings.fillna("-").astype(str)
    per_group = settings.groupby(runs["group"]).first()
    differ = [c for c in per_group.columns if c not in by and per_group[c].nunique() > 1]
    return settings[differ]


def aggregate(
    runs: pd.DataFrame,
    by: Sequence[str] = GROUP_BY,
    metrics: Sequence[str] = FINAL_METRICS,
) -> pd.DataFrame:
    """Mean and std of each final metric per group of repeats (see ``repeats``).

    Returns one row per group: the ``by`` columns, then what else tells the rows apart (the
    settings that differ between groups, the sweep where there are several),
    ``<metric>_mean``, ``<metric>_std``, and ``n``: how many runs (one per seed) went in.
    """
    runs = repeats(runs)
    present = [m for m in metrics if m in runs.columns]
    settings = settings_that_differ(runs, by) if len(runs) else pd.DataFrame(index=runs.index)
    frame = pd.concat(
        [runs.drop(columns=list(settings.columns), errors="ignore"), settings], axis=1
    )
    frame["sweep"] = frame["sweep"].fillna("-")
    sweeps = ["sweep"] if frame.drop_duplicates("group")["sweep"].nunique() > 1 else []
    keys = [*by, *settings.columns, *sweeps, "group"]
    # Within a group every key has one value: grouping by them only carries them along.
    grouped = frame.groupby(keys, dropna=False, sort=True)
    table = grouped[present].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    table = table.assign(n=grouped.size()).reset_index()
    return table.drop(columns="group")


def format_table(table: pd.DataFrame, metrics: Sequence[str], digits: int = 3) -> pd.DataFrame:
    """``mean ± std`` strings, for a README or a notebook; ``n`` runs behind each row."""
    keys = [c for c in table.columns if not c.endswith(("_mean", "_std")) and c != "n"]
    out = table[keys].copy()
    for metric in metrics:
        if f"{metric}_mean" not in table:
            continue
        # One run has no spread: its value alone, not "± 0".
        out[metric] = [
            "-"
            if math.isnan(m)
            else f"{m:.{digits}f}" + ("" if math.isnan(s) else f" ± {s:.{digits}f}")
            for m, s in zip(table[f"{metric}_mean"], table[f"{metric}_std"])
        ]
    out["n"] = table["n"]
    return out
