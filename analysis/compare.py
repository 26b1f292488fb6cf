"""FCE vs NCE (the EBM, with its maximum-likelihood ceiling) and FCE vs maximum likelihood (the
flow): table and figure.

    from analysis.compare import load_comparison, comparison_table
    runs = load_comparison(experiment="compare")   # per cell, the newest group of repeats
    table = comparison_table(runs)                  # one row per dataset, mean ± std

``python sweeps/compare.py`` runs the grid and calls ``write_report``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis.loader import load_runs, newest_group

CELL = ("dataset.name", "estimator.name", "flow.name")
# (metric, estimator) columns of the table: the EBMs of FCE and NCE and the same EBM by
# maximum likelihood (mle, their ceiling), then the two flows.
EBM_COLUMNS = [
    (metric, estimator)
    for metric in ("nll_ebm", "kl_data_ebm", "mse_logp")
    for estimator in ("fce", "nce", "mle")
]
FLOW_COLUMNS = [
    (metric, estimator)
    for metric in ("nll_flow", "kl_data_flow")
    for estimator in ("fce", "flow_mle")
]
# MLE labels both maximum-likelihood baselines: the metric says which model (nll_ebm, nll_flow).
LABELS = {"fce": "FCE", "nce": "NCE", "mle": "MLE", "flow_mle": "MLE"}


def load_comparison(
    uri: str | None = None, experiment: str = "compare", flow: str | None = None
) -> pd.DataFrame:
    """The FINISHED runs of ``experiment``: per dataset x estimator x flow, the seeds of its
    newest group of repeats (one sweep, one config; see ``analysis.loader.repeats``), so a
    2,000-step run never stands beside a 5,000-step one in a cell."""
    runs = load_runs(uri, [experiment])
    if not len(runs):
        return runs
    runs = runs[runs["status"] == "FINISHED"]
    if flow is not None:
        runs = runs[runs["flow.name"] == flow]
    return newest_group(runs, CELL)


def _stats(runs: pd.DataFrame, dataset: str, estimator: str, metric: str) -> pd.Series:
    part = runs[(runs["dataset.name"] == dataset) & (runs["estimator.name"] == estimator)]
    values = part[metric].dropna() if metric in part else pd.Series(dtype=float)
    return pd.Series({"mean": values.mean(), "std": values.std(), "n": len(values)})


def verdict(a: pd.Series, b: pd.Series, names: tuple[str, str]) -> str:
    """The lower mean wins if it is lower by more than twice the difference's standard error."""
    if a["n"] < 2 or b["n"] < 2:
        return "-"
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    if abs(a["mean"] - b["mean"]) <= 2 * se:
        return "tie"
    return names[0] if a["mean"] < b["mean"] else names[1]


def seeds_won(runs: pd.DataFrame, dataset: str, other: str, metric: str) -> str:
    """On how many seeds FCE's ``metric`` is lower than ``other``'s, of the seeds both ran.

    Seeds pair the runs (the same training draw and initialisation), so this count is robust
    to one run's outlier, which a mean and std are not.
    """
    part = runs[runs["dataset.name"] == dataset]
    by_seed = part.pivot_table(index="seed", columns="estimator.name", values=metric)
    if "fce" not in by_seed or other not in by_seed:
        return "-"
    both = by_seed[["fce", other]].dropna()
    return f"{int((both['fce'] < both[other]).sum())}/{len(both)}"


