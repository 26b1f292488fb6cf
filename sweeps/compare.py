"""FCE against the baselines it claims to beat, on the six datasets: one command, one table.

    python sweeps/compare.py --dry-run                # what it would run, and about how long
    python sweeps/compare.py                          # 6 datasets x 4 estimators x seeds 0,1,2
    python sweeps/compare.py --seeds 0 1 --datasets 8gaussians rings train.max_steps=2000
    python sweeps/compare.py --estimators mle         # add one estimator's runs to the others'
    python sweeps/compare.py --report-only            # table and figure from runs already logged

The runs are one Hydra multirun of run.py (joblib launcher, --jobs processes) in the MLflow
experiment ``compare``; before it starts, the command says how many runs and about how long
they take, from the suite's own step times (benchmarks/results/estimator_steps.json and
speed.json). Every run gets the same budget of training steps (the config's epochs /
max_steps): FCE splits it between the EBM and the flow by its threshold rule, NCE gives every
step to the EBM (against a Gaussian fitted to the data), mle every step to the EBM by exact
maximum likelihood (the ceiling of the two), flow_mle every step to the flow. The report takes,
per dataset, estimator and flow, the newest group of runs, so runs of one estimator added
later stand beside the others'; it has a row per dataset and flow in the experiment. Then
analysis/compare.py writes the table (compare.md, compare.csv) and the figure (compare.png)
to --out (default: figures/ in the working directory). Ctrl-C stops the grid and says how to
continue it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fce.compose import composition_error
from fce.config import DATASET_NAMES, ESTIMATOR_NAMES, FLOW_NAMES, total_steps
from fce.errors import fail

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks" / "results"
EXIT_INTERRUPTED = 130


class ListUntilOverride(argparse.Action):
    """A list option (``--datasets a b``) whose values stop at run.py's overrides.

    ``--datasets 8gaussians rings train.max_steps=2000``: a dataset name never holds ``=``, an
    override always does, so the override goes to run.py, not into the list.
    """

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, [v for v in values if "=" not in v])
        namespace.overrides = [*namespace.overrides, *(v for v in values if "=" in v)]


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """compare.py's own arguments, and the run.py overrides (``key=value``) among them."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Any other argument is a run.py override (key=value), applied to every run.",
    )
    parser.set_defaults(overrides=[])
    parser.add_argument(
        "--datasets", nargs="+", action=ListUntilOverride, default=list(DATASET_NAMES)
    )
    parser.add_argument("--seeds", nargs="+", action=ListUntilOverride, default=["0", "1", "2"])
    parser.add_argument(
        "--estimators", nargs="+", action=ListUntilOverride, default=list(ESTIMATOR_NAMES)
    )
    parser.add_argument("--flow", default="glow", help=f"one of {', '.join(FLOW_NAMES)}")
    parser.add_argument("--jobs", type=int, default=2, help="parallel runs (1 thread each)")
    parser.add_argument("--experiment", default="compare", help="MLflow experiment")
    parser.add_argument("--uri", default=None, help="MLflow store (default: the project's)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("figures"),
        help="folder of the report (default: figures/ in the working directory)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="skip the runs; report the logged ones"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="say what would run and about how long it takes, then stop",
    )
    args, rest = parser.parse_known_args(argv)
    overrides = [*args.overrides, *rest]
    for seed in args.seeds:
        if not seed.lstrip("-").isdigit():
            fail(f"--seeds {seed}: not an integer; seeds are integers, e.g. --seeds 0 1 2")
    args.seeds = [int(seed) for seed in args.seeds]
    if not args.datasets:
        fail(f"--datasets: no dataset given; choose from {', '.join(DATASET_NAMES)}")
    for dataset in args.datasets:
        if dataset not in DATASET_NAMES:
            fail(f"--datasets {dataset}: unknown; choose from {', '.join(DATASET_NAMES)}")
    if not args.estimators:
        fail(f"--estimators: none given; choose from {', '.join(ESTIMATOR_NAMES)}")
    for estimator in args.estimators:
        if estimator not in ESTIMATOR_NAMES:
            fail(f"--estimators {estimator}: unknown; choose from {', '.join(ESTIMATOR_NAMES)}")
    if args.flow not in FLOW_NAMES:
        fail(f"--flow {args.flow}: unknown; choose one of {', '.join(FLOW_NAMES)}")
    if args.jobs < 1 or not args.seeds:
        fail(f"--jobs {args.jobs} --seeds {args.seeds}: need jobs >= 1 and at least one seed")
    bad = [o for o in overrides if o.startswith("-") or "=" not in o]
    if bad:
        fail(f"{bad[0]}: not an option of compare.py nor a key=value override of run.py")
    # The grid's own axes: an override of one would silently replace that axis of the grid.
    axes = {"seed": "--seeds", "dataset": "--datasets", "estimator": "--estimators"}
    axes["flow"] = "--flow"
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in axes:
            fail(f"{override}: compare.py sweeps {key} itself; use {axes[key]}")
    return args, overrides


