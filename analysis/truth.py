"""The tables of benchmarks/truth.py's results: per dataset and label, the final KL over the
seeds, the wall time and the time to truth; each label's KL at another label's wall time;
both directions of the KL and the JS of the EBM and the flow; one label against another on
the seeds both ran (paired).

A run is one (dataset, seed) as benchmarks/truth.py records it: its final metrics, the
metric it is scored by, and its timeline of evaluations (step, seconds since the first
step, metrics). Every divergence here is lower-is-better. A reverse KL (``kl_ebm_data``,
``kl_flow_data``) is +inf where the model puts mass where the data has no density
(checkerboard's empty squares): such a value is shown as inf and counted, never averaged
into a finite number nor dropped.
"""

from __future__ import annotations

import math
import statistics

from fce.config import DATASET_NAMES

TARGETS = (0.1, 0.05)
# The divergences table's columns: forward KL(data || model), reverse KL(model || data) and
# the bounded Jensen-Shannon, of the EBM and of the flow.
DIVERGENCES = (
    "kl_data_ebm",
    "kl_ebm_data",
    "js_ebm_data",
    "kl_data_flow",
    "kl_flow_data",
    "js_flow_data",
)


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


def groups(runs: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """The runs of each dataset and label, by seed; datasets in their usual order."""
    keyed: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        keyed.setdefault((run["dataset"], run.get("label", "")), []).append(run)
    order = {name: i for i, name in enumerate(DATASET_NAMES)}
    return [
        (dataset, label, sorted(group, key=lambda r: r["seed"]))
        for (dataset, label), group in sorted(
            keyed.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])
        )
    ]


def table(runs: list[dict]) -> str:
    head = "| dataset | label | KL final, mean ± std | per seed | wall s | steps |"
    head += "".join(f" to {t} (s, steps) |" for t in TARGETS)
    lines = [head, "|" + "---|" * (6 + len(TARGETS))]
    for dataset, label, group in groups(runs):
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


def spread_or_inf(values: list[float]) -> str:
    """``mean ± std`` over the seeds with a value; where k of them are inf, "inf on k/n" and
    the spread of the others: an inf is never averaged into a number nor left out."""
    present = [v for v in values if not math.isnan(v)]
    infinite = sum(math.isinf(v) for v in present)
    if not infinite:
        return spread(present)
    others = spread(present)  # spread() keeps the finite values
    return f"inf on {infinite}/{len(present)}" + ("" if others == "-" else f"; others {others}")


