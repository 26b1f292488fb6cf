"""MLflow runs -> tidy pandas: one row per run, metric histories, aggregates over seeds.

from analysis.loader import load_runs, load_history, aggregate, finished
runs = load_runs()                                  # MLFLOW_TRACKING_URI or the project store
table = aggregate(finished(runs))                   # mean, std and n per group of repeats

Only repeats are averaged: runs of one sweep (a Hydra grid's ``sweep_id``, an Optuna study)
whose configs differ by the seed alone. A 5,000-step run, a 300-step grid and a study's tuned
trials on the same dataset and flow are separate rows, each with the number of runs behind it,
and a study's parent run (it trains nothing) is never a row.

Reading never creates a store: a store or experiment that is not there is a ``StoreError``
whose message is one line. What a run did not train is not applicable (``NOT_APPLICABLE``):
NCE against a fitted Gaussian and the EBM by exact MLE train no flow, flow-MLE no EBM, so
those runs' settings and metrics of that model read ``—`` and NaN, and an NCE run is never
counted as a Glow run. A metric logged as +-inf (a reverse KL where the model has mass and
the data none) reads back as +-inf, not as the largest float MLflow's SQLite store keeps.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd

from fce.config import EBM_METRICS, ESTIMATOR_NAMES, EVAL_METRICS, FLOW_METRICS
from fce.tracking import TrackingError, check_reachable
from fce.tracking.housekeeping import MLFLOW_TABLES, sqlite_tables

ROOT = Path(__file__).resolve().parents[1]
NOT_APPLICABLE = "—"
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
    "train.compile",  # how the flow's passes run: numbers equal to float rounding
    "train.resume",
    "train.eval_every",
    "train.plot_every",
    "train.checkpoint_every",
)
HYDRA_KEYS = ("._target_", "._partial_")
# MLflow's SQLite store keeps +-inf as +-1.797e308 (the largest float); no metric here is
# ever that large otherwise.
STORED_INF = 1e308


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
    "ebm.base": "none",
    "dataset.dim": "2",
    "eval.logz_samples": "20000",
    "eval.min_ess": "100",
    "eval.fisher": "auto",
    "eval.logz": "importance",
    "eval.ais_chains": "1024",
    "eval.ais_steps": "500",
}


# NCE's flow is its noise: a fixed model (a fitted Gaussian, or a frozen flow of another run),
# evaluated but never trained; the estimator classes do not say this, so it is written here.
FIXED_NOISE = ("nce",)
# The params and metrics of each model; nll_data is the data's own (it needs no model).
MODEL_PARAMS = {
    "flow": ("flow.", "optimizer.lr_flow"),
    "ebm": ("ebm.", "optimizer.lr_ebm", "train.ema_decay"),
    # The threshold rule alternates the two players: it means nothing where one is not trained.
    "both": ("threshold.",),
}
MODEL_METRICS = {
    "flow": (*(m for m in FLOW_METRICS if m != "nll_data"), "flow_step_share"),
    "ebm": tuple(m for m in EBM_METRICS if m != "nll_data"),
}


@functools.cache
def trains(estimator: str) -> frozenset[str]:
    """The models a run of ``estimator`` trains ("ebm", "flow"), from the estimator classes.

    An estimator this version does not know (a store from another version) counts as training
    both, so nothing it logged is hidden.
    """
    if estimator not in ESTIMATOR_NAMES:
        return frozenset({"ebm", "flow"})
    from fce.factory import option_class

    cls = option_class("estimator", estimator)
    flow = cls.evaluates_flow and estimator not in FIXED_NOISE
    return frozenset({"ebm"} if cls.evaluates_ebm else set()) | ({"flow"} if flow else set())


def unused_models(params: dict[str, object]) -> set[str]:
    """The models whose settings a run's result does not depend on ("ebm", "flow", "both").

    NCE against a frozen flow (``estimator.noise=flow``) trains no flow but depends on it.
    """
    estimator = str(params.get("estimator.name") or "fce")
    trained = trains(estimator)
    unused = {"ebm", "flow"} - trained
    if estimator in FIXED_NOISE and params.get("estimator.noise") == "flow":
        unused.discard("flow")
    if trained != {"ebm", "flow"}:
        unused.add("both")
    return unused


def _unused(param: str, models: set[str]) -> bool:
    return any(
        param == key or (key.endswith(".") and param.startswith(key))
        for model in models
        for key in MODEL_PARAMS[model]
    )


def config_of(params: dict[str, str]) -> str:
    """The run's experiment as canonical JSON: every param but the seed, bookkeeping and the
    settings of a model the run does not use (NCE's runs with flow=glow and flow=maf are
    repeats of one experiment)."""
    unused = unused_models(params)
    kept = {
        k: v
        for k, v in sorted({**ADDED_PARAMS, **params}.items())
        if not is_bookkeeping(k) and not _unused(k, unused)
    }
    return json.dumps(kept, sort_keys=True)


def mask_not_applicable(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with the settings of models a run does not use set to ``NOT_APPLICABLE`` and
    the metrics of models it does not train set to NaN (NCE's ``kl_data_flow`` is its fixed
    noise's, not a trained flow's; the logged values stay in MLflow)."""
    if not len(runs):
        return runs
    runs = runs.copy()
    if "estimator.name" not in runs.columns:
        runs["estimator.name"] = "fce"
    # Runs logged before the estimator group existed were all FCE.
    runs["estimator.name"] = runs["estimator.name"].fillna("fce")
    for index, row in runs.iterrows():
        unused = unused_models(row.to_dict())
        if not unused:
            continue
        settings = [c for c in runs.columns if "." in c and _unused(c, unused)]
        for column in settings:
            runs[column] = runs[column].astype(object)
        runs.loc[index, settings] = NOT_APPLICABLE
        untrained = {"ebm", "flow"} - trains(row["estimator.name"])
        metrics = [m for model in untrained for m in MODEL_METRICS[model] if m in runs.columns]
        runs.loc[index, metrics] = math.nan
    if "flow.name" in runs.columns:  # a store whose runs log no flow for NCE
        runs["flow.name"] = runs["flow.name"].fillna(NOT_APPLICABLE)
    return runs