def step_ms(estimator: str, cfg, steps_json: dict, speed_json: dict) -> float:
    """Milliseconds per training step of ``estimator`` on one thread, from the benchmarks.

    FCE's step is its EBM step or its flow step in the share the default run measured;
    mle's grows with the square of its grid (``estimator.grid_cells``).
    """
    ms = steps_json["ms_per_step"]
    if estimator == "fce":
        share = speed_json["flows"]["glow"]["ebm_step_share"]
        return share * ms["fce_ebm_step"] + (1 - share) * ms["fce_flow_step"]
    if estimator == "mle":
        cells = int(cfg.estimator.grid_cells)
        measured = {int(k.rsplit("_", 1)[1]): v for k, v in ms.items() if k.startswith("mle_")}
        nearest = min(measured, key=lambda c: abs(c - cells))
        return measured[nearest] * (cells / nearest) ** 2
    return ms[f"{estimator}_step"]


def estimate(args: argparse.Namespace, overrides: list[str]) -> str:
    """How many runs, how many steps each, and about how long: a line to print."""
    from fce.compose import compose

    n_runs = len(args.datasets) * len(args.seeds) * len(args.estimators)
    grid = (
        f"{n_runs} runs ({len(args.estimators)} estimators x {len(args.datasets)} datasets x "
        f"{len(args.seeds)} seeds), {args.jobs} at a time"
    )
    paths = [BENCHMARKS / "estimator_steps.json", BENCHMARKS / "speed.json"]
    if not all(p.is_file() for p in paths):
        return f"{grid}; no time estimate ({paths[0].name} or {paths[1].name} is missing)"
    steps_json, speed_json = (json.loads(p.read_text()) for p in paths)
    start_s = speed_json["default_run"]["run_time_to_first_step_s"]
    eval_share = speed_json["flows"]["glow"]["eval_overhead"]
    seconds, steps = 0.0, set()
    for estimator in args.estimators:
        try:
            cfg = compose([f"estimator={estimator}", f"dataset={args.datasets[0]}", *overrides])
        except Exception as error:  # Hydra's override and config errors
            fail(f"{' '.join(overrides)}: {composition_error(error)}")
        n = total_steps(cfg)
        steps.add(n)
        per_run = start_s + n * step_ms(estimator, cfg, steps_json, speed_json) / 1e3 * (
            1 + eval_share
        )
        seconds += per_run * len(args.datasets) * len(args.seeds)
    minutes = seconds / args.jobs / 60
    return (
        f"{grid}, {'/'.join(map(str, sorted(steps)))} steps each: about {minutes:.0f} minutes "
        "(from benchmarks/results/estimator_steps.json and speed.json: one thread per run, "
        "Glow at the default sizes, on the machine that measured them; a busy one is slower)"
    )


