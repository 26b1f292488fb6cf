"""Whole runs as a user types them, eager and compiled, side by side: `train.compile`'s worth.

    python benchmarks/whole_run.py --out benchmarks/results/whole_run_truth.json
    python benchmarks/whole_run.py --datasets rings --seeds 0 estimator=nce estimator.noise=flow
    python benchmarks/whole_run.py --report benchmarks/results/whole_run_truth.json
    python benchmarks/whole_run.py --report benchmarks/results/whole_run_truth.json --write

For each (dataset, seed), three runs of ``python run.py experiment=truth dataset=D seed=S
tracking=none`` plus the overrides given, one after the other, each in its own process with
one torch thread:

- ``eager``: ``train.compile=false``;
- ``cold``: ``train.compile=true`` with a new, empty inductor cache (``TORCHINDUCTOR_CACHE_DIR``
  a fresh directory): the first run on a machine, or a sweep's first trial;
- ``warm``: ``train.compile=true`` again, with the cache the cold run filled: every later
  run and trial on that machine (or on a cluster whose nodes share the directory).

Each time is the process's wall time, from launch to exit: imports, start-up, the compile,
training, evaluations and figures. The final ``kl_data_ebm`` and ``kl_data_flow`` are read from
the run's last log line, so the table shows what compiling changed in the result (training
is chaotic: fused kernels round differently, and 8,000 steps carry that into the third
decimal). Run it with nothing else on the machine, or say what ran beside it. ``--write``
puts the table of ``benchmarks/results/whole_run_truth.json`` in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from analysis.regions import Region, write
from fce.config import DATASET_NAMES

ROOT = Path(__file__).resolve().parents[1]

RESULT = ROOT / "benchmarks" / "results" / "whole_run_truth.json"
REGIONS = [
    Region(
        ROOT / "docs" / "performance.md",
        "whole run truth",
        "python benchmarks/whole_run.py --report benchmarks/results/whole_run_truth.json --write",
        lambda: report(json.loads(RESULT.read_text())["runs"]) + "\n",
    )
]
MODES = ("eager", "cold", "warm")
FINISHED = re.compile(r"finished (\d+) steps in [^:]*: (.*)$", re.MULTILINE)


def one_run(dataset: str, seed: int, overrides: list[str], mode: str, cache: Path) -> dict:
    """One ``run.py`` process in ``mode``: its wall time and final metrics."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=str(cache))
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable,
            str(ROOT / "run.py"),
            "experiment=truth",
            f"dataset={dataset}",
            f"seed={seed}",
            "tracking=none",
            "progress=log",
            f"hydra.run.dir={out}",
            f"train.compile={'false' if mode == 'eager' else 'true'}",
            *overrides,
        ]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    found = FINISHED.search(done.stderr + done.stdout)
    if done.returncode != 0 or found is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"{dataset} seed {seed} ({mode}) failed: {' | '.join(tail)}")
    pairs = re.findall(r"(\w+) (-?[\d.]+(?:e-?\d+)?|inf|nan)", found.group(2))
    metrics = {name: float(value) for name, value in pairs}
    compiled = "train.compile=True: the" in done.stderr
    return {
        "dataset": dataset,
        "seed": seed,
        "mode": mode,
        "seconds": seconds,
        "steps": int(found.group(1)),
        "compiled": compiled,
        "fell_back": "could not be compiled" in done.stderr,
        "kl_data_ebm": metrics.get("kl_data_ebm"),
        "kl_data_flow": metrics.get("kl_data_flow"),
    }


def report(runs: list[dict]) -> str:
    """The table: per (dataset, seed), each mode's seconds and result, and eager / compiled."""
    rows = [
        "| dataset | seed | eager (s) | compiled, cold cache (s) | compiled, warm (s) | "
        "eager / cold | eager / warm | kl_data_ebm eager, warm | kl_data_flow eager, warm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_key: dict[tuple, dict[str, dict]] = {}
    for run in runs:
        by_key.setdefault((run["dataset"], run["seed"]), {})[run["mode"]] = run
    for (dataset, seed), modes in by_key.items():
        e, c, w = (modes[m] for m in MODES)
        rows.append(
            f"| {dataset} | {seed} | {e['seconds']:.0f} | {c['seconds']:.0f} | "
            f"{w['seconds']:.0f} | {e['seconds'] / c['seconds']:.2f}x | "
            f"{e['seconds'] / w['seconds']:.2f}x | "
            f"{e['kl_data_ebm']:.3f}, {w['kl_data_ebm']:.3f} | "
            f"{e['kl_data_flow']:.3f}, {w['kl_data_flow']:.3f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASET_NAMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, help="write the runs as JSON here")
    parser.add_argument("--report", type=Path, help="print the table of an earlier --out")
    parser.add_argument("--write", action="store_true", help="with --report: into the docs")
    parser.add_argument("overrides", nargs="*", help="run overrides, as for run.py")
    args = parser.parse_args(argv)
    overrides = args.overrides
    if args.write and args.report is None:
        parser.error("--write needs --report")
    if args.report is not None:
        if not args.write:
            print(report(json.loads(args.report.read_text())["runs"]))
            return
        if args.report.resolve() != RESULT:
            parser.error(f"--write: the docs' table is made from {RESULT.relative_to(ROOT)}")
        raise SystemExit(write(REGIONS, "whole_run.py"))
    unknown = sorted(set(args.datasets) - set(DATASET_NAMES))
    if unknown:
        parser.error(f"unknown dataset {unknown[0]!r}; choose from {', '.join(DATASET_NAMES)}")
    runs: list[dict] = []
    for dataset in args.datasets:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as cache:
                for mode in MODES:
                    run = one_run(dataset, seed, overrides, mode, Path(cache))
                    print(
                        f"{dataset:12s} seed {seed} {mode:5s} {run['seconds']:6.1f} s  "
                        f"kl_data_ebm {run['kl_data_ebm']:.4f}",
                        flush=True,
                    )
                    runs.append(run)
            if args.out is not None:  # after each dataset: a stopped batch keeps what it made
                result = {
                    "overrides": overrides,
                    "machine": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(),
                    "runs": runs,
                }
                args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(report(runs))


if __name__ == "__main__":
    main()