def title_of(name: object) -> str:
    """A display title for a flow or estimator name: ``maf`` -> MAF, ``glow`` -> Glow,
    ``flow_mle`` -> Flow-MLE (short words are acronyms), so a new name needs no entry."""
    if not isinstance(name, str) or name == NOT_APPLICABLE:
        return NOT_APPLICABLE
    return "-".join(w.upper() if len(w) <= 3 else w.capitalize() for w in name.split("_"))


def model_title(estimator: str, flow: str) -> str:
    """``Glow (FCE)``; ``NCE`` alone where the estimator uses no flow."""
    est = title_of(estimator)
    if flow == NOT_APPLICABLE or not isinstance(flow, str):
        return est
    return f"{title_of(flow)} ({est})"


def run_label(run: pd.Series | dict) -> str:
    """A run as a caption names it: its name and the first 8 hex digits of its id."""
    return f"{run.get('run_name') or '?'} ({str(run['run_id'])[:8]})"


def tracking_uri(uri: str | None = None) -> str:
    """The store to read: the argument, else $MLFLOW_TRACKING_URI, else the project's."""
    if uri:
        return uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlflow.db'}"


def logged(value: float) -> float:
    """A metric's value as it was logged: +-inf where the store kept +-1.797e308."""
    return math.copysign(math.inf, value) if abs(value) >= STORED_INF else value


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


class StoreError(ValueError):
    """A store, experiment or run that is not there, said in one line."""


