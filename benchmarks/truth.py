"""How close the EBM gets to the true density, and how fast: runs, timelines, tables.

    python benchmarks/truth.py --out benchmarks/results/truth.json            # experiment=truth
    python benchmarks/truth.py --datasets rings --seeds 0 --jobs 1 train.max_steps=2000
    python benchmarks/truth.py --label nce --out ... estimator=nce            # any overrides
    python benchmarks/truth.py --experiment reference --datasets rings --seeds 0 --label ref
    python benchmarks/truth.py --report benchmarks/results/truth*.json        # tables only
    python benchmarks/truth.py --report benchmarks/results/truth_*.json --equal-time fce
    python benchmarks/truth.py --report a.json b.json --paired fce flow_mle --metric kl_flow_data
    python benchmarks/truth.py --report benchmarks/results/truth_*.json --divergences
    python benchmarks/truth.py --label flow_mle --save-flows flows --out f.json estimator=flow_mle
    python benchmarks/truth.py --label nce_flow --noise-flows flows --out n.json estimator=nce
    python benchmarks/truth.py --label nce_time --fill-time fce.json fce --rate-from nce.json nce \
        --out t.json estimator=nce

Every (dataset, seed) is one run of ``experiment=truth`` plus the overrides given, in its own
process with one torch thread (``--jobs`` at once: one per core), logging nowhere. Each
evaluation is recorded with the wall time since the first step (training and evaluations
both counted), so the JSON holds each run's whole timeline of ``kl_data_ebm`` (or
``kl_data_flow`` for flow_mle) and the other metrics. The tables give, per dataset, the final
KL over the seeds (mean ± std and each seed), the wall time, and the time to truth: the wall
time and step at which the KL first reached 0.1 and 0.05 nats (mean over the seeds that
reached it, "k/n" how many did). The seeds for results are 0, 1 and 2; recipes are tuned on
others (sweeps/).

``--paired A B`` compares two labels seed by seed (the mean difference and its standard
error, over the seeds both ran; ``--metric`` picks the metric, by default each run's own);
``--divergences`` shows the forward and reverse KL and the JS of the EBM and the flow. A
reverse KL is inf where the model has mass and the data none: both tables count such seeds.

``--fill-time FILE LABEL`` gives each run the wall time LABEL's run of the same dataset and
seed in FILE took: ``train.max_steps`` is that time times this estimator's steps per second
in its own earlier runs (``--rate-from FILE LABEL``, e.g. its equal-steps runs), and the
learning-rate schedule follows it; each run records the time it was given
(``target_seconds``). ``train.epochs`` still caps the steps (experiment=truth: 50,000).

``--save-flows DIR`` writes each run's final state as ``DIR/<dataset>_seed<seed>.pt``, a
checkpoint as run.py writes them; ``--noise-flows DIR`` runs NCE against the flow of the same
dataset and seed there (``estimator.noise=flow estimator.noise_checkpoint=...``): NCE with
a fixed flow that flow_mle pre-trained.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from analysis.truth import divergences_table, equal_time_table, paired_table, table
from fce.config import DATASET_NAMES
from fce.names import EVAL_METRICS


def flow_file(directory: Path, dataset: str, seed: int) -> Path:
    return directory / f"{dataset}_seed{seed}.pt"


def save_flow(trainer, cfg, path: Path) -> None:
    """The trainer's state (its flow among it) as a checkpoint at ``path``, as run.py writes
    them, so that ``estimator.noise_checkpoint`` reads it: written by fce.checkpoint in a
    scratch folder beside ``path``, then renamed over it (atomic)."""
    from omegaconf import OmegaConf

    from fce import checkpoint

    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.stem}."))
    try:
        state = {
            "trainer": trainer.state_dict(),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        os.replace(checkpoint.save(state, scratch, trainer.step), path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def one_run(job: tuple[str, str, int, list[str], str | None]) -> dict:
    """Train one (dataset, seed) in this process; return its timeline and final metrics (and
    save its flow where the job names a file)."""
    import torch

    from fce.callbacks import OnEval
    from fce.compose import compose
    from fce.config import validate
    from fce.factory import build

    experiment, dataset, seed, overrides, flow_path = job
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
    seconds = time.perf_counter() - started
    saved = {}
    if flow_path is not None:  # a failed run's flow is no noise to contrast with
        if error is None:
            save_flow(trainer, cfg, Path(flow_path))
        saved["flow_file"] = flow_path if error is None else None
    return {
        "dataset": dataset,
        "seed": seed,
        "experiment": experiment,
        "overrides": overrides,
        "estimator": cfg.estimator.name,
        "metric": key,
        "steps": trainer.step,
        "seconds": seconds,
        "eval_seconds": trainer.seconds["eval"],
        "error": error,
        "final": timeline[-1] if timeline else {},
        "timeline": timeline,
        **saved,
    }


def labelled(
    parser: argparse.ArgumentParser, option: str, given: list[str]
) -> dict[tuple[str, int], dict]:
    """The runs labelled LABEL in FILE (``given``), by (dataset, seed)."""
    path, label = Path(given[0]), given[1]
    if not path.is_file():
        parser.error(f"{option} {path}: no such file")
    runs = json.loads(path.read_text())
    found = {(r["dataset"], r["seed"]): r for r in runs if r["label"] == label}
    if not found:
        parser.error(f"{option} {path} {label}: no run labelled {label} there")
    return found


def fill_steps(
    parser: argparse.ArgumentParser, args: argparse.Namespace, pending: list[tuple[str, int]]
) -> dict[tuple[str, int], tuple[int, float]]:
    """Per (dataset, seed): the steps this estimator takes in the wall time of ``--fill-time``'s
    run, at the steps per second of its own ``--rate-from`` run, and that time."""
    if not args.rate_from:
        parser.error("--fill-time needs --rate-from FILE LABEL: this estimator's own runs")
    budgets = labelled(parser, "--fill-time", args.fill_time)
    rates = labelled(parser, "--rate-from", args.rate_from)
    filled = {}
    for key in pending:
        for option, given, found in (
            ("--fill-time", args.fill_time, budgets),
            ("--rate-from", args.rate_from, rates),
        ):
            if key not in found:
                parser.error(f"{option} {' '.join(given)}: no run of {key[0]} seed {key[1]} there")
        budget, own = budgets[key], rates[key]
        if budget["error"]:
            parser.error(
                f"--fill-time {' '.join(args.fill_time)}: its run of {key[0]} seed {key[1]} "
                f"failed ({budget['error']}); its wall time is no budget"
            )
        steps = max(1, round(budget["seconds"] * own["steps"] / own["seconds"]))
        filled[key] = steps, budget["seconds"]
    return filled


def report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The tables of ``--report``'s files."""
    runs = []
    for path in args.report:
        found = json.loads(path.read_text())
        if not isinstance(found, list):
            parser.error(f"--report {path}: not a list of runs as benchmarks/truth.py writes them")
        runs += found
    labels = sorted({r["label"] for r in runs})
    for label in args.paired or []:
        if label not in labels:
            parser.error(
                f"--paired {label}: no run has that label; labels there: {', '.join(labels)}"
            )
    print(table(runs))
    if args.equal_time:
        print()
        print(equal_time_table(runs, args.equal_time))
    if args.divergences:
        print()
        print(divergences_table(runs))
    if args.paired:
        print()
        print(paired_table(runs, *args.paired, args.metric))


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
    parser.add_argument(
        "--paired",
        nargs=2,
        metavar=("A", "B"),
        help="with --report: label A against label B, seed by seed (mean difference, its SE)",
    )
    parser.add_argument(
        "--metric", help="with --paired: the metric compared (default: each run's own)"
    )
    parser.add_argument(
        "--divergences",
        action="store_true",
        help="with --report: also the forward and reverse KL and the JS of the EBM and the flow",
    )
    parser.add_argument(
        "--fill-time",
        nargs=2,
        metavar=("FILE", "LABEL"),
        help="run each dataset and seed for the wall time LABEL's run of it in FILE took",
    )
    parser.add_argument(
        "--rate-from",
        nargs=2,
        metavar=("FILE", "LABEL"),
        help="with --fill-time: this estimator's own runs, whose steps per second set the steps",
    )
    parser.add_argument(
        "--save-flows",
        type=Path,
        metavar="DIR",
        help="write each run's state as DIR/<dataset>_seed<seed>.pt (a noise_checkpoint)",
    )
    parser.add_argument(
        "--noise-flows",
        type=Path,
        metavar="DIR",
        help="contrast with DIR/<dataset>_seed<seed>.pt, as --save-flows wrote it (NCE)",
    )
    parser.add_argument("overrides", nargs="*", help="run overrides, as for run.py")
    args = parser.parse_args()
    for option, given in (("--paired", args.paired), ("--divergences", args.divergences)):
        if given and not args.report:
            parser.error(f"{option}: only with --report FILES")
    if args.metric and not args.paired:
        parser.error("--metric: only with --paired A B")
    if args.metric and args.metric not in EVAL_METRICS:
        parser.error(f"--metric {args.metric}: choose from {', '.join(EVAL_METRICS)}")
    if args.rate_from and not args.fill_time:
        parser.error("--rate-from: only with --fill-time FILE LABEL")
    if args.report:
        report(parser, args)
        return
    unknown = sorted(set(args.datasets) - set(DATASET_NAMES))
    if unknown:
        parser.error(f"--datasets {unknown[0]}: choose from {', '.join(DATASET_NAMES)}")
    owned = {"train.max_steps": "--fill-time"} if args.fill_time else {}
    if args.noise_flows:
        owned |= {
            "estimator.noise": "--noise-flows",
            "estimator.noise_checkpoint": "--noise-flows",
        }
    for override in args.overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in owned:
            parser.error(f"{override}: {owned[key]} sets {key} for each run; leave it out")
    previous = json.loads(args.out.read_text()) if args.out and args.out.exists() else []
    done = {(r["label"], r["dataset"], r["seed"]) for r in previous}
    pending = [
        (d, s)
        for d in args.datasets
        for s in args.seeds
        if (args.label, d, s) not in done  # a rerun continues where an interrupted one ended
    ]
    filled = fill_steps(parser, args, pending) if args.fill_time else {}
    if args.noise_flows:
        for d, s in pending:
            if not (path := flow_file(args.noise_flows, d, s)).is_file():
                parser.error(
                    f"--noise-flows {args.noise_flows}: no {path.name} there (write it with "
                    f"--save-flows, e.g. estimator=flow_mle on {d} seed {s})"
                )
    if args.save_flows:
        try:
            args.save_flows.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            parser.error(f"--save-flows {args.save_flows}: cannot write there ({error.strerror})")

    def job(dataset: str, seed: int) -> tuple[str, str, int, list[str], str | None]:
        overrides = list(args.overrides)
        if (dataset, seed) in filled:
            overrides.append(f"train.max_steps={filled[dataset, seed][0]}")
        if args.noise_flows:
            noise = flow_file(args.noise_flows, dataset, seed).resolve()
            overrides += ["estimator.noise=flow", f"estimator.noise_checkpoint={noise}"]
        save = flow_file(args.save_flows, dataset, seed).resolve() if args.save_flows else None
        return args.experiment, dataset, seed, overrides, str(save) if save else None

    jobs = [job(d, s) for d, s in pending]
    runs = []
    context = multiprocessing.get_context("spawn")
    # A kill (SIGTERM) of this process ends its runs too: raised here as SystemExit, it leaves
    # the pool's ``with``, which terminates the workers (else they would train on, orphaned).
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    with context.Pool(args.jobs, maxtasksperchild=1) as pool:
        for run in pool.imap_unordered(one_run, jobs):
            run["label"] = args.label
            final = run["final"].get(run["metric"], math.nan)
            notes = [run["error"]] if run["error"] else []
            if (run["dataset"], run["seed"]) in filled:
                steps, run["target_seconds"] = filled[run["dataset"], run["seed"]]
                notes.append(f"target {run['target_seconds']:.0f} s, {steps} steps")
                if run["steps"] < steps and not run["error"]:
                    notes.append("fewer steps: train.epochs capped them")
            if "flow_file" in run and run["flow_file"] is None:
                notes.append("flow not saved: the run failed")
            print(
                f"{run['dataset']:12s} seed {run['seed']}: {run['metric']} {final:.4f} "
                f"in {run['seconds']:.0f} s, {run['steps']} steps"
                + (f"  ({'; '.join(notes)})" if notes else ""),
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
