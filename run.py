"""python run.py [group=option ...] [key=value ...]: one FCE run, logged to MLflow.

`python run.py -m dataset=8gaussians,pinwheel flow=glow,maf seed=0,1,2` runs a grid.
"""

import sys
from pathlib import Path

from fce.cli import exit_quietly_on_signals, preflight, resume_in_place, run_job, with_saved_run

exit_quietly_on_signals()  # until a run installs its own handlers: no traceback on Ctrl-C

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fce.config import register_configs  # noqa: E402

ROOT = Path(__file__).resolve().parent
register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return run_job(cfg, ROOT)


if __name__ == "__main__":
    sys.argv[1:] = with_saved_run(sys.argv[1:], ROOT / "conf")
    sys.argv += resume_in_place(sys.argv[1:])
    preflight(sys.argv[1:], ROOT / "conf")
    main()
