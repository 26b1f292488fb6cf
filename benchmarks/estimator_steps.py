"""What one training step of each estimator costs, at the default sizes, on this CPU.

    python benchmarks/estimator_steps.py               # a table (1 thread)
    python benchmarks/estimator_steps.py --json        # one JSON object
    python benchmarks/estimator_steps.py --threads 2 --cells 64 128 256

The default config (8gaussians, batch 1000, the reference EBM 2-128-128-1, Glow 10 x 64) with
each estimator: FCE's EBM step and its flow step, NCE's step (against the fitted Gaussian),
flow_mle's step, and mle's step at each --cells (grid_cells^2 + 1,000 points through the EBM,
forward and backward). Each is the best of --rounds rounds of --repeats steps on one batch
(another process on the machine only adds time), in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import time


def best_ms(step, repeats: int, rounds: int) -> float:
    for _ in range(3):  # warm-up
        step()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        times.append((time.perf_counter() - started) / repeats * 1e3)
    return min(times)


def trainer_of(overrides: list[str], threads: int):
    import torch

    from fce.compose import compose
    from fce.config import validate
    from fce.factory import build_trainer

    cfg = compose(["device=cpu", f"threads={threads}", "tracking=none", *overrides])
    validate(cfg)
    trainer = build_trainer(cfg, torch.device("cpu"))
    trainer.estimator.start(trainer.batch(0))
    return trainer


def measure(threads: int, cells: list[int], repeats: int, rounds: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    results = {}
    fce = trainer_of(["estimator=fce"], threads)
    x = fce.batch(0)
    z = fce.noise(0, x)
    results["fce_ebm_step"] = best_ms(lambda: fce.estimator.ebm_step(x, z), repeats, rounds)
    results["fce_flow_step"] = best_ms(lambda: fce.estimator.flow_step(x, z), repeats, rounds)
    nce = trainer_of(["estimator=nce"], threads)
    results["nce_step"] = best_ms(lambda: nce.estimator.step(x, z), repeats, rounds)
    flow_mle = trainer_of(["estimator=flow_mle"], threads)
    results["flow_mle_step"] = best_ms(lambda: flow_mle.estimator.step(x, None), repeats, rounds)
    for n in cells:
        mle = trainer_of(["estimator=mle", f"estimator.grid_cells={n}"], threads).estimator
        results[f"mle_step_cells_{n}"] = best_ms(lambda m=mle: m.step(x, None), repeats, rounds)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cells", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = measure(args.threads, args.cells, args.repeats, args.rounds)
    if args.json:
        print(json.dumps({"threads": args.threads, "ms_per_step": results}, indent=2))
        return
    base = results["fce_ebm_step"]
    print(f"| step ({args.threads} thread(s)) | ms | vs FCE's EBM step |")
    print("|---|---|---|")
    for name, ms in results.items():
        print(f"| {name} | {ms:.2f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
