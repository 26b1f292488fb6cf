"""FCE against the baselines it claims to beat, on the six datasets: one command, one table.

    python sweeps/compare.py                          # 6 datasets x fce,nce,flow_mle x seeds 0,1,2
    python sweeps/compare.py --seeds 0 1 --datasets 8gaussians rings train.max_steps=2000
    python sweeps/compare.py --report-only            # table and figure from runs already logged

The runs are one Hydra multirun of run.py (joblib launcher, --jobs processes) in the MLflow
experiment ``compare``. Every run gets the same budget of training steps (the config's
epochs / max_steps): FCE splits it between the EBM and the flow by its threshold rule, NCE
gives every step to the EBM (against a Gaussian fitted to the data), flow_mle every step to
the flow. Then analysis/compare.py writes the table (compare.md, compare.csv) and the figure
(compare.png) to docs/figures/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fce.cli import fail  # noqa: E402
from fce.config import DATASET_NAMES, ESTIMATOR_NAMES, FLOW_NAMES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Any other argument is a run.py override, applied to every run.",
    )
    parser.add_argument("--datasets", nargs="+", default=list(DATASET_NAMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--flow", default="glow", help=f"one of {', '.join(FLOW_NAMES)}")
    parser.add_argument("--jobs", type=int, default=2, help="parallel runs (1 thread each)")
    parser.add_argument("--experiment", default="compare", help="MLflow experiment")
    parser.add_argument("--uri", default=None, help="MLflow store (default: the project's)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument(
        "--report-only", action="store_true", help="skip the runs; report the logged ones"
    )
    args, overrides = parser.parse_known_args()
    for dataset in args.datasets:
        if dataset not in DATASET_NAMES:
            fail(f"--datasets {dataset}: unknown; choose from {', '.join(DATASET_NAMES)}")
    if args.flow not in FLOW_NAMES:
        fail(f"--flow {args.flow}: unknown; choose one of {', '.join(FLOW_NAMES)}")
    if args.jobs < 1 or not args.seeds:
        fail(f"--jobs {args.jobs} --seeds {args.seeds}: need jobs >= 1 and at least one seed")
    bad = [o for o in overrides if o.startswith("-") or "=" not in o]
    if bad:
        fail(f"{bad[0]}: not an option of compare.py nor a key=value override of run.py")
    tracking = [f"tracking.experiment={args.experiment}"]
    if args.uri:
        tracking.append(f"tracking.uri={args.uri}")
    if not args.report_only:
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
        command = [
            sys.executable,
            str(ROOT / "run.py"),
            "-m",
            f"estimator={','.join(ESTIMATOR_NAMES)}",
            f"dataset={','.join(args.datasets)}",
            f"seed={','.join(map(str, args.seeds))}",
            f"flow={args.flow}",
            "hydra/launcher=joblib",
            f"hydra.launcher.n_jobs={args.jobs}",
            f"hydra.sweep.dir=multirun/compare/{stamp}",
            "hydra.sweep.subdir=${hydra.job.num}_${dataset.name}_${estimator.name}_s${seed}",
            "progress=none",
            *tracking,
            *overrides,
        ]
        n_runs = len(args.datasets) * len(args.seeds) * len(ESTIMATOR_NAMES)
        print(f"{n_runs} runs, {args.jobs} at a time: {' '.join(command[1:])}", flush=True)
        done = subprocess.run(command, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(done.returncode)

    from analysis.compare import write_report

    write_report(args.uri, args.experiment, args.out, flow=args.flow, datasets=args.datasets)


if __name__ == "__main__":
    main()
