"""python run.py [group=option ...] [key=value ...]: one FCE run, logged to MLflow.

`python run.py -m dataset=8gaussians,pinwheel flow=glow,maf seed=0,1,2` runs a grid.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from fce.cli import launch, run_job
from fce.config import register_configs

ROOT = Path(__file__).resolve().parent
register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return run_job(cfg, ROOT)


if __name__ == "__main__":
    launch(main, ROOT / "conf")
