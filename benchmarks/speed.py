"""Training speed against this CPU's FLOP rate, evaluation overhead, and the default run's cost.

    python benchmarks/speed.py                 # a table
    python benchmarks/speed.py --json          # one JSON object
    python benchmarks/speed.py --skip-run      # without timing the default `python run.py`
    python benchmarks/speed.py --run-only      # only the default `python run.py`

For each flow at the reference sizes (EBM 2-128-128-1; Glow 10 steps of width 64; MAF 5
blocks of 100 with two hidden layers; ``--flows spline`` adds the spline flow at its
defaults), batch 1000, 8gaussians, the default config otherwise:

- steps_per_s: training steps only (evaluation and plots excluded), after a warm-up, over
  --windows consecutive windows of --steps: by default 5 x 1,000, the default run's length
  (each window's rate and EBM-step share in steps_per_s_windows, ebm_step_share_windows);
- ebm_step_flops, flow_step_flops: FlopCounterMode over one real step of each kind;
- ebm_step_share: the share of EBM steps in the timed window; flops_per_step their mix;
- matmul_flops_per_s: a float32 (1000, 64) @ (64, 64) matmul, same process, same threads,
  the median of a probe after each window;
- efficiency = steps_per_s * flops_per_step / matmul_flops_per_s;
- eval_overhead: share of wall time spent evaluating at the default eval_every.
And the default `python run.py`: wall time, time to the first training step, and peak resident
memory (getrusage(RUSAGE_CHILDREN).ru_maxrss once it has exited: the script starts no other
child, so this is the run's own high-water mark).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fce.config import FLOW_NAMES

ROOT = Path(__file__).resolve().parents[1]


def compose_default(overrides: list[str]):
    from fce.compose import compose
    from fce.config import validate

    cfg = compose(overrides)
    validate(cfg)
    return cfg


def matmul_flops_per_s(repeats: int = 2000) -> float:
    import torch

    a, b = torch.randn(1000, 64), torch.randn(64, 64)
    for _ in range(50):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * 1000 * 64 * 64 * repeats / (time.perf_counter() - started)


def step_flops(trainer) -> tuple[int, int]:
    """FLOPs of one real EBM step and one real flow step (forward, backward, update)."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(trainer)  # the timed trainer's state is left untouched
    x = probe.batch(0)
    z = probe.noise(0, x)
    counts = []
    for step in (probe.estimator.ebm_step, probe.estimator.flow_step):
        with FlopCounterMode(display=False) as counter:
            step(x, z)
        counts.append(counter.get_total_flops())
    return counts[0], counts[1]


def step_milliseconds(trainer, repeats: int = 60, rounds: int = 5) -> tuple[float, float]:
    """Median-free, noise-robust cost of one EBM step and one flow step: the best of a few
    rounds of ``repeats`` steps on one batch (the other process on the machine only adds)."""
    x = trainer.batch(0)
    z = trainer.noise(0, x)
    best = []
    for step in (trainer.estimator.ebm_step, trainer.estimator.flow_step):
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(repeats):
                step(x, z)
            times.append((time.perf_counter() - started) / repeats * 1e3)
        best.append(min(times))
    return best[0], best[1]


