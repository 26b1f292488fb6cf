"""The tables of benchmarks/truth.py's results: per dataset and label, the final KL over the
seeds, the wall time and the time to truth; each label's KL at another label's wall time.

A run is one (dataset, seed) as benchmarks/truth.py records it: its final metrics, the
metric it is scored by, and its timeline of evaluations (step, seconds since the first
step, metrics).
"""

from __future__ import annotations

import math
import statistics

from fce.config import DATASET_NAMES

TARGETS = (0.1, 0.05)


def first_reach(run: dict, target: float) -> tuple[float, int] | None:
    for point in run["timeline"]:
        if point.get(run["metric"], math.inf) <= target:
            return point["seconds"], point["step"]
    return None


def spread(values: list[float]) -> str:
    """``mean ± std`` of the finite values, to three decimals; "-" for none."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def finals(group: list[dict], metric: str | None = None) -> list[float]:
    """Each run's final value of ``metric`` (default: the run's own), NaN where it has none."""
    return [r["final"].get(metric or r["metric"], math.nan) for r in group]


def time_to(group: list[dict], target: float) -> str:
    """The mean wall time and step at which the runs first reached ``target``, and how many
    did (k/n)."""
    reached = [x for x in (first_reach(r, target) for r in group) if x is not None]
    if not reached:
        return f"not reached (0/{len(group)})"
    return (
        f"{statistics.mean(s for s, _ in reached):.0f} s, "
        f"{statistics.mean(n for _, n in reached):.0f} ({len(reached)}/{len(group)})"
    )


def table(runs: list[dict]) -> str:
    head = "| dataset | label | KL final, mean ± std | per seed | wall s | steps |"
    head += "".join(f" to {t} (s, steps) |" for t in TARGETS)
    lines = [head, "|" + "---|" * (6 + len(TARGETS))]
    keyed: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        keyed.setdefault((run["dataset"], run.get("label", "")), []).append(run)
    order = {name: i for i, name in enumerate(DATASET_NAMES)}
    for (dataset, label), group in sorted(
        keyed.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])
    ):
        group.sort(key=lambda r: r["seed"])
        values = finals(group)
        seeds = " ".join(
            f"s{r['seed']}:{v:.3f}" + ("!" if r["error"] else "") for r, v in zip(group, values)
        )
        cells = [
            dataset,
            label,
            spread(values),
            seeds,
            f"{statistics.mean(r['seconds'] for r in group):.0f}",
            f"{statistics.mean(r['steps'] for r in group):.0f}",
            *(time_to(group, target) for target in TARGETS),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def at_time(run: dict, seconds: float) -> float:
    """The run's KL at its last evaluation within ``seconds`` of its first step."""
    within = [p for p in run["timeline"] if p["seconds"] <= seconds]
    return within[-1][run["metric"]] if within else math.nan


def equal_time_table(runs: list[dict], base: str) -> str:
    """Each label's KL when the ``base`` label's run of the same dataset and seed ended.

    A run that ended sooner (a cheaper step) is shown at its end, marked with the share of the
    base's time it used: it had time to spare, so its number understates it at equal time.
    """
    by_key = {(r["label"], r["dataset"], r["seed"]): r for r in runs}
    labels = sorted({r["label"] for r in runs} - {base})
    lines = [
        f"| dataset | {base} (s) | " + " | ".join(labels) + " |",
        "|" + "---|" * (2 + len(labels)),
    ]
    for dataset in DATASET_NAMES:
        bases = [r for r in runs if r["label"] == base and r["dataset"] == dataset]
        if not bases:
            continue
        budget = statistics.mean(r["seconds"] for r in bases)
        cells = [dataset, f"{budget:.0f}"]
        for label in labels:
            values, shares = [], []
            for b in bases:
                other = by_key.get((label, dataset, b["seed"]))
                if other is None:
                    continue
                values.append(at_time(other, b["seconds"]))
                shares.append(min(other["seconds"] / b["seconds"], 1.0))
            if not any(math.isfinite(v) for v in values):
                cells.append("-")
                continue
            used = statistics.mean(shares)
            note = f" (done in {used:.0%} of the time)" if used < 0.99 else ""
            cells.append(spread(values) + note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
