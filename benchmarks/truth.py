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
import time
from pathlib import Path

from analysis.truth import equal_time_table, table
from fce.config import DATASET_NAMES


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
