"""Sweep scaling: Optuna trials per hour with 1 and with 2 worker processes (target: >= 1.7x).

    python benchmarks/scaling.py                          # a table
    python benchmarks/scaling.py --json                   # one JSON object
    python benchmarks/scaling.py --trials 8 train.max_steps=1000 dataset=pinwheel  # shorter
    python benchmarks/scaling.py --space threshold_lr     # the real search space

Each measurement runs the Optuna driver as a user types it,

    python sweeps/tune.py sweep=<space> sweep.n_trials=N sweep.n_jobs=K sweep.pruner=none ...

in a fresh temporary directory with a fresh Optuna storage and MLflow store, with pruning off so
that every trial runs to its last step. The same N trials are run with K = 1 and K = 2 (or the
``--workers`` given); run it on an otherwise idle machine.

- ``trials_per_hour`` = N / the driver's wall time, from launching the process to its exit:
  imports, study creation and spawning the workers are the driver's cost and are counted;
  this script's own work (writing the space, reading the storage) is not.
- From the Optuna storage: each trial's duration (start to complete) and the span from the
  first trial's start to the last one's end. ``trial_slowdown`` (mean duration with K workers
  over the mean with 1) is what running side by side costs each trial (shared caches and
  memory bandwidth, the SQLite stores); ``overhead_s`` (wall time outside that span) is the
  fixed cost, and ``ratio_in_span`` the ratio without it. Short studies pay the fixed cost
  for few trials, so use trials of at least several seconds. A spawned worker imports MLflow
  during its first trial (the single-process driver has imported it already for the parent
  run), so with K > 1 the first trial of each worker is the longer: compare the medians too.
- ``cpu_ceiling``: the same 1-thread float32 matmul loop in 1 and in K processes at once, as a
  throughput ratio. Below K, the machine does not give K cores' worth of compute (virtual
  CPUs that are hyperthreads of one core on the host, another job running), and no sweep
  can scale past it.

By default each trial is a default run (5,000 steps): what a sweep runs unless told
otherwise. Shorter trials pay the fixed cost for fewer trials, so the ratio falls below the
one within the trials' span (docs/performance.md has both).

By default the search space is one point: the keys of ``threshold_lr`` fixed at the run
config's values (a space file written to the temporary directory), so every trial does the
same work and the ratio measures scaling alone. With ``--space threshold_lr`` the trials draw
different thresholds and learning rates, whose different mixes of EBM and flow steps make
trials differ in cost.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STUDY = "scaling"

# One process of the CPU ceiling: wait for a shared start time (so that the loops of
# concurrent processes overlap, whatever their import times), then time the loop.
_MATMUL_LOOP = """
import sys, time
import torch
torch.set_num_threads(1)
a, b = torch.randn(1000, 64), torch.randn(64, 64)
for _ in range(50):
    a @ b
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
started = time.perf_counter()
for _ in range(int(sys.argv[2])):
    a @ b
print(time.perf_counter() - started)
"""


def cpu_ceiling(processes: int, repeats: int = 20_000) -> float:
    """Throughput of ``processes`` concurrent 1-thread matmul loops over that of one alone."""

    def loop_seconds(n: int) -> list[float]:
        start_at = time.time() + 6.0  # after torch's import in every process
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _MATMUL_LOOP, str(start_at), str(repeats)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(n)
        ]
        return [float(p.communicate()[0]) for p in procs]

    alone = loop_seconds(1)[0]
    together = max(loop_seconds(processes))
    return processes * alone / together


def fixed_space(base_overrides: list[str], path: Path) -> Path:
    """threshold_lr's keys, each a one-choice categorical at the run config's value."""
    from omegaconf import OmegaConf

    from fce.compose import compose

    cfg = compose(base_overrides)
    space = OmegaConf.load(ROOT / "sweeps" / "spaces" / "threshold_lr.yaml")
    params = {
        key: {"type": "categorical", "choices": [OmegaConf.select(cfg, key)]}
        for key in space.params
    }
    OmegaConf.save(
        OmegaConf.create(
            {"objective": space.objective, "direction": space.direction, "params": params}
        ),
        path,
    )
    return path


def trial_stats(storage: str) -> dict:
    """Durations of the study's trials, from the Optuna storage."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)
    done = [t for t in trials if t.datetime_start and t.datetime_complete]
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    states = [t.state.name for t in trials]
    stats = {
        "states": {s: states.count(s) for s in sorted(set(states))},
        "trial_s": durations,
    }
    if done:
        span = (
            max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
        ).total_seconds()
        stats.update(
            trial_s_mean=statistics.fmean(durations),
            trial_s_median=statistics.median(durations),
            trial_s_min=min(durations),
            trial_s_max=max(durations),
            span_s=span,
            trials_per_hour_in_span=3600 * len(done) / span if span > 0 else None,
        )
    return stats