def divergences_table(runs: list[dict], metrics: tuple[str, ...] = DIVERGENCES) -> str:
    """Per dataset and label, each metric's final value over the seeds (``spread_or_inf``);
    "-" where the runs log none (flow_mle trains no EBM, mle no flow, older runs no reverse
    KL)."""
    lines = [
        "| dataset | label | seeds | " + " | ".join(metrics) + " |",
        "|" + "---|" * (3 + len(metrics)),
    ]
    for dataset, label, group in groups(runs):
        cells = [dataset, label, str(len(group))]
        cells += [spread_or_inf(finals(group, metric)) for metric in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_means(values: list[tuple[float, float]]) -> tuple[float, float, float, float]:
    """Means of A and B, the mean of the differences A - B and its standard error (std of
    the differences / sqrt(n); NaN under two pairs), over finite pairs."""
    diffs = [x - y for x, y in values]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return (
        statistics.mean(x for x, _ in values),
        statistics.mean(y for _, y in values),
        statistics.mean(diffs),
        se,
    )


def verdict(diff: float, se: float, n: int, a: str, b: str) -> str:
    """Lower is better: "<a> better" or "<b> better" where the mean difference is more than
    twice its standard error, else "tie"; "-" under two pairs (no standard error)."""
    if n < 2:
        return "-"
    if abs(diff) <= 2 * se:
        return "tie"
    return f"{a} better" if diff < 0 else f"{b} better"


def paired_table(runs: list[dict], a: str, b: str, metric: str | None = None) -> str:
    """Label ``a`` against label ``b`` on each (dataset, seed) both ran, scored by ``metric``
    (default: each run's own, e.g. the EBM's KL for FCE and the flow's for flow_mle).

    Seeds pair the runs (the same training draw and initialisation), so the standard error is
    the differences' own, not that of two independent means. Means, difference and verdict
    are over the pairs finite in both; a pair with inf in either is counted in its column.
    """
    by_key = {(r["label"], r["dataset"], r["seed"]): r for r in runs}
    lines = [
        f"| dataset | metric | pairs | finite pairs | inf: {a}, {b} | {a} | {b} | "
        f"{a} - {b} (SE) | {a} lower on | verdict |",
        "|" + "---|" * 10,
    ]
    for dataset in DATASET_NAMES:
        seeds = sorted(
            s for (label, d, s) in by_key if (label, d) == (a, dataset) and (b, d, s) in by_key
        )
        if not seeds:
            continue
        pairs = [(by_key[a, dataset, s], by_key[b, dataset, s]) for s in seeds]
        names = dict.fromkeys(metric or r["metric"] for r in pairs[0])  # a's, then b's
        values = [tuple(finals([ra, rb], metric)) for ra, rb in pairs]
        finite = [(x, y) for x, y in values if math.isfinite(x) and math.isfinite(y)]
        cells = [
            dataset,
            " / ".join(names),
            str(len(pairs)),
            str(len(finite)),
            f"{sum(math.isinf(x) for x, _ in values)}, {sum(math.isinf(y) for _, y in values)}",
        ]
        if finite:
            mean_a, mean_b, diff, se = paired_means(finite)
            lower = sum(x < y for x, y in finite)
            cells += [
                f"{mean_a:.3f}",
                f"{mean_b:.3f}",
                f"{diff:+.3f} (SE {se:.3f})" if math.isfinite(se) else f"{diff:+.3f}",
                f"{lower}/{len(finite)}",
                verdict(diff, se, len(finite), a, b),
            ]
        else:
            cells += ["-"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        f"Lower is better. Means, {a} - {b}, its standard error (std of the per-seed "
        f"differences / sqrt(n)) and the verdict (a difference over 2 SE, n >= 2) are over the "
        "pairs finite in both; a pair with inf (mass where the data has none) is counted in "
        "'inf', not averaged; a pair without a value (a run that logged none) in neither."
    )
    return "\n".join(lines) + "\n\n" + note


def both_models_table(
    runs: list[dict], label: str, flow_label: str, ebm_bar: float = 0.05, flow_bar: float = 0.02
) -> str:
    """Issue 28's bar for one run giving both models, per dataset over the seeds ``label``
    and ``flow_label`` (the flow trained alone by maximum likelihood) both ran: the EBM's
    ``kl_data_ebm`` at most ``ebm_bar`` on each seed, and the run's own flow's
    ``kl_data_flow`` at most ``flow_bar`` above flow-MLE's of the same seed."""
    by_key = {(r["label"], r["dataset"], r["seed"]): r for r in runs}
    lines = [
        f"| dataset | seeds | EBM kl_data_ebm, per seed | EBM <= {ebm_bar} | flow "
        f"kl_data_flow | flow-MLE's | worst flow - flow-MLE | flow within {flow_bar} | "
        "longest run |",
        "|" + "---|" * 9,
    ]
    for dataset in DATASET_NAMES:
        seeds = sorted(
            s
            for (name, d, s) in by_key
            if (name, d) == (label, dataset) and (flow_label, d, s) in by_key
        )
        if not seeds:
            continue
        mine = [by_key[label, dataset, s] for s in seeds]
        alone = [by_key[flow_label, dataset, s] for s in seeds]
        ebm = finals(mine, "kl_data_ebm")
        flow, flow_mle = finals(mine, "kl_data_flow"), finals(alone, "kl_data_flow")
        gaps = [f - m for f, m in zip(flow, flow_mle, strict=True)]
        cells = [
            dataset,
            str(len(seeds)),
            " ".join(f"s{s}:{v:.3f}" for s, v in zip(seeds, ebm, strict=True)),
            f"{sum(v <= ebm_bar for v in ebm)}/{len(ebm)}",
            spread(flow),
            spread(flow_mle),
            f"{max(gaps):+.4f}",
            f"{sum(g <= flow_bar for g in gaps)}/{len(gaps)}",
            f"{max(r['seconds'] for r in mine):.0f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