def check_store(
    uri: str | None = None,
    kind: str = "MLflow store",
    hint: str = "--uri, or $MLFLOW_TRACKING_URI",
) -> str:
    """The store's URI, if it exists; ``StoreError`` if not. MLflow (and Optuna) create an
    empty store where they are pointed, so a mistyped path would otherwise read as "no runs".
    A server's URI (http, postgresql) is passed on as it is: it creates nothing by reading."""
    uri = tracking_uri(uri) if kind == "MLflow store" else str(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        # sqlite:///relative.db and sqlite:////absolute.db; sqlite:// alone is in memory.
        path = unquote(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else ""
        if path and not Path(path).is_file():
            raise StoreError(
                f"{uri}: no {kind} there (no such file); give an existing one ({hint})"
            )
        if path and kind == "MLflow store":
            # Read without writing: MLflow would add its tables to another program's database
            # (an Optuna storage beside it, say) before failing on it.
            tables = sqlite_tables(Path(path))
            if tables is None or not tables >= MLFLOW_TABLES:
                what = "not a SQLite database" if tables is None else "not an MLflow store"
                raise StoreError(f"{uri}: {path} is {what}; give an MLflow store ({hint})")
    elif parsed.scheme in ("http", "https") and kind == "MLflow store":
        # MLflow's client retries a server that does not answer for minutes.
        try:
            check_reachable(uri)
        except TrackingError as error:
            raise StoreError(str(error).removeprefix("tracking.uri=")) from None
    elif parsed.scheme in ("", "file"):
        path = unquote(parsed.path) if parsed.scheme == "file" else uri
        if not Path(path).is_dir():
            raise StoreError(
                f"{uri}: no {kind} there (no such folder); give an existing one ({hint})"
            )
    return uri


def one_line_errors() -> None:
    """In a notebook, a ``StoreError`` shows its one line instead of a traceback; the cell
    still fails, so running all cells stops there."""
    try:
        from IPython import get_ipython
    except ImportError:
        return

    def show(shell, etype, value, tb, tb_offset=None) -> None:
        print(f"error: {value}", file=sys.stderr, flush=True)

    shell = get_ipython()
    if shell is not None:
        shell.set_custom_exc((StoreError,), show)


def _client(uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=check_store(uri))


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
    found = {name: client.get_experiment_by_name(name) for name in experiments}
    missing = [name for name, experiment in found.items() if experiment is None]
    if missing:
        held = sorted(e.name for e in client.search_experiments())
        raise StoreError(
            f"no experiment {missing[0]!r} in {tracking_uri(uri)}; it holds "
            + (", ".join(held) if held else "none")
        )
    ids = [e.experiment_id for e in found.values()]
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
            row.update({k: logged(v) for k, v in data.metrics.items()})
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
        return pd.DataFrame(columns=["run_id", "run_name", "experiment", "status"])
    return mask_not_applicable(frame).sort_values("start_time", ignore_index=True)


def finished(runs: pd.DataFrame, what: str = "") -> pd.DataFrame:
    """The FINISHED runs of ``runs`` that trained something (no study parent); ``StoreError``
    if there are none. ``what`` names where they came from, for the message."""
    done = runs[runs["status"] == "FINISHED"] if len(runs) else runs
    if "is_parent" in done.columns:
        done = done[~done["is_parent"].astype(bool)]
    if not len(done):
        where = f" in {what}" if what else ""
        raise StoreError(f"no FINISHED run{where}{left_out(runs, prefix='; ')}")
    return done


def left_out(runs: pd.DataFrame, prefix: str = "") -> str:
    """What ``finished`` leaves out, in words ("2 RUNNING, 1 FAILED runs left out")."""
    if not len(runs):
        return f"{prefix}it holds no run" if prefix else ""
    others = runs.loc[runs["status"] != "FINISHED", "status"].value_counts()
    if not len(others):
        return ""
    counts = ", ".join(f"{n} {status}" for status, n in sorted(others.items()))
    return f"{prefix}{counts} run(s) left out (not FINISHED)"


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
        {"run_id": run_id, "metric": name, "step": m.step, "value": logged(m.value)}
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
    settings = settings.fillna(NOT_APPLICABLE).astype(str)
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
    ``<metric>_mean``, ``<metric>_std``, ``n``: how many runs (one per seed) went in, and
    ``runs``: their ids' first 8 hex digits.
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
    # Which runs went in: the first 8 hex digits of each id, to find them in MLflow.
    ids = grouped["run_id"].agg(lambda ids: " ".join(sorted(str(i)[:8] for i in ids)))
    table = table.assign(n=grouped.size(), runs=ids).reset_index()
    return table.drop(columns="group")


def format_table(table: pd.DataFrame, metrics: Sequence[str], digits: int = 3) -> pd.DataFrame:
    """``mean ± std`` strings, for a README or a notebook; ``n`` runs behind each row."""
    keys = [
        c for c in table.columns if not c.endswith(("_mean", "_std")) and c not in ("n", "runs")
    ]
    out = table[keys].copy()
    estimators = table.get("estimator.name", pd.Series("fce", index=table.index)).fillna("fce")
    for metric in metrics:
        if f"{metric}_mean" not in table:
            continue
        model = next((m for m, names in MODEL_METRICS.items() if metric in names), None)
        out[metric] = [
            mean_std(m, s, digits)
            if model is None or model in trains(str(e)) or not math.isnan(m)
            else NOT_APPLICABLE
            for m, s, e in zip(table[f"{metric}_mean"], table[f"{metric}_std"], estimators)
        ]
    out["n"] = table["n"]
    if "runs" in table:
        out["runs"] = table["runs"]
    return out


def markdown(table: pd.DataFrame) -> str:
    """``table`` as a Markdown table: a header row, then one row a line."""
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "---|" * len(table.columns)
    rows = ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``mean ± std``; one run has no spread: its value alone, not "± nan" (nor "± 0")."""
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")
