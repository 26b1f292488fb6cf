"""What the reverse-KL metrics cost and how noisy the KL estimates are (docs/method.md, Metrics).

    python benchmarks/eval_metrics.py            # both parts, into benchmarks/results/
    python benchmarks/eval_metrics.py --steps 0  # the costs alone (untrained models)

Cost: one evaluation at the default sizes (20,000 held-out points, 2,048 flow samples, 256 x
256 grid, Glow, FCE) of each dataset, without the mode-seeking metrics (kl_ebm_data,
kl_flow_data, js_*: "before"), with them ("after"), and with them on 20,000 flow samples (one
per held-out point, as they were first computed: "after_20000"), in one process, alternating,
best of ``--repeats``.

Noise: a default run (``python run.py``: 8gaussians, Glow, FCE, ``--steps`` steps), then on its
final models the Monte-Carlo standard error of each KL estimate (the standard deviation of the
per-point log-ratio over sqrt(n)) and the grid's quadrature error (256 cells against 1,024).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from fce.compose import compose
from fce.data import make_generator
from fce.factory import build_trainer
from fce.metrics import Evaluator, Grid

RESULTS = Path(__file__).resolve().parent / "results" / "eval_metrics.json"
DATASETS = ("8gaussians", "spiral", "2spirals", "checkerboard", "rings", "pinwheel")


def _without_reverse(evaluator: Evaluator) -> Evaluator:
    """The same evaluator computing only the metrics that existed before the reverse ones."""
    plain = Evaluator.__new__(Evaluator)
    plain.__dict__.update(evaluator.__dict__)
    plain._flow_reverse = lambda flow, log_q: {}
    plain._ebm_reverse = lambda log_p_hat, p_hat, cell_area: {}
    return plain


def _with_flow_samples(evaluator: Evaluator, n: int, seed: int) -> Evaluator:
    """The same evaluator drawing ``n`` flow samples (from the same stream)."""
    other = Evaluator.__new__(Evaluator)
    other.__dict__.update(evaluator.__dict__)
    other.flow_noise = torch.randn(n, 2, generator=make_generator(seed, "eval/flow"))
    return other


def costs(repeats: int) -> dict[str, dict[str, float]]:
    out = {}
    for name in DATASETS:
        cfg = compose([f"dataset={name}", "dataset.n_samples=20000", "device=cpu"])
        trainer = build_trainer(cfg, torch.device("cpu"))
        trainer.estimator.start(trainer.batch(0))  # Glow's data-dependent initialisation
        ebm, flow, evaluator = trainer.ebm, trainer.flow, trainer.evaluator
        before_eval = _without_reverse(evaluator)
        n = evaluator.eval_points.shape[0]
        every_point = _with_flow_samples(evaluator, n, cfg.eval.seed)
        runs = (("before", before_eval), ("after", evaluator), ("after_20000", every_point))
        times = {label: [] for label, _ in runs}
        for _ in range(repeats):
            for label, which in runs:
                started = time.perf_counter()
                which(ebm, flow)
                times[label].append(time.perf_counter() - started)
        best = {label: min(values) for label, values in times.items()}
        out[name] = {
            **best,
            "ratio": best["after"] / best["before"],
            "ratio_20000": best["after_20000"] / best["before"],
        }
        before, after, ratio = best["before"], best["after"], out[name]["ratio"]
        every, ratio_every = best["after_20000"], out[name]["ratio_20000"]
        print(
            f"{name:>12}: {before:.3f} s -> {after:.3f} s, x{ratio:.2f} "
            f"({every:.3f} s, x{ratio_every:.2f} with {n:,} flow samples)"
        )
    return out


def noise(steps: int) -> dict[str, float]:
    cfg = compose(["device=cpu", f"train.max_steps={steps}"])
    trainer = build_trainer(cfg, torch.device("cpu"))
    started = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        return {"steps": steps, "train_seconds": seconds, **_noise(trainer, cfg)}


def _noise(trainer, cfg) -> dict[str, float]:
    ebm, flow, evaluator = trainer.ebm, trainer.flow, trainer.evaluator
    metrics = evaluator(ebm, flow)
    x, log_p = evaluator.eval_points, evaluator.log_p_true
    n = x.shape[0]
    log_q = flow.log_prob(x).double()
    neg_energy_grid = -ebm.energy(evaluator.grid.points)
    log_p_hat = -ebm.energy(x).double() - evaluator.grid.log_integral(neg_energy_grid)

    def se(values: torch.Tensor) -> float:
        return (values.std() / math.sqrt(values.shape[0])).item()

    # JS by Monte Carlo: half of each mean; the two samples are independent.
    z = evaluator.flow_noise
    y, log_q_y = flow.transform_noise(z)
    log_p_y = evaluator.dataset.log_prob(y.double())
    log_q_y = log_q_y.double()
    to_flow = math.log(2) + log_q_y - torch.logaddexp(log_q_y, log_p_y)
    to_data = math.log(2) + log_p - torch.logaddexp(log_p, log_q)
    js_se = 0.5 * math.hypot(se(to_flow), se(to_data))
    fine = Evaluator(
        evaluator.dataset, x, Grid.make(cfg.eval.grid_limit, 1024, dtype=x.dtype), cfg.eval.seed
    )(ebm, flow)
    return {
        "n_points": n,
        **{name: metrics[name] for name in metrics},
        "kl_data_flow_se": se(log_p - log_q),
        "kl_data_ebm_se": se(log_p - log_p_hat),
        "js_flow_data_se": js_se,
        "grid_1024": {
            name: fine[name] for name in ("kl_data_ebm", "kl_ebm_data", "js_ebm_data", "tv_ebm")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=5000, help="the default run's steps (0: skip)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {
        "machine": "shared 2-core machine, torch CPU, one thread",
        "date": time.strftime("%Y-%m-%d"),
        "eval_seconds": costs(args.repeats),
    }
    if args.steps:
        results["default_run"] = noise(args.steps)
        print(json.dumps(results["default_run"], indent=1))
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