def measure(
    workers: int, trials: int, space: str, overrides: list[str], keep: bool, sampler: str
) -> dict:
    """One study of ``trials`` trials on ``workers`` processes, in a fresh temp directory
    (kept, with the driver's log, when something fails)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"fce-scaling-{workers}w-"))
    if space == "fixed":
        run_overrides = [o for o in overrides if not o.startswith("sweep.")]
        space = str(fixed_space(run_overrides, tmp / "fixed.yaml"))
    storage = f"sqlite:///{tmp}/optuna.db"
    command = [
        sys.executable,
        str(ROOT / "sweeps" / "tune.py"),
        f"sweep={space}",
        f"sweep.n_trials={trials}",
        f"sweep.n_jobs={workers}",
        "sweep.pruner=none",
        f"sweep.sampler={sampler}",
        f"sweep.storage={storage}",
        f"sweep.study_name={STUDY}",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        *overrides,
    ]
    log_path = tmp / "driver.log"
    with open(log_path, "w") as log:
        started = time.perf_counter()
        code = subprocess.call(command, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - started
    if code != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        raise SystemExit(f"error: the driver exited with {code}; log {log_path}:\n{tail}")
    stats = trial_stats(storage)
    complete = stats["states"].get("COMPLETE", 0)
    if complete != trials:
        raise SystemExit(f"error: {complete} of {trials} trials completed; log {log_path}")
    if not keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "workers": workers,
        "trials": trials,
        "wall_s": wall,
        "trials_per_hour": 3600 * trials / wall,
        "overhead_s": wall - stats["span_s"],
        **stats,
        "command": " ".join(command[1:]),
        **({"dir": str(tmp)} if keep else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--trials", type=int, default=8, help="trials per study (default 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--space",
        default="fixed",
        help="'fixed' (one point: every trial the same work) or a space of sweeps/spaces",
    )
    parser.add_argument("--sampler", default="random", choices=["random", "tpe"])
    parser.add_argument("--no-ceiling", action="store_true", help="skip the CPU ceiling")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs and logs")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="run config and sweep.* overrides (default: none, so trials are default runs)",
    )
    args = parser.parse_args()
    if args.trials < max(args.workers):
        parser.error("--trials must be at least the largest --workers")
    overrides = list(args.overrides)

    runs = [
        measure(k, args.trials, args.space, overrides, args.keep, args.sampler)
        for k in args.workers
    ]
    report: dict = {"space": args.space, "overrides": overrides, "runs": runs}
    base = runs[0]
    for run in runs[1:]:
        k, k0 = run["workers"], base["workers"]
        report[f"ratio_{k}_vs_{k0}"] = run["trials_per_hour"] / base["trials_per_hour"]
        report[f"ratio_in_span_{k}_vs_{k0}"] = (
            run["trials_per_hour_in_span"] / base["trials_per_hour_in_span"]
        )
        report[f"trial_slowdown_{k}"] = run["trial_s_mean"] / base["trial_s_mean"]
    if not args.no_ceiling:
        report["cpu_ceiling"] = {k: cpu_ceiling(k) for k in args.workers if k > 1}
    if args.json:
        print(json.dumps(report, indent=1))
        return

    print(f"space {args.space}, {args.trials} trials, overrides: {' '.join(overrides)}")
    header = ("workers", "wall_s", "trials/h", "trial_s mean", "median", "min", "max")
    header += ("overhead_s",)
    print("".join(f"{h:>13s}" for h in header))
    for run in runs:
        cells = (
            run["trial_s_mean"],
            run["trial_s_median"],
            run["trial_s_min"],
            run["trial_s_max"],
            run["overhead_s"],
        )
        print(
            f"{run['workers']:13d}{run['wall_s']:13.1f}{run['trials_per_hour']:13.0f}"
            + "".join(f"{c:13.1f}" for c in cells)
        )
    for key, value in report.items():
        if key.startswith(("ratio_", "ratio_in_span_", "trial_slowdown_")):
            print(f"{key}: {value:.2f}")
    for k, value in report.get("cpu_ceiling", {}).items():
        print(f"cpu_ceiling ({k} processes of a 1-thread matmul loop vs 1): {value:.2f}")


if __name__ == "__main__":
    main()
