"""Stability sweep: default settings, many seeds x datasets x flows; no NaN, no crash.

    python benchmarks/stability.py                      # seeds 0-9, six datasets, both flows
    python benchmarks/stability.py --flows maf --seeds 0 1 2 --jobs 2 train.max_steps=1000
    python benchmarks/stability.py --resume --out benchmarks/results/stability_glow.json
    python benchmarks/stability.py --report benchmarks/results/stability_*.json

Each job composes the default config (plus any overrides given), trains without MLflow, and
records the final metrics, whether anything diverged, and the largest flow sample. Prints a
markdown table (one row per dataset x flow) and writes every job to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path

from fce.config import DATASET_NAMES, FLOW_NAMES

ROOT = Path(__file__).resolve().parents[1]


def one_job(args: tuple[str, str, int, list[str]]) -> dict:
    flow, dataset, seed, overrides = args
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fce.config import register_configs, validate
    from fce.experiment import build_trainer
    from fce.train import DivergenceError

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            [
                f"flow={flow}",
                f"dataset={dataset}",
                f"seed={seed}",
                "train.plot_every=0",
                *overrides,
            ],
        )
    validate(cfg)
    torch.set_num_threads(cfg.threads)
    trainer = build_trainer(cfg, torch.device("cpu"))
    record = {"flow": flow, "dataset": dataset, "seed": seed, "diverged": None}
    started = time.perf_counter()
    try:
        record.update(trainer.run())
    except DivergenceError as error:
        record["diverged"] = str(error)
    except Exception as error:  # a crash is a finding too: record it, keep sweeping
        record["diverged"] = f"crash: {type(error).__name__}: {error}"
    record["steps"] = trainer.step
    record["steps_per_s"] = trainer.step / (time.perf_counter() - started)
    with torch.no_grad():
        samples, log_q = trainer.flow.sample_and_log_prob(20_000, torch.Generator().manual_seed(0))
    record["max_abs_sample"] = samples.abs().max().item()
    record["samples_finite"] = bool(torch.isfinite(samples).all() and torch.isfinite(log_q).all())
    history = trainer.history.history
    for name in ("mse_logp", "nll_ebm", "nll_flow"):
        if name in history:
            values = history[name][1]
            record[f"all_{name}_finite"] = all(math.isfinite(v) for v in values)
    print(
        f"{flow:5s} {dataset:12s} seed {seed}: "
        + ("DIVERGED " + record["diverged"] if record["diverged"] else "ok")
        + f"  nll_ebm {record.get('nll_ebm', float('nan')):.3f}"
        + f"  {record['steps_per_s']:.0f} steps/s",
        flush=True,
    )
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
    # Seed-major order: a sweep stopped early has covered every dataset and flow equally.
    jobs = [
        (f, d, s, args.overrides)
        for s in args.seeds
        for f in args.flows
        for d in args.datasets
        if (f, d, s) not in done
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        # Written after every job, so a sweep stopped half-way keeps what it measured.
        for record in pool.imap_unordered(one_job, jobs, chunksize=1):
            records.append(record)
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
