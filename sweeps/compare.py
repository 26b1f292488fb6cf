"""FCE against the baselines it claims to beat, on the six datasets: one command, one table.

    python sweeps/compare.py                          # 6 datasets x 4 estimators x seeds 0,1,2
    python sweeps/compare.py --seeds 0 1 --datasets 8gaussians rings train.max_steps=2000
    python sweeps/compare.py --estimators mle         # add one estimator's runs to the others'
    python sweeps/compare.py --report-only            # table and figure from runs already logged

The runs are one Hydra multirun of run.py (joblib launcher, --jobs processes) in the MLflow
experiment ``compare``. Every run gets the same budget of training steps (the config's
epochs / max_steps): FCE splits it between the EBM and the flow by its threshold rule, NCE
gives every step to the EBM (against a Gaussian fitted to the data), mle every step to the
EBM by exact maximum likelihood (the ceiling of the two), flow_mle every step to the flow.
The report takes, per dataset and estimator, the newest group of runs, so runs of one
estimator added later stand beside the others'. Then analysis/compare.py writes the table
(compare.md, compare.csv) and the figure (compare.png) to docs/figures/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fce.cli import fail
from fce.config import DATASET_NAMES, ESTIMATOR_NAMES, FLOW_NAMES

ROOT = Path(__file__).resolve().parents[1]


class ListUntilOverride(argparse.Action):
    """A list option (``--datasets a b``) whose values stop at run.py's overrides.

    ``--datasets 8gaussians rings train.max_steps=2000``: a dataset name never holds ``=``, an
    override always does, so the override goes to run.py, not into the list.
    """

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, [v for v in values if "=" not in v])
        namespace.overrides = [*namespace.overrides, *(v for v in values if "=" in v)]


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """compare.py's own arguments, and the run.py overrides (``key=value``) among them."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Any other argument is a run.py override (key=value), applied to every run.",
    )
    parser.set_defaults(overrides=[])
    parser.add_argument(
        "--datasets", nargs="+", action=ListUntilOverride, default=list(DATASET_NAMES)
    )
    parser.add_argument("--seeds", nargs="+", action=ListUntilOverride, default=["0", "1", "2"])
    parser.add_argument(
        "--estimators", nargs="+", action=ListUntilOverride, default=list(ESTIMATOR_NAMES)
    )
    parser.add_argument("--flow", default="glow", help=f"one of {', '.join(FLOW_NAMES)}")
    parser.add_argument("--jobs", type=int, default=2, help="parallel runs (1 thread each)")
    parser.add_argument("--experiment", default="compare", help="MLflow experiment")
    parser.add_argument("--uri", default=None, help="MLflow store (default: the project's)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument(
        "--report-only", action="store_true", help="skip the runs; report the logged ones"
    )
    args, rest = parser.parse_known_args(argv)
    overrides = [*args.overrides, *rest]
    for seed in args.seeds:
        if not seed.lstrip("-").isdigit():
            fail(f"--seeds {seed}: not an integer; seeds are integers, e.g. --seeds 0 1 2")
    args.seeds = [int(seed) for seed in args.seeds]
    if not args.datasets:
        fail(f"--datasets: no dataset given; choose from {', '.join(DATASET_NAMES)}")
    for dataset in args.datasets:
        if dataset not in DATASET_NAMES:
            fail(f"--datasets {dataset}: unknown; choose from {', '.join(DATASET_NAMES)}")
    if not args.estimators:
        fail(f"--estimators: none given; choose from {', '.join(ESTIMATOR_NAMES)}")
    for estimator in args.estimators:
        if estimator not in ESTIMATOR_NAMES:
            fail(f"--estimators {estimator}: unknown; choose from {', '.join(ESTIMATOR_NAMES)}")
    if args.flow not in FLOW_NAMES:
        fail(f"--flow {args.flow}: unknown; choose one of {', '.join(FLOW_NAMES)}")
    if args.jobs < 1 or not args.seeds:
        fail(f"--jobs {args.jobs} --seeds {args.seeds}: need jobs >= 1 and at least one seed")
    bad = [o for o in overrides if o.startswith("-") or "=" not in o]
    if bad:
        fail(f"{bad[0]}: not an option of compare.py nor a key=value override of run.py")
    return args, overrides


def main() -> None:
    args, overrides = parse_args()
    tracking = [f"tracking.experiment={args.experiment}"]
    if args.uri:
        tracking.append(f"tracking.uri={args.uri}")
    if not args.report_only:
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
        command = [
            sys.executable,
            str(ROOT / "run.py"),
            "-m",
            f"estimator={','.join(args.estimators)}",
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
        n_runs = len(args.datasets) * len(args.seeds) * len(args.estimators)
        print(f"{n_runs} runs, {args.jobs} at a time: {' '.join(command[1:])}", flush=True)
        done = subprocess.run(command, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(done.returncode)

    from analysis.compare import write_report

    write_report(args.uri, args.experiment, args.out, flow=args.flow, datasets=args.datasets)


if __name__ == "__main__":
    main()
