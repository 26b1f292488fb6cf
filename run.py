"""python run.py [group=option ...] [key=value ...]: one FCE run, logged to MLflow.

`python run.py -m dataset=8gaussians,pinwheel flow=glow,maf seed=0,1,2` runs a grid.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fce.cli import fail, preflight
from fce.config import ConfigError, register_configs, validate

ROOT = Path(__file__).resolve().parent
register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        validate(cfg)
    except ConfigError as error:
        fail(str(error))
    # torch and mlflow load only once the input is known to be good.
    from hydra.core.hydra_config import HydraConfig

    from fce.experiment import RunContext, RunInterrupted, run
    from fce.train import DivergenceError

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode.name == "MULTIRUN"
    # A grid's runs share its sweep_id, so MLflow and pandas can group them.
    tags = {"sweep_id": hydra_cfg.sweep.dir, "job_num": str(hydra_cfg.job.num)} if multirun else {}
    context = RunContext(
        output_dir=Path(hydra_cfg.runtime.output_dir),
        project_root=ROOT,
        overrides=list(hydra_cfg.overrides.task),
        tags=tags,
    )
    try:
        metrics = run(cfg, context)
    except ConfigError as error:
        fail(str(error))
    except DivergenceError as error:
        if not multirun:
            fail(str(error), code=1)
        logging.getLogger("fce").error("job %s: %s", hydra_cfg.job.num, error)
        return math.nan  # the grid goes on; the run is FAILED in MLflow
    except RunInterrupted as interrupt:
        raise SystemExit(interrupt.exit_code) from None
    except KeyboardInterrupt:  # before the MLflow run existed: nothing to end or save
        fail("interrupted before the run started", code=130)
    return metrics["nll_flow" if cfg.estimator.name == "flow_mle" else "nll_ebm"]


if __name__ == "__main__":
    preflight(sys.argv[1:], ROOT / "conf")
    main()