def comparison_table(runs: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """One row per dataset: each metric for each estimator as mean ± std, and who wins.

    "EBM" compares nll_ebm of FCE and NCE, "flow" nll_flow of FCE's flow and the MLE flow:
    the winner by the means (or "tie"), and on how many seeds FCE did better. The EBM by
    maximum likelihood (mle) is the ceiling beside them, in no verdict.
    """
    rows = []
    for dataset in sorted(runs["dataset.name"].unique()):
        row: dict[str, object] = {"dataset": dataset}
        nll_data = runs.loc[runs["dataset.name"] == dataset, "nll_data"].dropna()
        row["nll_data"] = f"{nll_data.mean():.{digits}f}" if len(nll_data) else "-"
        for metric, estimator in EBM_COLUMNS + FLOW_COLUMNS:
            s = _stats(runs, dataset, estimator, metric)
            text = "-" if s["n"] == 0 else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
            row[f"{metric} {LABELS[estimator]}"] = text
        stats = {e: _stats(runs, dataset, e, "nll_ebm") for e in ("fce", "nce")}
        row["EBM winner"] = verdict(stats["fce"], stats["nce"], ("FCE", "NCE"))
        row["EBM: FCE better on"] = seeds_won(runs, dataset, "nce", "nll_ebm")
        stats = {e: _stats(runs, dataset, e, "nll_flow") for e in ("fce", "flow_mle")}
        row["flow winner"] = verdict(stats["fce"], stats["flow_mle"], ("FCE", "MLE"))
        row["flow: FCE better on"] = seeds_won(runs, dataset, "flow_mle", "nll_flow")
        seeds = runs.loc[runs["dataset.name"] == dataset].groupby("estimator.name")["seed"]
        row["seeds"] = int(seeds.nunique().min())
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "---|" * len(table.columns)
    body = ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def comparison_figure(
    runs: pd.DataFrame, uri: str | None, datasets: Sequence[str], limit: float = 4.0
) -> Figure:
    """Rows of Data | EBM (FCE) | EBM (NCE) | EBM (MLE) | Flow (FCE) | Flow (MLE), each run's
    lowest seed."""
    from analysis.figures import load_trainer
    from fce.callbacks import PANEL_SAMPLES
    from fce.plots import draw_density, draw_samples, finish_panel

    columns = [
        ("fce", "ebm"),
        ("nce", "ebm"),
        ("mle", "ebm"),
        ("fce", "flow"),
        ("flow_mle", "flow"),
    ]
    titles = ["Data", "EBM (FCE)", "EBM (NCE)", "EBM (MLE)", "Flow (FCE)", "Flow (MLE)"]
    present = [d for d in datasets if d in set(runs["dataset.name"])]
    fig = Figure(figsize=(15.0, 2.6 * len(present)), layout="constrained")
    axes = fig.subplots(len(present), len(titles), squeeze=False)
    for dataset, row_axes in zip(present, axes):
        samples = None
        for ax, (estimator, model) in zip(row_axes[1:], columns):
            match = runs[(runs["dataset.name"] == dataset) & (runs["estimator.name"] == estimator)]
            if not len(match):
                ax.set_facecolor("0.9")
                continue
            trainer = load_trainer(match.sort_values("seed").iloc[0]["run_id"], uri)
            samples = trainer.data[:PANEL_SAMPLES]
            evaluator, ebm = trainer.evaluator, trainer.evaluated_ebm
            log_q, log_p = evaluator.grid_log_densities(ebm, trainer.flow)
            draw_density(ax, log_p if model == "ebm" else log_q, limit)
        if samples is not None:
            draw_samples(row_axes[0], samples, limit)
        row_axes[0].set_ylabel(dataset, fontsize=12)
    finish_panel(axes, titles, limit)
    return fig


def write_report(
    uri: str | None,
    experiment: str,
    out: Path,
    flow: str | None = None,
    datasets: Sequence[str] | None = None,
) -> pd.DataFrame:
    """compare.md, compare.csv and compare.png in ``out``, from the runs of ``experiment``."""
    runs = load_comparison(uri, experiment, flow)
    if not len(runs):
        raise SystemExit(f"error: no FINISHED run in MLflow experiment {experiment!r}")
    if datasets is not None:
        runs = runs[runs["dataset.name"].isin(list(datasets))]
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(runs)
    text = markdown(table)
    (out / "compare.md").write_text(text + "\n")
    table.to_csv(out / "compare.csv", index=False)
    order = [d for d in (datasets or sorted(runs["dataset.name"].unique()))]
    comparison_figure(runs, uri, order).savefig(out / "compare.png", dpi=90)
    print(text)
    print(f"table and figure in {out}")
    return table
