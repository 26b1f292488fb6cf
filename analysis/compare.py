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

from analysis.loader import (
    NOT_APPLICABLE,
    finished,
    left_out,
    load_runs,
    markdown,
    newest_group,
    run_label,
    title_of,
    trains,
)
from fce.config import ESTIMATOR_NAMES

CELL = ("dataset.name", "estimator.name", "flow.name")


def label(estimator: str, model: str) -> str:
    """An estimator's column label for a model: ``mle`` and ``flow_mle`` are both "MLE" (the
    metric says which model: nll_ebm, nll_flow), the others their title (FCE, NCE)."""
    return title_of(estimator.removeprefix(f"{model}_"))


# (metric, estimator) columns of the table: the EBMs of the estimators that train one (FCE,
# NCE, and the same EBM by maximum likelihood, mle: their ceiling), then the flows (FCE's and
# the flow by maximum likelihood). Each forward KL(data || model) has the reverse
# KL(model || data) beside it.
# The paper's estimator first, then its baselines; an estimator added later comes last.
ORDER = ("fce", "nce", "flow_mle", "mle")
ESTIMATORS = sorted(ESTIMATOR_NAMES, key=lambda e: ORDER.index(e) if e in ORDER else len(ORDER))
EBM_ESTIMATORS = [e for e in ESTIMATORS if "ebm" in trains(e)]
FLOW_ESTIMATORS = [e for e in ESTIMATORS if "flow" in trains(e)]
EBM_COLUMNS = [
    (m, e) for m in ("nll_ebm", "kl_data_ebm", "kl_ebm_data", "mse_logp") for e in EBM_ESTIMATORS
]
FLOW_COLUMNS = [
    (m, e) for m in ("nll_flow", "kl_data_flow", "kl_flow_data") for e in FLOW_ESTIMATORS
]
LABELS = {
    e: label(e, "flow" if e in FLOW_ESTIMATORS and e not in EBM_ESTIMATORS else "ebm")
    for e in ESTIMATOR_NAMES
}


def load_comparison(
    uri: str | None = None, experiment: str = "compare", flow: str | None = None
) -> pd.DataFrame:
    """The FINISHED runs of ``experiment``: per dataset x estimator x flow, the seeds of its
    newest group of repeats (one sweep, one config; see ``analysis.loader.repeats``), so a
    2,000-step run never stands beside a 5,000-step one in a cell. ``flow`` keeps that flow's
    runs and those of estimators that use none (NCE against a Gaussian, mle).

    Raises ``analysis.loader.StoreError`` where the store or experiment is not there or holds
    no FINISHED run.
    """
    runs = finished(load_runs(uri, [experiment]), f"MLflow experiment {experiment!r}")
    if flow is not None:
        runs = runs[runs["flow.name"].isin([flow, NOT_APPLICABLE])]
    return newest_group(runs, CELL)


def _stats(runs: pd.DataFrame, dataset: str, estimator: str, metric: str) -> pd.Series:
    """Mean, std and number of the finite values; ``inf``: how many more are infinite (a
    reverse KL where the model has mass and the data none)."""
    part = runs[(runs["dataset.name"] == dataset) & (runs["estimator.name"] == estimator)]
    values = part[metric].dropna() if metric in part else pd.Series(dtype=float)
    finite = values[values.abs() != math.inf]
    return pd.Series(
        {
            "mean": finite.mean(),
            "std": finite.std(),
            "n": len(finite),
            "inf": len(values) - len(finite),
        }
    )


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