def continue_command(args: argparse.Namespace, overrides: list[str], sweep: str) -> str:
    """The command that runs what the interrupted grid left undone: the estimators and the
    datasets of every cell (dataset x estimator) without all its seeds FINISHED. The report
    takes each cell's newest group, so the cells already done stand as they are."""
    from analysis.loader import load_runs

    runs = load_runs(args.uri, [args.experiment])
    done = (
        runs[(runs.get("sweep_id") == sweep) & (runs["status"] == "FINISHED")]
        if len(runs)
        else runs
    )
    seeds = done.groupby(["dataset.name", "estimator.name"])["seed"].agg(set) if len(done) else {}
    todo = [
        (d, e)
        for d in args.datasets
        for e in args.estimators
        if not set(args.seeds) <= set(seeds.get((d, e), set()))
    ]
    datasets = [d for d in args.datasets if any(d == t[0] for t in todo)]
    estimators = [e for e in args.estimators if any(e == t[1] for t in todo)]
    argv = [
        "python sweeps/compare.py",
        "--datasets", *datasets,
        "--estimators", *estimators,
        "--seeds", *map(str, args.seeds),
        "--flow", args.flow,
        "--jobs", str(args.jobs),
        "--experiment", args.experiment,
        *(["--uri", args.uri] if args.uri else []),
        "--out", str(args.out),
        *overrides,
    ]  # fmt: skip
    return " ".join(shlex.quote(a) if " " not in a else a for a in argv)


def run_grid(args: argparse.Namespace, overrides: list[str], tracking: list[str]) -> None:
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    sweep = f"multirun/compare/{stamp}"
    command = [
        sys.executable,
        str(ROOT / "run.py"),
        "-m",
        f"estimator={','.join(args.estimators)}",
        f"dataset={','.join(args.datasets)}",
        f"seed={','.join(map(str, args.seeds))}",
        f"flow={args.flow}",
        "hydra/launcher=joblib",
        f"hydra.launcher.n_jobs={args.jobs}",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra.job.num}_${dataset.name}_${estimator.name}_s${seed}",
        "progress=none",
        *tracking,
        *overrides,
    ]
    print(estimate(args, overrides), flush=True)
    print(f"run.py {' '.join(command[2:])}", flush=True)
    if args.dry_run:
        raise SystemExit(0)
    child = subprocess.Popen(command, cwd=ROOT)
    try:
        code = child.wait()
    except KeyboardInterrupt:
        # Ctrl-C in a terminal reaches the grid too; a SIGINT sent to this process alone is
        # passed on, so the runs end as an interrupted run does (marked in MLflow).
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
        try:
            child.wait()
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting for the runs to close
            child.kill()
            child.wait()
        try:
            again = continue_command(args, overrides, sweep)
        except Exception:  # the store unreadable: the whole grid again is still right
            again = "the same command"
        print(
            f"interrupted: the FINISHED runs are kept in experiment {args.experiment!r}; "
            f"continue with: {again}",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(EXIT_INTERRUPTED) from None
    if code != 0:
        raise SystemExit(code)


def main() -> None:
    try:
        report(*parse_args())
    except KeyboardInterrupt:  # before the grid started, or during the report
        print("interrupted: nothing left running; run the command again", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None


def report(args: argparse.Namespace, overrides: list[str]) -> None:
    tracking = [f"tracking.experiment={args.experiment}"]
    if args.uri:
        tracking.append(f"tracking.uri={args.uri}")
    if args.report_only and args.dry_run:
        fail("--report-only --dry-run: give one of them (a report runs nothing to dry-run)")
    if not args.report_only:
        run_grid(args, overrides, tracking)

    from analysis.compare import write_report
    from analysis.loader import StoreError

    try:
        write_report(args.uri, args.experiment, args.out, datasets=args.datasets)
    except StoreError as error:
        fail(str(error), code=1)


if __name__ == "__main__":
    main()
