"""How close the EBM gets to the true density, and how fast: runs, timelines, tables.

    python benchmarks/truth.py --out benchmarks/results/truth.json            # experiment=truth
    python benchmarks/truth.py --datasets rings --seeds 0 --jobs 1 train.max_steps=2000
    python benchmarks/truth.py --label nce --out ... estimator=nce            # any overrides
    python benchmarks/truth.py --experiment reference --datasets rings --seeds 0 --label ref
    python benchmarks/truth.py --report benchmarks/results/truth*.json        # tables only
    python benchmarks/truth.py --report benchmarks/results/truth_*.json --equal-time fce

Every (dataset, seed) is one run of ``experiment=truth`` plus the overrides given, in its own
process with one torch thread (``--jobs`` at once: one per core), logging nowhere. Each
evaluation is recorded with the wall time since the first step (training and evaluations
both counted), so the JSON holds each run's whole timeline of ``kl_data_ebm`` (or
``kl_data_flow`` for flow_mle). The tables give, per dataset, the final KL over the seeds
(mean ± std and each seed), the wall time, and the time to truth: the wall time and step at
which the KL first reached 0.1 and 0.05 nats (mean over the seeds that reached it, "k/n"
how many did). The seeds for results are 0, 1 and 2; recipes are tuned on others (sweeps/).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import time
from pathlib import Path

from fce.config import DATASET_NAMES

TARGETS = (0.1, 0.05)


def one_run(job: tuple[str, str, int, list[str]]) -> dict:
    """Train one (dataset, seed) in this process; return its timeline and final metrics."""
    import torch

    from fce.callbacks import OnEval
    from fce.compose import compose
    from fce.config import validate
    from fce.factory import build

    experiment, dataset, seed, overrides = job
    torch.set_num_threads(1)
    cfg = compose(
        [
            f"experiment={experiment}",
            f"dataset={dataset}",
            f"seed={seed}",
            "device=cpu",
            "tracking=none",
            *overrides,
        ]
    )
    validate(cfg)
    timeline: list[dict] = []
    key = "kl_data_flow" if cfg.estimator.name == "flow_mle" else "kl_data_ebm"

    def record(step: int, metrics: dict[str, float]) -> None:
        timeline.append({"step": step, "seconds": time.perf_counter() - started, **metrics})

    trainer = build(cfg, torch.device("cpu")).trainer(callbacks=[OnEval(record)])
    # From the first step: building the data and the true density's cache are not training.
    started = time.perf_counter()
    error = None
    try:
        trainer.run()
    except Exception as exc:  # a diverged run is a result too
        error = f"{type(exc).__name__}: {exc}"
    return {
        "dataset": dataset,
        "seed": seed,
        "experiment": experiment,
        "overrides": overrides,
        "estimator": cfg.estimator.name,
        "metric": key,
        "steps": trainer.step,
        "seconds": time.perf_counter() - started,
        "eval_seconds": trainer.seconds["eval"],
        "error": error,
        "final": timeline[-1] if timeline else {},
        "timeline": timeline,
    }


def first_reach(run: dict, target: float) -> tuple[float, int] | None:
    for point in run["timeline"]:
        if point.get(run["metric"], math.inf) <= target:
            return point["seconds"], point["step"]
    return None


def table(runs: list[dict]) -> str:
    def spread(values: list[float]) -> str:
        if not values:
            return "-"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

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
        finals = [r["final"].get(r["metric"], math.nan) for r in group]
        seeds = " ".join(
            f"s{r['seed']}:{v:.3f}" + ("!" if r["error"] else "") for r, v in zip(group, finals)
        )
        cells = [
            dataset,
            label,
            spread([v for v in finals if math.isfinite(v)]),
            seeds,
            f"{statistics.mean(r['seconds'] for r in group):.0f}",
            f"{statistics.mean(r['steps'] for r in group):.0f}",
        ]
        for target in TARGETS:
            reached = [x for x in (first_reach(r, target) for r in group) if x is not None]
            if reached:
                cells.append(
                    f"{statistics.mean(s for s, _ in reached):.0f} s, "
                    f"{statistics.mean(n for _, n in reached):.0f} ({len(reached)}/{len(group)})"
                )
            else:
                cells.append(f"not reached (0/{len(group)})")
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
            finite = [v for v in values if math.isfinite(v)]
            if not finite:
                cells.append("-")
                continue
            sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
            used = statistics.mean(shares)
            note = f" (done in {used:.0%} of the time)" if used < 0.99 else ""
            cells.append(f"{statistics.mean(finite):.3f} ± {sd:.3f}{note}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="truth", help="the experiment= of every run")
    parser.add_argument("--datasets", nargs="+", default=list(DATASET_NAMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one core each")
    parser.add_argument("--label", default="fce", help="this batch's name in the tables")
    parser.add_argument(
        "--out", type=Path, help="add the runs to this JSON file (runs it holds are skipped)"
    )
    parser.add_argument("--report", nargs="+", type=Path, help="print tables of these files")
    parser.add_argument(
        "--equal-time",
        metavar="LABEL",
        help="with --report: also each label's KL at the wall time LABEL's runs took",
    )
    parser.add_argument("overrides", nargs="*", help="run overrides, as for run.py")
    args = parser.parse_args()
    if args.report:
        runs = [run for path in args.report for run in json.loads(path.read_text())]
        print(table(runs))
        if args.equal_time:
            print()
            print(equal_time_table(runs, args.equal_time))
        return
    unknown = sorted(set(args.datasets) - set(DATASET_NAMES))
    if unknown:
        parser.error(f"--datasets {unknown[0]}: choose from {', '.join(DATASET_NAMES)}")
    previous = json.loads(args.out.read_text()) if args.out and args.out.exists() else []
    done = {(r["label"], r["dataset"], r["seed"]) for r in previous}
    jobs = [
        (args.experiment, d, s, args.overrides)
        for d in args.datasets
        for s in args.seeds
        if (args.label, d, s) not in done  # a rerun continues where an interrupted one ended
    ]
    runs = []
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.jobs, maxtasksperchild=1) as pool:
        for run in pool.imap_unordered(one_run, jobs):
            run["label"] = args.label
            final = run["final"].get(run["metric"], math.nan)
            print(
                f"{run['dataset']:12s} seed {run['seed']}: {run['metric']} {final:.4f} "
                f"in {run['seconds']:.0f} s, {run['steps']} steps"
                + (f"  ({run['error']})" if run["error"] else ""),
                flush=True,
            )
            runs.append(run)
            if args.out:  # after every run, whole: an interruption loses only runs in flight
                args.out.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.out.with_suffix(".tmp")
                tmp.write_text(json.dumps(previous + runs, indent=1))
                tmp.replace(args.out)
    print(table(previous + runs if args.out else runs))


if __name__ == "__main__":
    main()