def mean_std(s: pd.Series, digits: int) -> str:
    """``mean ± std``; one run: its value and ``(n=1)``, never "± nan"; none: "-". Where k of
    the runs are inf: "inf on k/n", then the others' spread (an inf is never averaged)."""
    if s.get("inf", 0):
        total = int(s["n"] + s["inf"])
        others = mean_std(s.drop("inf"), digits)
        return f"inf on {int(s['inf'])}/{total}" + ("" if others == "-" else f"; others {others}")
    if s["n"] == 0:
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f} (n=1)"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def cells(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """The table's rows: each dataset with each flow trained on it (runs of estimators that
    use no flow stand in every row of their dataset), or with "—" where no flow was."""
    out = []
    for dataset in sorted(runs["dataset.name"].unique()):
        flows = runs.loc[runs["dataset.name"] == dataset, "flow.name"].dropna().unique()
        trained = sorted(f for f in flows if f != NOT_APPLICABLE)
        out += [(dataset, flow) for flow in trained or [NOT_APPLICABLE]]
    return out


def cell_runs(runs: pd.DataFrame, dataset: str, flow: str) -> pd.DataFrame:
    return runs[(runs["dataset.name"] == dataset) & runs["flow.name"].isin([flow, NOT_APPLICABLE])]


def comparison_table(runs: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """One row per dataset and flow: each metric for each estimator as mean ± std, and who
    wins.

    "EBM" compares nll_ebm of FCE and NCE, "flow" nll_flow of FCE's flow and the MLE flow:
    the winner by the means (or "tie"), and on how many seeds FCE did better. The EBM by
    maximum likelihood (mle) is the ceiling beside them, in no verdict.
    """
    rows = []
    for dataset, flow in cells(runs):
        part = cell_runs(runs, dataset, flow)
        row: dict[str, object] = {"dataset": dataset, "flow": flow}
        nll_data = part["nll_data"].dropna() if "nll_data" in part else pd.Series(dtype=float)
        row["nll_data"] = f"{nll_data.mean():.{digits}f}" if len(nll_data) else "-"
        for metric, estimator in EBM_COLUMNS + FLOW_COLUMNS:
            row[f"{metric} {LABELS[estimator]}"] = mean_std(
                _stats(part, dataset, estimator, metric), digits
            )
        stats = {e: _stats(part, dataset, e, "nll_ebm") for e in ("fce", "nce")}
        row["EBM winner"] = verdict(stats["fce"], stats["nce"], ("FCE", "NCE"))
        row["EBM: FCE better on"] = seeds_won(part, dataset, "nce", "nll_ebm")
        stats = {e: _stats(part, dataset, e, "nll_flow") for e in ("fce", "flow_mle")}
        row["flow winner"] = verdict(stats["fce"], stats["flow_mle"], ("FCE", "MLE"))
        row["flow: FCE better on"] = seeds_won(part, dataset, "flow_mle", "nll_flow")
        row["seeds"] = int(part.groupby("estimator.name")["seed"].nunique().min())
        row["runs"] = len(part)
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_figure(
    runs: pd.DataFrame, uri: str | None, datasets: Sequence[str], limit: float = 4.0
) -> tuple[Figure, list[str]]:
    """Rows of Data | EBM (FCE) | EBM (NCE) | EBM (MLE) | Flow (FCE) | Flow (MLE), one per
    dataset and flow, each from the lowest seed of its cell; and the runs it drew."""
    from analysis.figures import caption, load_trainer
    from fce.callbacks import PANEL_SAMPLES
    from fce.plots import draw_density, draw_samples, finish_panel

    columns = [(e, "ebm") for e in EBM_ESTIMATORS] + [(e, "flow") for e in FLOW_ESTIMATORS]
    titles = ["Data"] + [
        f"{model.upper() if model == 'ebm' else 'Flow'} ({LABELS[e]})" for e, model in columns
    ]
    present = [(d, f) for d, f in cells(runs) if d in datasets]
    present.sort(key=lambda cell: list(datasets).index(cell[0]))
    fig = Figure(figsize=(2.5 * len(titles), 2.6 * len(present)), layout="constrained")
    axes = fig.subplots(len(present), len(titles), squeeze=False)
    drawn = []
    for (dataset, flow), row_axes in zip(present, axes):
        samples = None
        part = cell_runs(runs, dataset, flow)
        for ax, (estimator, model) in zip(row_axes[1:], columns):
            match = part[part["estimator.name"] == estimator]
            if not len(match):
                ax.set_facecolor("0.9")
                continue
            run = match.sort_values("seed").iloc[0]
            where = dataset if flow == NOT_APPLICABLE else f"{dataset} {flow}"
            drawn.append(f"{where}, {model} ({LABELS[estimator]}): {run_label(run)}")
            trainer = load_trainer(run["run_id"], uri)
            samples = trainer.data[:PANEL_SAMPLES]
            evaluator, ebm = trainer.evaluator, trainer.evaluated_ebm
            log_q, log_p = evaluator.grid_log_densities(ebm, trainer.flow)
            draw_density(ax, log_p if model == "ebm" else log_q, limit)
        if samples is not None:
            draw_samples(row_axes[0], samples, limit)
        name = dataset if flow == NOT_APPLICABLE else f"{dataset}\n{title_of(flow)}"
        row_axes[0].set_ylabel(name, fontsize=12)
    finish_panel(axes, titles, limit)
    caption(fig, ["runs: " + "; ".join(drawn)])
    return fig, drawn


def write_report(
    uri: str | None,
    experiment: str,
    out: Path,
    flow: str | None = None,
    datasets: Sequence[str] | None = None,
) -> pd.DataFrame:
    """compare.md, compare.csv and compare.png in ``out``, from the runs of ``experiment``.

    Raises ``analysis.loader.StoreError`` (one line) where there is nothing to report.
    """
    runs = load_comparison(uri, experiment, flow)
    note = left_out(load_runs(uri, [experiment]))
    if note:
        print(note)
    if datasets is not None:
        runs = runs[runs["dataset.name"].isin(list(datasets))]
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(runs)
    text = markdown(table)
    (out / "compare.md").write_text(text + "\n")
    table.to_csv(out / "compare.csv", index=False)
    order = [d for d in (datasets or sorted(runs["dataset.name"].unique()))]
    figure, drawn = comparison_figure(runs, uri, order)
    figure.savefig(out / "compare.png", dpi=90)
    print(text)
    print("compare.png: " + "; ".join(drawn))
    print(f"table and figure in {out}")
    return table
