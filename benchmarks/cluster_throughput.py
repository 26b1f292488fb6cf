"""Trial throughput of one Optuna study with 1, 2 and 4 workers, on PostgreSQL and on SQLite.

    make cluster-up                                   # PostgreSQL + the MLflow tracking server
    python benchmarks/cluster_throughput.py           # a table; JSON in benchmarks/results/
    python benchmarks/cluster_throughput.py --workers 1 2 --trials 4 train.max_steps=1000

Each measurement runs the driver as a user types it,

    python sweeps/tune.py sweep=threshold_lr sweep.n_trials=N sweep.n_jobs=K sweep.pruner=none ...

with a fresh study each time:

- ``postgres``: the study in the cluster's PostgreSQL (``$FCE_OPTUNA_STORAGE``), the runs logged
  to its tracking server (``$FCE_TRACKING_URI``): what several machines share;
- ``sqlite``: the study and the MLflow store in SQLite files in a temp directory: one machine.

``trials_per_min`` = N / the driver's wall time from launch to exit (imports, study creation,
worker start-up included); ``trial_s`` is the median trial duration from the Optuna storage.
Workers beyond the machine's cores share them: on a 2-core machine 4 workers cannot beat 2.
The load average before and after is recorded: other work on the machine skews every number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Small trials, so that the storage's share of the cost shows (a default run is 5,000 steps).
DEFAULT_OVERRIDES = ["train.max_steps=500", "train.eval_every=100", "train.plot_every=500"]


def cluster_env(state: Path) -> dict[str, str]:
    env_file = state / "env"
    if not env_file.is_file():
        raise SystemExit(f"error: no cluster at {state} (no env file); run `make cluster-up`")
    values = {}
    for line in env_file.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            values[key] = value
    return values


def measure(backend: str, workers: int, trials: int, overrides: list[str], env: dict) -> dict:
    study = f"throughput-{backend}-{workers}w-{uuid.uuid4().hex[:6]}"
    tmp = Path(tempfile.mkdtemp(prefix=f"fce-{study}-"))
    if backend == "postgres":
        storage, tracking = env["FCE_OPTUNA_STORAGE"], env["FCE_TRACKING_URI"]
    else:
        storage, tracking = f"sqlite:///{tmp}/optuna.db", f"sqlite:///{tmp}/mlflow.db"
    command = [
        sys.executable,
        str(ROOT / "sweeps" / "tune.py"),
        "sweep=threshold_lr",
        f"sweep.n_trials={trials}",
        f"sweep.n_jobs={workers}",
        "sweep.pruner=none",
        f"sweep.storage={storage}",
        f"sweep.study_name={study}",
        f"tracking.uri={tracking}",
        f"tracking.experiment={study}",
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
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    durations = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in done
        if t.state.name == "COMPLETE"
    ]
    if len(durations) != trials:
        raise SystemExit(f"error: {len(durations)} of {trials} trials completed; log {log_path}")
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "backend": backend,
        "workers": workers,
        "trials": trials,
        "wall_s": round(wall, 2),
        "trials_per_min": round(60 * trials / wall, 2),
        "trial_s_median": round(statistics.median(durations), 2),
        "study": study,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--backends", nargs="+", default=["postgres", "sqlite"])
    parser.add_argument(
        "--cluster-dir", default=os.environ.get("FCE_CLUSTER_DIR", ROOT / ".cluster")
    )
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "cluster_throughput.json")
    )
    args, overrides = parser.parse_known_args(argv)
    for backend in args.backends:
        if backend not in ("postgres", "sqlite"):
            parser.error(f"--backends {backend}: choose postgres and/or sqlite")
    if min(args.workers) < 1 or args.trials < 1:
        parser.error(f"--workers {args.workers} --trials {args.trials}: must be >= 1")
    env = cluster_env(Path(args.cluster_dir)) if "postgres" in args.backends else {}
    overrides = overrides or DEFAULT_OVERRIDES
    load_before = os.getloadavg()
    rows = []
    for backend in args.backends:
        for workers in args.workers:
            row = measure(backend, workers, args.trials, overrides, env)
            print(
                f"{backend:8s} {workers} worker(s): {row['trials_per_min']:6.2f} trials/min, "
                f"median trial {row['trial_s_median']:.1f}s, wall {row['wall_s']:.0f}s",
                flush=True,
            )
            rows.append(row)
    report = {
        "command": "python benchmarks/cluster_throughput.py " + " ".join(argv),
        "overrides": overrides,
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("| backend | workers | trials/min | median trial (s) | wall (s) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['backend']} | {row['workers']} | {row['trials_per_min']:.2f} | "
            f"{row['trial_s_median']:.1f} | {row['wall_s']:.0f} |"
        )
    print(
        f"load average before {report['load_average_before']}, after "
        f"{report['load_average_after']}; JSON in {args.out}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
