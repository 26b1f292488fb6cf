"""The results tables of README.md and docs/*.md, made from what the benchmarks wrote: the
truth runs (benchmarks/results/truth_*.json, by benchmarks/truth.py) and the comparison at the
reference's settings (docs/figures/compare.{md,csv}, by sweeps/compare.py).

    python benchmarks/tables.py            # print every table
    python benchmarks/tables.py --write    # put them in README.md and docs/*.md

A rerun benchmark changes its results; this command then remakes the tables, never retyped
(tests/test_generated_docs.py fails until it has). The costs are benchmarks/costs.py's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from analysis.regions import Region, write
from analysis.truth import (
    both_models_table,
    divergences_table,
    equal_time_table,
    finals,
    first_reach,
    paired_table,
    spread,
    spread_or_inf,
    table,
)
from fce.config import DATASET_NAMES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "figures"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
COMMAND = "python benchmarks/tables.py --write"


def runs(*names: str) -> list[dict]:
    return [run for name in names for run in json.loads((RESULTS / f"{name}.json").read_text())]


def by_dataset(found: list[dict], label: str, dataset: str) -> list[dict]:
    return [r for r in found if r["label"] == label and r["dataset"] == dataset]


def truth_summary() -> str:
    """README's: each estimator's final KL on the recipe, FCE's time to 0.05 and run time."""
    found = runs("truth_fce", "truth_nce", "truth_mle")
    lines = [
        "| dataset | FCE | NCE | exact MLE | FCE: time to 0.05 | FCE: run time |",
        "|---|---|---|---|---|---|",
    ]
    for dataset in DATASET_NAMES:
        fce = by_dataset(found, "fce", dataset)
        reached = [x for x in (first_reach(r, 0.05) for r in fce) if x is not None]
        to_truth = f"{statistics.mean(s for s, _ in reached):.0f} s" if reached else "not reached"
        cells = [
            dataset,
            *(spread(finals(by_dataset(found, label, dataset))) for label in ("fce", "nce")),
            spread(finals(by_dataset(found, "mle-64", dataset))),
            f"{to_truth} ({len(reached)}/{len(fce)})",
            f"{statistics.mean(r['seconds'] for r in fce):.0f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def flows() -> str:
    """docs/truth.md's: the spline by flow-MLE against FCE's spline, and FCE's EBM."""
    found = runs("truth_fce", "truth_flow_mle")
    lines = [
        "| dataset | flow by MLE | FCE's flow | FCE's EBM |",
        "|---|---|---|---|",
    ]
    for dataset in DATASET_NAMES:
        mle = by_dataset(found, "flow_mle", dataset)
        fce = by_dataset(found, "fce", dataset)
        cells = [
            dataset,
            f"{spread(finals(mle))} ({len(mle)} seeds)",
            spread(finals(fce, "kl_data_flow")),
            spread(finals(fce, "kl_data_ebm")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


REFERENCE_STEPS = (5_000, 10_000, 20_000, 30_000, 40_000, 50_000)


def reference_timeline() -> str:
    """docs/truth.md's: the reference's 50,000-step runs at six steps, their best
    evaluation and the share of the steps the flow took."""
    head = " | ".join(f"{step // 1000}k" for step in REFERENCE_STEPS)
    lines = [
        f"| dataset | {head} | best evaluation | flow step share |",
        "|" + "---|" * (3 + len(REFERENCE_STEPS)),
    ]
    found = runs("truth_reference")
    order = {name: i for i, name in enumerate(DATASET_NAMES)}
    for run in sorted(found, key=lambda r: (order[r["dataset"]], r["seed"])):
        metric = run["metric"]
        at = {p["step"]: p.get(metric, math.nan) for p in run["timeline"]}
        best = min(p.get(metric, math.inf) for p in run["timeline"])
        cells = [
            run["dataset"],
            *(f"{at.get(step, math.nan):.3f}" for step in REFERENCE_STEPS),
            f"{best:.3f}",
            f"{run['final']['flow_step_share']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure_table(name: str):
    """A table sweeps/compare.py or analysis/figures.py wrote into docs/figures/, as it is."""
    return lambda: (FIGURES / name).read_text()


def truth_table(*names: str):
    return lambda: table(runs(*names)) + "\n"


# Issue 28's study: seeds 0-4, every estimator on the truth recipe (docs/truth.md).
STUDY = (
    "truth28_fce",
    "truth28_flow_mle",
    "truth28_both",
    "truth28_nce",
    "truth28_nce_flow",
    "truth28_nce_flow_wide",
    "truth28_nce_time",
    "truth28_both_timed",
    "truth28_mle",
)


def study_runs() -> list[dict]:
    return runs(*(name for name in STUDY if (RESULTS / f"{name}.json").exists()))


def paired(*comparisons: tuple[str, str, str]):
    """Paired tables of the study, one per (label A, label B, metric), one after another."""
    return lambda: "\n\n".join(paired_table(study_runs(), *c) for c in comparisons) + "\n"


def study_summary() -> str:
    """README's: both models of FCE, of the covering recipe and of the baselines, in both
    directions, over the study's seeds."""
    found = study_runs()
    columns = [
        ("fce", "kl_data_ebm", "FCE's EBM"),
        ("nce", "kl_data_ebm", "NCE's EBM"),
        ("mle-64", "kl_data_ebm", "MLE's EBM"),
        ("truth_both", "kl_data_ebm", "truth_both's EBM"),
        ("fce", "kl_data_flow", "FCE's flow"),
        ("flow_mle", "kl_data_flow", "flow-MLE"),
        ("fce", "kl_flow_data", "FCE's flow, KL(q‖p)"),
        ("flow_mle", "kl_flow_data", "flow-MLE, KL(q‖p)"),
    ]
    lines = [
        "| dataset | " + " | ".join(title for *_, title in columns) + " |",
        "|" + "---|" * (1 + len(columns)),
    ]
    for dataset in DATASET_NAMES:
        cells = [dataset]
        for label, metric, _ in columns:
            cells.append(spread_or_inf(finals(by_dataset(found, label, dataset), metric)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_cost() -> str:
    """Each estimator's run time and time to 0.05 nats, per dataset (``table`` of the runs
    whose times were measured side by side: two jobs on the two cores)."""
    timed = {"fce", "nce", "nce-time", "truth_both-timed"}
    return table([r for r in study_runs() if r["label"] in timed]) + "\n"


REGIONS = [
    Region(README, "truth summary", COMMAND, truth_summary),
    Region(DOCS / "truth.md", "truth", COMMAND, truth_table("truth_fce")),
    Region(
        DOCS / "truth.md",
        "truth estimators",
        COMMAND,
        truth_table("truth_fce", "truth_nce", "truth_mle"),
    ),
    Region(
        DOCS / "truth.md",
        "truth equal time",
        COMMAND,
        lambda: equal_time_table(runs("truth_fce", "truth_nce", "truth_mle"), "fce") + "\n",
    ),
    Region(DOCS / "truth.md", "truth flows", COMMAND, flows, indent="  "),
    Region(DOCS / "truth.md", "truth reference", COMMAND, truth_table("truth_reference")),
    Region(DOCS / "truth.md", "truth reference timeline", COMMAND, reference_timeline),
    Region(README, "truth28 summary", COMMAND, study_summary),
    Region(
        DOCS / "truth.md",
        "truth28 divergences",
        COMMAND,
        lambda: divergences_table(study_runs()) + "\n",
    ),
    Region(
        DOCS / "truth.md",
        "truth28 both",
        COMMAND,
        lambda: both_models_table(study_runs(), "truth_both", "flow_mle") + "\n",
    ),
    Region(
        DOCS / "truth.md",
        "truth28 paper",
        COMMAND,
        paired(
            ("fce", "flow_mle", "kl_flow_data"),
            ("fce", "flow_mle", "js_flow_data"),
            ("fce", "flow_mle", "kl_data_flow"),
        ),
    ),
    Region(
        DOCS / "truth.md",
        "truth28 baselines",
        COMMAND,
        paired(
            ("fce", "nce", "kl_data_ebm"),
            ("fce", "mle-64", "kl_data_ebm"),
            ("nce", "mle-64", "kl_data_ebm"),
            ("nce-flow", "nce", "kl_data_ebm"),
            ("nce-flow-wide", "nce", "kl_data_ebm"),
            ("truth_both", "nce", "kl_data_ebm"),
        ),
    ),
    Region(
        DOCS / "truth.md",
        "truth28 equal time",
        COMMAND,
        lambda: (
            paired_table(study_runs(), "fce", "nce-time", "kl_data_ebm")
            + "\n\n"
            + equal_time_table(
                [r for r in study_runs() if r["label"] in ("fce", "nce-time")], "fce"
            )
            + "\n"
        ),
    ),
    Region(DOCS / "truth.md", "truth28 cost", COMMAND, study_cost),
    Region(
        DOCS / "performance.md",
        "truth25 cost",
        COMMAND,
        truth_table(
            "truth25_fce",
            "truth25_fce_compiled",
            "truth25_nce",
            "truth25_nce_flow",
            "truth25_nce_flow_wide",
            "truth25_nce_flow_time",
            "truth25_nce_flow_wide_time",
        ),
    ),
    Region(DOCS / "comparison.md", "comparison", COMMAND, figure_table("compare.md")),
    Region(DOCS / "results.md", "results", COMMAND, figure_table("results.md")),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="update README.md and the docs")
    args = parser.parse_args(argv)
    if args.write:
        return write(REGIONS, "tables.py")
    for region in REGIONS:
        print(f"{region.path.relative_to(ROOT)}: {region.name}\n\n{region.make()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