def measure_flow(
    flow: str, threads: int, steps: int, warmup: int, windows: int = 5, overrides: list[str] = ()
) -> dict:
    import torch

    from fce.factory import build_trainer

    torch.set_num_threads(threads)
    cfg = compose_default([f"flow={flow}", "device=cpu", f"threads={threads}", *overrides])
    trainer = build_trainer(cfg, torch.device("cpu"))
    params = sum(p.numel() for p in trainer.ebm.parameters())
    params_flow = sum(p.numel() for p in trainer.flow.parameters())
    ebm_flops, flow_flops = step_flops(trainer)
    ebm_ms, flow_ms = step_milliseconds(copy.deepcopy(trainer))

    # Warm up, then time training steps only: no evaluation inside the window.
    trainer.settings = type(trainer.settings)(**{**trainer.settings.__dict__, "eval_every": 10**9})
    trainer.total_steps = warmup
    trainer.run()
    flow_steps_before = trainer.flow_steps
    # Consecutive windows of the same game, each followed by the matmul probe. The game's mix
    # moves: with Glow, 7% of the first 250 steps are flow steps and half of those around
    # step 1,100. So the default times a whole default-length run (5 x 1,000 steps) and
    # reports each window's rate and share; the probe's median comes from the same stretch.
    window_rates, window_shares, matmul_rates, seconds = [], [], [], 0.0
    for _ in range(windows):
        trainer.total_steps += steps
        flow_steps_window = trainer.flow_steps
        eval_before = trainer.seconds["eval"]
        started = time.perf_counter()
        trainer.run()
        wall = time.perf_counter() - started
        wall -= trainer.seconds["eval"] - eval_before
        seconds += wall
        window_rates.append(steps / wall)
        window_shares.append(1 - (trainer.flow_steps - flow_steps_window) / steps)
        matmul_rates.append(matmul_flops_per_s())
    steps_per_s = windows * steps / seconds
    ebm_share = 1 - (trainer.flow_steps - flow_steps_before) / (windows * steps)
    matmul = statistics.median(matmul_rates)
    flops_per_step = ebm_share * ebm_flops + (1 - ebm_share) * flow_flops

    # Evaluation overhead at the default eval_every: the cost of one evaluation against the
    # training time between two of them.
    started = time.perf_counter()
    for _ in range(5):
        trainer.evaluator(trainer.ebm, trainer.flow)
    eval_s = (time.perf_counter() - started) / 5
    between = cfg.train.eval_every / steps_per_s
    return {
        "flow": flow,
        "params": params_flow,
        "params_ebm": params,
        "threads": threads,
        "batch_size": cfg.train.batch_size,
        "steps_per_s": steps_per_s,
        "steps_per_s_windows": window_rates,
        "ebm_step_flops": ebm_flops,
        "flow_step_flops": flow_flops,
        "ebm_step_share": ebm_share,
        "ebm_step_share_windows": window_shares,
        "flops_per_step": flops_per_step,
        "matmul_flops_per_s": matmul,
        "matmul_flops_per_s_probes": matmul_rates,
        "efficiency": steps_per_s * flops_per_step / matmul,
        "ebm_step_ms": ebm_ms,
        "flow_step_ms": flow_ms,
        "eval_seconds": eval_s,
        "eval_overhead": eval_s / (eval_s + between),
    }


def measure_default_run() -> dict:
    """`python run.py` as a user types it, in a temp dir against a temp store.

    The time to the first training step is when the run's "ready" line appears, counted from
    the launch of the process (imports, data, models and the step-0 evaluation included).
    """
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "run.py"),
                f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                "progress=log",
            ],
            cwd=tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        first_step, lines = None, []
        for line in proc.stdout:
            lines.append(line.rstrip())
            if first_step is None and "ready in" in line:
                first_step = time.perf_counter() - started
        proc.wait()
        wall = time.perf_counter() - started
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        raise SystemExit("error: python run.py failed:\n" + "\n".join(lines[-20:]))
    return {
        "run_wall_s": wall,
        "run_time_to_first_step_s": first_step,
        "run_peak_rss_gib": peak_kib / 2**20,
        "run_final": next((line for line in reversed(lines) if "finished" in line), lines[-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--steps", type=int, default=1000, help="timed training steps per window, per flow"
    )
    parser.add_argument("--windows", type=int, default=5, help="timed windows per flow")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--skip-run", action="store_true", help="do not time `python run.py`")
    parser.add_argument(
        "--run-only", action="store_true", help="only time `python run.py` (no per-flow table)"
    )
    parser.add_argument("--flows", nargs="+", default=["glow", "maf"], choices=FLOW_NAMES)
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. optimizer.fused=false"
    )
    args = parser.parse_args()
    if args.run_only and args.skip_run:
        parser.error("--run-only and --skip-run exclude each other")
    for name in ("threads", "steps", "windows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: must be at least 1")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup}: must be at least 0")
    flows = [
        measure_flow(f, args.threads, args.steps, args.warmup, args.windows, args.overrides)
        for f in ([] if args.run_only else args.flows)
    ]
    report: dict = {"flows": {f["flow"]: f for f in flows}}
    if not args.skip_run:
        report["default_run"] = measure_default_run()
    if args.json:
        print(json.dumps(report, indent=1))
        return
    keys = (
        "ebm_step_ms",
        "flow_step_ms",
        "params",
        "threads",
        "steps_per_s",
        "ebm_step_flops",
        "flow_step_flops",
        "ebm_step_share",
        "flops_per_step",
        "matmul_flops_per_s",
        "efficiency",
        "eval_overhead",
    )
    if flows:
        print(f"{'':22s}" + "".join(f"{f['flow']:>14s}" for f in flows))
        for key in keys:
            cells = []
            for f in flows:
                v = f[key]
                cells.append(f"{v:14.3g}" if isinstance(v, float) else f"{v:14d}")
            print(f"{key:22s}" + "".join(cells))
    if "default_run" in report:
        run = report["default_run"]
        first = run["run_time_to_first_step_s"]
        print(
            f"\npython run.py: {run['run_wall_s']:.0f} s wall, first step after "
            f"{'?' if first is None else f'{first:.1f}'} s, "
            f"peak RSS {run['run_peak_rss_gib']:.3f} GiB"
        )


if __name__ == "__main__":
    main()
