"""Stability sweep: default settings, many seeds x datasets x flows; no NaN, no crash.

    python benchmarks/stability.py                      # seeds 0-9, six datasets, both flows
    python benchmarks/stability.py --flows maf --seeds 0 1 2 --jobs 2 train.max_steps=1000
    python benchmarks/stability.py --resume --out benchmarks/results/stability_glow.json
    python benchmarks/stability.py --report benchmarks/results/stability_*.json

Each (seed, flow) is one Hydra multirun of ``run.py`` over the datasets, with
``tracking=none`` (no store) and the joblib launcher (``--jobs`` processes). Every job leaves
its outcome (``metrics.json``) and final checkpoint in its directory; this script reads them,
draws samples from the final flow, prints a markdown table (one row per dataset x flow) and
writes every job to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from fce.config import DATASET_NAMES, FLOW_NAMES

ROOT = Path(__file__).resolve().parents[1]


def sweep(flow: str, seed: int, datasets: list[str], jobs: int, overrides: list[str]) -> list:
    """Run one multirun over ``datasets`` and return a record per job."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            str(ROOT / "run.py"),
            "-m",
            "hydra/launcher=joblib",
            f"hydra.launcher.n_jobs={jobs}",
            f"hydra.sweep.dir={tmp}",
            "hydra.sweep.subdir=${hydra:runtime.choices.dataset}",
            "tracking=none",
            "progress=none",
            "train.plot_every=0",
            f"flow={flow}",
            f"seed={seed}",
            f"dataset={','.join(datasets)}",
            *overrides,
        ]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode not in (0, 1):  # 1: a job diverged, which the records say
            lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
            raise SystemExit(f"the grid of {flow}, seed {seed} failed: {lines[-1]}")
        records = [collect(Path(tmp) / d, flow, d, seed) for d in datasets]
    for r in records:
        print(
            f"{flow:5s} {r['dataset']:12s} seed {seed}: "
            + ("DIVERGED " + r["diverged"] if r["diverged"] else "ok")
            + f"  nll_ebm {r.get('nll_ebm', math.nan):.3f}"
            + f"  {r.get('steps_per_s', math.nan):.0f} steps/s",
            flush=True,
        )
    return records


def collect(job_dir: Path, flow: str, dataset: str, seed: int) -> dict:
    """One job's record: its outcome, and samples drawn from its final flow."""
    import torch
    from omegaconf import OmegaConf

    from fce import checkpoint
    from fce.config import upgrade
    from fce.factory import build_trainer

    record = {"flow": flow, "dataset": dataset, "seed": seed, "diverged": None}
    outcome_file = job_dir / "metrics.json"
    if not outcome_file.is_file():
        record.update(diverged=f"crash: no outcome in {job_dir}", samples_finite=False)
        record["max_abs_sample"] = math.nan
        return record
    outcome = json.loads(outcome_file.read_text())
    record["diverged"] = outcome.pop("error")
    record["steps"] = outcome.pop("step")
    wall = outcome.pop("wall_time_s", math.nan)
    outcome.pop("status")
    record.update(outcome)
    record["steps_per_s"] = record["steps"] / wall if wall else math.nan
    try:
        _, state, _ = checkpoint.resolve(job_dir)
    except checkpoint.CheckpointError:  # diverged before its first checkpoint
        record.update(max_abs_sample=math.nan, samples_finite=False)
        return record
    trainer = build_trainer(upgrade(OmegaConf.create(state["config"])), torch.device("cpu"))
    trainer.load_state_dict(state["trainer"])
    with torch.no_grad():
        samples, log_q = trainer.flow.sample_and_log_prob(20_000, torch.Generator().manual_seed(0))
    record["max_abs_sample"] = samples.abs().max().item()
    record["samples_finite"] = bool(torch.isfinite(samples).all() and torch.isfinite(log_q).all())
    history = trainer.history.history
    for name in ("mse_logp", "nll_ebm", "nll_flow"):
        if name in history:
            record[f"all_{name}_finite"] = all(math.isfinite(v) for v in history[name][1])
    return record


def summary_table(records: list[dict]) -> str:
    lines = [
        "| flow | dataset | runs | diverged | nll_ebm mean ± std | nll_flow mean ± std "
        "| mse_logp mean (max) | max abs sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["flow"], r["dataset"]), []).append(r)

    def stats(rows: list[dict], key: str) -> tuple[float, float]:
        values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
        if not values:
            return math.nan, math.nan
        mean = sum(values) / len(values)
        return mean, (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5

    for (flow, dataset), rows in sorted(groups.items()):
        diverged = sum(1 for r in rows if r["diverged"] or not r["samples_finite"])
        nll_ebm, nll_flow = stats(rows, "nll_ebm"), stats(rows, "nll_flow")
        mse = [r["mse_logp"] for r in rows if "mse_logp" in r]
        mse_text = f"{sum(mse) / len(mse):.3f} ({max(mse):.3f})" if mse else "-"
        biggest = max(r["max_abs_sample"] for r in rows)
        lines.append(
            f"| {flow} | {dataset} | {len(rows)} | {diverged} | {nll_ebm[0]:.3f} ± "
            f"{nll_ebm[1]:.3f} | {nll_flow[0]:.3f} ± {nll_flow[1]:.3f} | {mse_text} "
            f"| {biggest:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", nargs="+", default=list(FLOW_NAMES), choices=FLOW_NAMES)
    parser.add_argument(
        "--datasets", nargs="+", default=list(DATASET_NAMES), choices=DATASET_NAMES
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes (1 thread each)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "stability.json"
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep the jobs already in --out; run the rest"
    )
    parser.add_argument(
        "--report", nargs="+", type=Path, help="only print the table of these result files"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=1000")
    args = parser.parse_args()
    if args.report:
        records = [r for path in args.report for r in json.loads(path.read_text())["runs"]]
        print(summary_table(records))
        return
    records: list[dict] = []
    if args.resume and args.out.exists():
        saved = json.loads(args.out.read_text())
        if saved["overrides"] != args.overrides:
            raise SystemExit(
                f"error: --resume: {args.out} was made with overrides {saved['overrides']}, "
                f"not {args.overrides}"
            )
        records = saved["runs"]
    done = {(r["flow"], r["dataset"], r["seed"]) for r in records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Seed-major order: a sweep stopped early has covered every dataset and flow equally.
    for seed in args.seeds:
        for flow in args.flows:
            todo = [d for d in args.datasets if (flow, d, seed) not in done]
            if not todo:
                continue
            records += sweep(flow, seed, todo, args.jobs, args.overrides)
            # Written after every multirun, so a sweep stopped half-way keeps what it measured.
            partial = args.out.with_suffix(".tmp")
            partial.write_text(
                json.dumps({"overrides": args.overrides, "runs": records}, indent=1)
            )
            partial.replace(args.out)
    print()
    print(summary_table(records))
    failed = [r for r in records if r["diverged"] or not r["samples_finite"]]
    print(f"\n{len(records)} runs, {len(failed)} diverged or crashed; details in {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
