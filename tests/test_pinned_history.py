"""A short run's whole metric history, pinned: a change that moves any number fails here.

The pinned values are what this code computed when the file was written; they are not a
target. A change meant to alter the numbers (a new default, a fix in the maths) rewrites them
on purpose, and says so in its commit:

    python -m tests.test_pinned_history --write

Five runs cover both flows and the four estimators, in-process and without a store.
Relative tolerance 1e-5: float32 kernels may round differently on another CPU, but no
change of code passes it. The exact-MLE run is held to 1e-2: Adam steps on its quadrature
gradient amplify that rounding, so its histories differ from one CPU to another by more than
1e-5 (measured in docs/reliability.md), while a change to its code moves them further.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from fce.compose import compose
from fce.factory import build_trainer
from tests.helpers import ROOT

PINNED = ROOT / "tests" / "data" / "pinned_history.json"
SMALL = [
    "dataset.n_samples=4000",
    "train.batch_size=200",
    "train.max_steps=40",
    "train.eval_every=20",
    "eval.n_points=1000",
    "eval.flow_samples=1000",
    "eval.grid_cells=32",
    "device=cpu",
]
RUNS = {
    "pinwheel-glow-fce-s3": ["dataset=pinwheel", "flow=glow", "estimator=fce", "seed=3"],
    "8gaussians-maf-fce-s5": ["dataset=8gaussians", "flow=maf", "estimator=fce", "seed=5"],
    "2spirals-glow-nce-s1": ["dataset=2spirals", "flow=glow", "estimator=nce", "seed=1"],
    "rings-maf-flow_mle-s2": ["dataset=rings", "flow=maf", "estimator=flow_mle", "seed=2"],
    "checkerboard-mle-s4": ["dataset=checkerboard", "estimator=mle", "seed=4"],
}
REL_TOL = {name: 1e-2 if "-mle-" in name else 1e-5 for name in RUNS}


def history(overrides: list[str]) -> dict[str, list[list[float]]]:
    torch.set_num_threads(1)
    trainer = build_trainer(compose([*overrides, *SMALL]), torch.device("cpu"))
    trainer.run()
    return {
        name: [[step, value] for step, value in zip(steps, values, strict=True)]
        for name, (steps, values) in sorted(trainer.history.history.items())
    }


@pytest.mark.parametrize("name", sorted(RUNS))
def test_the_metric_history_is_the_pinned_one(name):
    pinned = json.loads(PINNED.read_text())[name]
    now = history(RUNS[name])
    assert sorted(now) == sorted(pinned)
    for metric, rows in pinned.items():
        assert [s for s, _ in now[metric]] == [s for s, _ in rows], metric
        for (step, value), (_, expected) in zip(now[metric], rows, strict=True):
            assert math.isclose(value, expected, rel_tol=REL_TOL[name], abs_tol=1e-7), (
                metric,
                step,
            )


def drift(name: str) -> tuple[float, str]:
    """The largest relative difference between this machine's history and the pinned one."""
    now, pinned = history(RUNS[name]), json.loads(PINNED.read_text())[name]
    worst, where = 0.0, ""
    for metric, rows in pinned.items():
        for (step, value), (_, expected) in zip(now[metric], rows, strict=True):
            if math.isfinite(expected) and expected != 0:
                relative = abs(value - expected) / abs(expected)
                if relative > worst:
                    worst, where = relative, f"{metric} at step {step}"
    return worst, where


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Rewrite the pinned histories (on purpose).")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite them")
    mode.add_argument("--drift", action="store_true", help="this CPU against them, per run")
    if parser.parse_args().drift:
        print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
        for name in RUNS:
            worst, where = drift(name)
            print(
                f"{name}: largest relative difference {worst:.1e} ({where}), tolerance "
                f"{REL_TOL[name]:g}"
            )
    else:
        PINNED.write_text(json.dumps({n: history(a) for n, a in RUNS.items()}, indent=0) + "\n")
        print(f"wrote {PINNED}")
