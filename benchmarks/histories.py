"""Every logged metric at every step of four short runs, to check a change alters no number.

    python benchmarks/histories.py --out before.json        # on the old code
    python benchmarks/histories.py --out after.json         # on the new code
    python benchmarks/histories.py --compare before.json after.json

The four runs cover both flows and the three estimators. Each runs in its own process
against a throw-away MLflow store; the history is read back from that store, so the check
covers what a user sees, not an in-memory copy. ``wall_time_s`` is left out (a clock).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["train.max_steps=400", "train.eval_every=100", "train.checkpoint_every=0"]
RUNS = {
    "pinwheel-glow-fce-s3": ["dataset=pinwheel", "flow=glow", "estimator=fce", "seed=3"],
    "8gaussians-maf-fce-s5": ["dataset=8gaussians", "flow=maf", "estimator=fce", "seed=5"],
    "2spirals-glow-nce-s1": ["dataset=2spirals", "flow=glow", "estimator=nce", "seed=1"],
    "rings-maf-flow_mle-s2": ["dataset=rings", "flow=maf", "estimator=flow_mle", "seed=2"],
}
CLOCKS = ("wall_time_s",)


def history(args: list[str]) -> dict[str, list[list[float]]]:
    """Run ``python run.py *args`` and return {metric: [[step, value], ...]} from its store."""
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        command = [
            sys.executable,
            str(ROOT / "run.py"),
            *args,
            *COMMON,
            f"tracking.uri={uri}",
            f"hydra.run.dir={tmp}/out",
            "progress=none",
        ]
        subprocess.run(command, check=True, cwd=tmp, capture_output=True)
        client = MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name("fce").experiment_id])
        return {
            name: sorted(
                [m.step, m.value] for m in client.get_metric_history(run.info.run_id, name)
            )
            for name in sorted(run.data.metrics)
            if name not in CLOCKS
        }


def compare(before: dict, after: dict) -> float:
    """The largest relative difference of any metric at any step; raises if keys differ."""
    worst = 0.0
    for run, metrics in before.items():
        if set(metrics) != set(after[run]):
            raise SystemExit(f"{run}: metrics differ: {sorted(set(metrics) ^ set(after[run]))}")
        for name, rows in metrics.items():
            other = after[run][name]
            if [s for s, _ in rows] != [s for s, _ in other]:
                raise SystemExit(f"{run}/{name}: logged at other steps")
            for (_, a), (_, b) in zip(rows, other, strict=True):
                worst = max(worst, abs(a - b) / max(abs(a), abs(b), 1e-12))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the histories here (JSON)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        worst = compare(before, after)
        count = sum(len(rows) for m in before.values() for rows in m.values())
        print(f"{count} logged values compared; largest relative difference {worst:.3g}")
        raise SystemExit(0 if worst <= 1e-6 else 1)
    if args.out is None:
        parser.error("give --out FILE or --compare BEFORE AFTER")
    histories = {name: history(run_args) for name, run_args in RUNS.items()}
    args.out.write_text(json.dumps(histories, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
