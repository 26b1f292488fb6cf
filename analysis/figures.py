"""Regenerate the README's figures and table from logged runs.

    python run.py -m hydra/launcher=joblib dataset=8gaussians,pinwheel,2spirals flow=glow,maf \
        seed=0,1,2 tracking.experiment=readme
    python analysis/figures.py --experiment readme            # -> docs/figures/

Writes ``fce-glow.png`` and ``fce-maf.png`` (rows 8gaussians, pinwheel, 2spirals; columns
Data | Flow | EBM, as the reference's figure, from each run's final checkpoint),
``curves-8gaussians.png`` (mse_logp, value and accuracy, Glow vs MAF, mean over seeds) and
``results.md`` (final metrics, mean ± std over the seeds of each group of repeats: runs of one
sweep that differ by the seed alone, ``n`` of them; see analysis/loader.py).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.loader import (
    ROOT,
    _client,
    aggregate,
    format_table,
    load_history,
    load_runs,
    newest_group,
    repeats,
)

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

PANEL_DATASETS = ("8gaussians", "pinwheel", "2spirals")
FLOW_TITLES = {"glow": "Glow", "maf": "MAF"}
# The README's columns (nll_data is the oracle table's; mse_logp_centered tracks mse_logp).
TABLE_METRICS = (
    "nll_ebm",
    "kl_data_ebm",
    "kl_data_flow",
    "tv_ebm",
    "mse_logp",
    "logz_gap",
    "flow_step_share",
)


CHECKPOINT = re.compile(r"step_(\d+)\.pt$")


def final_checkpoint(paths: list[str]) -> str:
    """The checkpoint artifact of the highest step: a finished run resumed for more steps
    logged one at each end."""
    steps = {int(m.group(1)): path for path in paths if (m := CHECKPOINT.search(path))}
    if not steps:
        raise ValueError(f"no checkpoints/step_<N>.pt artifact among {sorted(paths)}")
    return steps[max(steps)]


@functools.cache  # panels and --reevaluate need the same runs
def load_trainer(run_id: str, uri: str | None):
    """A run's models, data and evaluator, rebuilt from its final checkpoint artifact."""
    import torch
    from omegaconf import OmegaConf

    from fce.config import upgrade
    from fce.factory import build_trainer

    client = _client(uri)
    artifact = final_checkpoint([a.path for a in client.list_artifacts(run_id, "checkpoints")])
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, artifact, tmp)
        state = torch.load(path, map_location="cpu", weights_only=True)
    trainer = build_trainer(upgrade(OmegaConf.create(state["config"])), torch.device("cpu"))
    trainer.load_state_dict(state["trainer"])
    return trainer


def panel_row(run_id: str, uri: str | None):
    """One Data | Flow | EBM row from a run's final models."""
    from fce.callbacks import PANEL_SAMPLES
    from fce.plots import PanelRow

    trainer = load_trainer(run_id, uri)
    log_q, log_p = trainer.evaluator.grid_log_densities(trainer.evaluated_ebm, trainer.flow)
    return PanelRow(trainer.evaluator.dataset.name, trainer.data[:PANEL_SAMPLES], log_q, log_p)


def reevaluate(runs: pd.DataFrame, uri: str | None) -> pd.DataFrame:
    """Final metrics recomputed from each run's final checkpoint with today's evaluator.

    Runs logged before a metric existed (or with another eval setting) get every metric, on
    the same held-out points; the logged values stay in MLflow as they were.
    """
    rows = []
    for run_id in runs["run_id"]:
        trainer = load_trainer(run_id, uri)
        metrics = trainer.metrics()
        rows.append({"run_id": run_id, **metrics, "flow_step_share": trainer.flow_step_share})
    fresh = pd.DataFrame(rows)
    keep = [c for c in runs.columns if c not in fresh.columns or c == "run_id"]
    return runs[keep].merge(fresh, on="run_id")


def reference_figure(runs: pd.DataFrame, flow: str, uri: str | None) -> Figure | None:
    """Data | Flow | EBM rows, each from the lowest seed of the newest group of repeats."""
    from fce.plots import density_panel

    runs = newest_group(runs, ["dataset.name", "flow.name"])
    rows = []
    for dataset in PANEL_DATASETS:
        match = runs[(runs["dataset.name"] == dataset) & (runs["flow.name"] == flow)]
        if len(match):
            rows.append(panel_row(match.sort_values("seed").iloc[0]["run_id"], uri))
    if not rows:
        return None
    title = FLOW_TITLES[flow]
    return density_panel(rows, flow_title=f"{title} (FCE)", ebm_title="EBM (FCE)")


def curves_figure(runs: pd.DataFrame, uri: str | None, dataset: str = "8gaussians") -> Figure:
    """mse_logp, value and accuracy over steps, Glow vs MAF, mean over seeds (band: min-max).

    Each flow's curve is from the newest group of repeats (runs that differ by seed alone).
    """
    runs = newest_group(runs, ["dataset.name", "flow.name"])
    chosen = runs[runs["dataset.name"] == dataset]
    history = load_history(chosen["run_id"], ("mse_logp", "value", "acc"), uri)
    history = history.merge(chosen[["run_id", "flow.name", "seed"]], on="run_id")
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, metric in zip(axes, ("mse_logp", "value", "acc")):
        for k, (flow, part) in enumerate(history[history.metric == metric].groupby("flow.name")):
            wide = part.pivot_table(index="step", columns="seed", values="value")
            if metric != "mse_logp":  # per-step signals: a running mean of 100 steps
                wide = wide.rolling(100, min_periods=1).mean()
            mean = wide.mean(axis=1)
            ax.plot(
                mean.index,
                mean.values,
                color=f"C{k}",
                label=f"{FLOW_TITLES[flow]} ({wide.shape[1]} seeds)",
            )
            ax.fill_between(
                wide.index, wide.min(axis=1), wide.max(axis=1), color=f"C{k}", alpha=0.2
            )
        if metric == "mse_logp":
            ax.set_yscale("log")
            ax.axhline(0.05, color="grey", ls="--", lw=0.8, label="0.05")
        if metric == "value":
            ax.axhline(2 * np.log(0.5), color="grey", ls="--", lw=0.8, label="2 log 1/2")
            ax.set_ylim(-1.6, -1.2)  # the first steps start far below; the game is up here
        if metric == "acc":
            ax.axhline(0.6, color="grey", ls="--", lw=0.8, label="threshold")
        ax.set_title(f"{metric} on {dataset}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "---|" * len(table.columns)
    rows = ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def results_table(runs: pd.DataFrame) -> str:
    return markdown(format_table(aggregate(runs), TABLE_METRICS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or the project's)"
    )
    parser.add_argument("--experiment", default="fce")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument(
        "--reevaluate",
        action="store_true",
        help="recompute the table's metrics from each run's final checkpoint (all metrics of "
        "today's evaluator) instead of reading the logged ones",
    )
    args = parser.parse_args()
    runs = load_runs(args.uri, [args.experiment])
    runs = repeats(runs[runs["status"] == "FINISHED"]) if len(runs) else runs
    if not len(runs):
        raise SystemExit(f"error: no FINISHED run in experiment {args.experiment!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    for flow in ("glow", "maf"):
        figure = reference_figure(runs, flow, args.uri)
        if figure is not None:
            figure.savefig(args.out / f"fce-{flow}.png", dpi=110)
    curves_figure(runs, args.uri).savefig(args.out / "curves-8gaussians.png", dpi=110)
    table = results_table(reevaluate(runs, args.uri) if args.reevaluate else runs)
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    print(f"figures and table in {args.out}")


if __name__ == "__main__":
    main()
