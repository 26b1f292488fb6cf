"""Training speed against this CPU's FLOP rate, evaluation overhead, and the default run's cost.

    python benchmarks/speed.py                 # a table
    python benchmarks/speed.py --json          # one JSON object
    python benchmarks/speed.py --skip-run      # without timing the default `python run.py`
    python benchmarks/speed.py --run-only      # only the default `python run.py`
    python benchmarks/speed.py --truth --json > benchmarks/results/speed_truth.json
    python benchmarks/speed.py --truth --baseline-spline /tmp/spline_before.py --json > ...
    python benchmarks/speed.py --truth --compiled   # and the passes under torch.compile
    python benchmarks/speed.py --report benchmarks/results/speed_truth.json   # its table
    python benchmarks/speed.py --report benchmarks/results/speed_truth.json --write  # in docs

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

``--truth`` times the truth recipe instead (``experiment=truth``: the spline flow, the SiLU
energy): ms per EBM step and per flow step and of the frozen flow's two passes (``log_prob``
of the batch's 1,000 points, ``transform_noise`` of its 1,000 draws), the FLOPs of each, and
each one's efficiency against the matmul probe. Times are per-thread CPU time (median over
interleaved rounds), which another process on the machine disturbs far less than wall time.
``--baseline-spline FILE`` adds the same measurements of a trainer whose flow is the spline
of FILE (an older ``fce/flows/spline.py``: ``git show REV:fce/flows/spline.py > FILE``),
interleaved with the current one in the same process (current, baseline, baseline, current,
...), and ``--run-steps N`` a whole ``python run.py experiment=truth dataset=rings
train.max_steps=N tracking=none`` with each spline, the two processes side by side.
``--report FILE`` prints the table in docs/performance.md from such a JSON; with ``--write``
it replaces the table between its markers there.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from analysis.regions import Region, write
from fce.config import FLOW_NAMES

ROOT = Path(__file__).resolve().parents[1]


def compose_default(overrides: list[str]):
    from fce.compose import compose
    from fce.config import validate

    cfg = compose(overrides)
    validate(cfg)
    return cfg


def matmul_flops_per_s(repeats: int = 2000, clock=time.perf_counter) -> float:
    import torch

    a, b = torch.randn(1000, 64), torch.randn(64, 64)
    for _ in range(50):
        a @ b
    started = clock()
    for _ in range(repeats):
        a @ b
    return 2 * 1000 * 64 * 64 * repeats / (clock() - started)


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
    flow_steps_before = trainer.estimator.flow_steps
    # Consecutive windows of the same game, each followed by the matmul probe. The game's mix
    # moves: with Glow, 7% of the first 250 steps are flow steps and half of those around
    # step 1,100. So the default times a whole default-length run (5 x 1,000 steps) and
    # reports each window's rate and share; the probe's median comes from the same stretch.
    window_rates, window_shares, matmul_rates, seconds = [], [], [], 0.0
    for _ in range(windows):
        trainer.total_steps += steps
        flow_steps_window = trainer.estimator.flow_steps
        eval_before = trainer.seconds["eval"]
        started = time.perf_counter()
        trainer.run()
        wall = time.perf_counter() - started
        wall -= trainer.seconds["eval"] - eval_before
        seconds += wall
        window_rates.append(steps / wall)
        window_shares.append(1 - (trainer.estimator.flow_steps - flow_steps_window) / steps)
        matmul_rates.append(matmul_flops_per_s())
    steps_per_s = windows * steps / seconds
    ebm_share = 1 - (trainer.estimator.flow_steps - flow_steps_before) / (windows * steps)
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


TRUTH_RUN = ["experiment=truth", "dataset=rings", "tracking=none"]
PERFORMANCE = ROOT / "docs" / "performance.md"
TRUTH_JSON = ROOT / "benchmarks" / "results" / "speed_truth.json"
# The table in docs/performance.md, made from TRUTH_JSON (analysis.regions).
REGIONS = [
    Region(
        PERFORMANCE,
        "speed truth",
        "python benchmarks/speed.py --report benchmarks/results/speed_truth.json --write",
        lambda: truth_table(json.loads(TRUTH_JSON.read_text())) + "\n",
    )
]
# Runs run.py with the flow class swapped for a baseline spline's (argv: FILE, run.py, args).
_RUN_WITH_SPLINE = """
import importlib.util, runpy, sys
import fce.flows
spec = importlib.util.spec_from_file_location("fce_baseline_spline", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
fce.flows.Spline = module.Spline
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def load_spline(path: Path):
    """The ``Spline`` class of a spline module saved at ``path``."""
    spec = importlib.util.spec_from_file_location("fce_baseline_spline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Spline


@contextlib.contextmanager
def spline_class(cls):
    """``flow=spline`` builds ``cls`` while inside."""
    import fce.flows

    saved = fce.flows.Spline
    fce.flows.Spline = cls
    try:
        yield
    finally:
        fce.flows.Spline = saved


def measure_truth(
    threads: int,
    rounds: int,
    per_round: int,
    baseline: Path | None,
    overrides: list[str],
    compiled: bool = False,
) -> dict:
    """The truth recipe's steps and frozen passes, per-thread CPU ms (medians of single
    calls over ``rounds`` rounds of ``per_round`` calls of each), for the current spline and
    (``baseline``) a baseline one, interleaved; FLOPs and efficiency against the matmul
    probe, timed by the same clock in the same rounds."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fce.factory import build_trainer

    torch.set_num_threads(threads)
    cfg = compose_default(["experiment=truth", "device=cpu", f"threads={threads}", *overrides])
    trainers = {"current": build_trainer(cfg, torch.device("cpu"))}
    if baseline is not None:
        with spline_class(load_spline(baseline)):
            trainers["baseline"] = build_trainer(cfg, torch.device("cpu"))
        trainers["baseline"].flow.load_state_dict(trainers["current"].flow.state_dict())
    probe = trainers["current"]
    x, z = probe.batch(0), probe.noise(0, probe.batch(0))
    ebm_flops, flow_flops = step_flops(probe)
    frozen = probe.flow.frozen()
    with FlopCounterMode(display=False) as counter:
        frozen.log_prob(x), frozen.transform_noise(z)
    flops = {"frozen_passes": counter.get_total_flops(), "ebm_step": ebm_flops}
    flops["flow_step"] = flow_flops

    def cases(trainer) -> dict:
        estimator, passes = trainer.estimator, trainer.flow.frozen()
        return {
            "frozen_passes": lambda: (passes.log_prob(x), passes.transform_noise(z)),
            # As in the game: the EBM's steps reuse the frozen flow until the flow steps.
            "ebm_step": lambda: estimator.ebm_step(x, z),
            "flow_step": lambda: estimator.flow_step(x, z),
        }

    calls = {name: cases(trainer) for name, trainer in trainers.items()}
    ops = {name: aten_calls(calls[name]["frozen_passes"]) for name in calls}
    if compiled:  # on a copy: its flow step leaves the timed trainers as they were
        fused, compile_cost = compiled_passes(copy.deepcopy(probe), x, z)
        calls["compiled"] = {"frozen_passes": lambda: fused(x, z)}
    cpu = {name: {case: [] for case in calls[name]} for name in calls}
    wall = copy.deepcopy(cpu)
    matmul = []
    for r in range(rounds):
        # Current first in even rounds, baseline first in odd ones: neither always follows.
        for name in list(calls) if r % 2 == 0 else list(calls)[::-1]:
            for case, fn in calls[name].items():
                for _ in range(per_round):
                    started, started_cpu = time.perf_counter(), time.thread_time()
                    fn()
                    cpu[name][case].append(time.thread_time() - started_cpu)
                    wall[name][case].append(time.perf_counter() - started)
        matmul.append(matmul_flops_per_s(500, clock=time.thread_time))
    rate = statistics.median(matmul)
    result: dict = {
        "config": ["experiment=truth", *overrides],
        "torch": torch.__version__,
        "threads": threads,
        "rounds": rounds,
        "per_round": per_round,
        "clock": "per-thread CPU time, median of single calls",
        "flops": flops,
        "matmul_flops_per_s": rate,
        "matmul_flops_per_s_probes": matmul,
        "splines": {},
    }
    for name in calls:
        entry = {}
        for case in calls[name]:
            ms = statistics.median(cpu[name][case]) * 1e3
            entry[f"{case}_ms"] = ms
            entry[f"{case}_wall_ms"] = statistics.median(wall[name][case]) * 1e3
            entry[f"{case}_efficiency"] = flops[case] / (ms / 1e3) / rate
        if name == "compiled":
            entry.update(compile_cost)
            result["compiled"] = entry
            continue
        entry["frozen_passes_aten_calls"] = ops[name]
        result["splines"][name] = entry
    if baseline is not None:
        old, new = result["splines"]["baseline"], result["splines"]["current"]
        result["speedup"] = {case: old[f"{case}_ms"] / new[f"{case}_ms"] for case in flops}
    return result


def compiled_passes(trainer, x, z) -> tuple:
    """The frozen passes of ``trainer``'s flow under ``torch.compile`` (one graph, static
    shapes), and what compiling cost: the first call's wall and CPU seconds (inductor's cache,
    $TORCHINDUCTOR_CACHE_DIR, makes a second process's compile cheaper), whether it compiled
    again after a flow step, and its largest difference from the eager passes."""
    import torch

    flow = trainer.flow

    def passes(x, z):
        with torch.no_grad():
            return flow.log_prob(x), flow.transform_noise(z)

    fused = torch.compile(passes, dynamic=False, fullgraph=True)
    started, started_cpu = time.perf_counter(), time.process_time()
    out = fused(x, z)
    cost = {
        "compile_wall_s": time.perf_counter() - started,
        "compile_cpu_s": time.process_time() - started_cpu,
    }
    eager = passes(x, z)
    pairs = [(out[0], eager[0]), (out[1][0], eager[1][0]), (out[1][1], eager[1][1])]
    cost["max_abs_diff"] = max((a - b).abs().max().item() for a, b in pairs)
    trainer.estimator.flow_step(x, z)  # the parameters move in place: no new graph
    started = time.perf_counter()
    fused(x, z)
    cost["first_call_after_flow_step_s"] = time.perf_counter() - started
    return fused, cost


def aten_calls(fn) -> int:
    """How many ATen operators one call of ``fn`` dispatches (after a first, warm-up call):
    at these sizes each costs about its dispatch, so the count is the cost's main term."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    fn()
    with Count() as count:
        fn()
    return count.calls


def measure_truth_runs(baseline: Path, steps: int, repeats: int) -> dict:
    """``python run.py experiment=truth dataset=rings train.max_steps=steps tracking=none``
    with the current spline and with ``baseline``'s, both at once (one per core), ``repeats``
    times: wall seconds from launch to exit and CPU seconds (user + system) of each."""
    args = [*TRUTH_RUN, f"train.max_steps={steps}"]
    run_py = str(ROOT / "run.py")
    commands = {
        "current": [sys.executable, run_py, *args],
        "baseline": [sys.executable, "-c", _RUN_WITH_SPLINE, str(baseline), run_py, *args],
    }
    out: dict = {"command": "python run.py " + " ".join(args), "repeats": repeats}
    out.update({name: {"wall_s": [], "cpu_s": []} for name in commands})
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            procs, logs = {}, {}
            started = time.perf_counter()
            for name, command in commands.items():
                (Path(tmp) / name).mkdir()  # each run its own outputs/
                logs[name] = open(Path(tmp) / f"{name}.log", "w+")  # noqa: SIM115
                procs[name] = subprocess.Popen(
                    command, cwd=Path(tmp) / name, stdout=logs[name], stderr=subprocess.STDOUT
                )
            names = {proc.pid: name for name, proc in procs.items()}
            while names:
                pid, status, usage = os.wait4(-1, 0)
                name = names.pop(pid)
                procs[name].returncode = os.waitstatus_to_exitcode(status)
                out[name]["wall_s"].append(time.perf_counter() - started)
                out[name]["cpu_s"].append(usage.ru_utime + usage.ru_stime)
            for name, proc in procs.items():
                logs[name].seek(0)
                if proc.returncode != 0:
                    tail = logs[name].read()[-2000:]
                    raise SystemExit(f"error: the {name} truth run failed:\n{tail}")
                logs[name].close()
    for name in commands:
        out[name]["wall_s_median"] = statistics.median(out[name]["wall_s"])
        out[name]["cpu_s_median"] = statistics.median(out[name]["cpu_s"])
    out["speedup_wall"] = out["baseline"]["wall_s_median"] / out["current"]["wall_s_median"]
    out["speedup_cpu"] = out["baseline"]["cpu_s_median"] / out["current"]["cpu_s_median"]
    return out


def truth_table(report: dict) -> str:
    """The docs' table of a ``--truth`` JSON (with or without a baseline)."""
    truth = report["truth"]
    rate = truth["matmul_flops_per_s"]
    names = [n for n in ("baseline", "current") if n in truth["splines"]]
    head = ["", "MFLOP"]
    for name in names:
        label = "before" if name == "baseline" else ("after" if len(names) > 1 else "ms")
        head += [f"{label}: ms", f"{label}: efficiency"]
    if len(names) > 1:
        head.append("speedup")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = {
        "frozen_passes": "frozen spline passes (log_prob 1,000 + transform_noise 1,000)",
        "ebm_step": "EBM step",
        "flow_step": "flow step",
    }
    for case, label in rows.items():
        cells = [label, f"{truth['flops'][case] / 1e6:.0f}"]
        for name in names:
            entry = truth["splines"][name]
            cells += [f"{entry[f'{case}_ms']:.2f}", f"{entry[f'{case}_efficiency']:.2f}"]
        if len(names) > 1:
            cells.append(f"{truth['speedup'][case]:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Matmul probe: {rate / 1e9:.0f} GFLOP/s (1000x64 @ 64x64, the same clock), "
        f"{truth['threads']} thread, medians over {truth['rounds']} rounds of "
        f"{truth['per_round']} calls each."
    )
    counts = [
        f"{truth['splines'][name]['frozen_passes_aten_calls']} {label}"
        for name, label in (("baseline", "before"), ("current", "after"))
        if name in truth["splines"]
    ]
    lines.append(f"ATen operators dispatched by the two frozen passes: {', '.join(counts)}.")
    if "compiled" in truth:
        fused = truth["compiled"]
        eager = truth["splines"]["current"]["frozen_passes_ms"]
        lines.append(
            f"Under `torch.compile` (`--compiled`) the frozen passes took "
            f"{fused['frozen_passes_ms']:.2f} ms ({eager / fused['frozen_passes_ms']:.2f}x, "
            f"efficiency {fused['frozen_passes_efficiency']:.2f}); compiling took "
            f"{fused['compile_wall_s']:.1f} s wall, {fused['compile_cpu_s']:.1f} s CPU in the "
            f"process; largest difference from eager {fused['max_abs_diff']:.1e}."
        )
    if "runs" in report:
        runs = report["runs"]
        parts = []
        for name, label in (("baseline", "before"), ("current", "after")):
            wall = ", ".join(f"{v:.1f}" for v in runs[name]["wall_s"])
            cpu = ", ".join(f"{v:.1f}" for v in runs[name]["cpu_s"])
            parts.append(f"{label}: wall {wall} s, CPU {cpu} s")
        lines.append(
            f"`{runs['command']}`, before and after side by side, {runs['repeats']} times: "
            + "; ".join(parts)
            + f"; speedup {runs['speedup_wall']:.2f}x wall, {runs['speedup_cpu']:.2f}x CPU."
        )
    return "\n".join(lines)


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
        "--truth", action="store_true", help="time the truth recipe's steps and spline passes"
    )
    parser.add_argument(
        "--baseline-spline",
        type=Path,
        metavar="FILE",
        help="with --truth: also time this spline module's Spline, side by side",
    )
    parser.add_argument("--rounds", type=int, default=20, help="with --truth: rounds")
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="with --truth: also time the frozen passes under torch.compile, and its cost",
    )
    parser.add_argument(
        "--per-round", type=int, default=5, help="with --truth: calls of each per round"
    )
    parser.add_argument(
        "--run-steps",
        type=int,
        default=0,
        help="with --baseline-spline: also time whole truth runs of this many steps",
    )
    parser.add_argument("--run-repeats", type=int, default=2)
    parser.add_argument("--report", type=Path, metavar="JSON", help="print a --truth JSON's table")
    parser.add_argument(
        "--write", action="store_true", help="with --report: put the table in the docs"
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. optimizer.fused=false"
    )
    args = parser.parse_args()
    if args.write and not args.report:
        parser.error("--write needs --report")
    if args.report:
        table = truth_table(json.loads(args.report.read_text()))
        if not args.write:
            print(table)
            return
        if args.report.resolve() != TRUTH_JSON:
            parser.error(f"--write: the docs' table is made from {TRUTH_JSON.relative_to(ROOT)}")
        raise SystemExit(write(REGIONS, "speed.py"))
    if args.run_only and args.skip_run:
        parser.error("--run-only and --skip-run exclude each other")
    if args.compiled and not args.truth:
        parser.error("--compiled needs --truth")
    if args.baseline_spline and not args.truth:
        parser.error("--baseline-spline needs --truth")
    if args.baseline_spline and not args.baseline_spline.is_file():
        parser.error(f"--baseline-spline={args.baseline_spline}: no such file")
    if args.run_steps and not args.baseline_spline:
        parser.error("--run-steps needs --baseline-spline")
    for name in ("threads", "steps", "windows", "rounds", "per_round", "run_repeats"):
        if getattr(args, name) < 1:
            option = name.replace("_", "-")
            parser.error(f"--{option}={getattr(args, name)}: must be at least 1")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup}: must be at least 0")
    if args.run_steps < 0:
        parser.error(f"--run-steps={args.run_steps}: must be at least 0")
    if args.truth:
        report = {
            "truth": measure_truth(
                args.threads,
                args.rounds,
                args.per_round,
                args.baseline_spline,
                args.overrides,
                compiled=args.compiled,
            )
        }
        if args.run_steps:
            report["runs"] = measure_truth_runs(
                args.baseline_spline, args.run_steps, args.run_repeats
            )
        print(json.dumps(report, indent=1) if args.json else truth_table(report))
        return
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
