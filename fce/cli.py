"""The Hydra job body of ``run.py``: check the command line before torch loads, then run each
job once and map its failures to one line and an exit code.

Torch-free at import: ``launch`` runs the checks of ``fce.preflight`` (one line, exit code 2)
before ``@hydra.main`` composes the job; torch and mlflow load in ``run_job`` only once its
config is known to be good.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from fce.compose import composition_error
from fce.config import name_options, validate
from fce.errors import EXIT_FAILED, ConfigError, fail, first_line
from fce.preflight import (
    SingleRunChecks,
    check_group_choices,
    command_mode,
    exit_quietly_on_signals,
    preflight,
    resume_in_place,
    with_saved_run,
)

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = ["fail", "launch", "run_job"]

# Whether a job of this process has started (``run_job``): an exception before it is
# Hydra's composition of the command line.
_started = False
# HYDRA_FULL_ERROR as it was before ``launch`` set it for the composition ("": unset; None:
# launch did not set it).
_full_error: str | None = None


def launch(main: Callable[[], object], conf_dir: Path) -> None:
    """Run ``main`` (a ``@hydra.main`` function) on this process's command line, checked first.

    A Ctrl-C before the run exists is one line; ``train.resume=<run>`` gets the saved run's
    settings (``with_saved_run``) and, for a run directory, its directory as Hydra's. A grid's
    every value is composed and validated before any job starts (``preflight``). A single run
    is composed by Hydra alone and checked on that config (``SingleRunChecks``); what Hydra
    cannot compose is one line here, not its multi-line report.
    """
    global _full_error
    exit_quietly_on_signals()  # until a run installs its own handlers: no traceback on Ctrl-C
    argv = with_saved_run(sys.argv[1:], conf_dir)
    argv += resume_in_place(argv)
    sys.argv[1:] = argv  # Hydra reads its command line from sys.argv
    if command_mode(argv) != "run":
        preflight(argv, conf_dir)
        main()
        return
    check_group_choices([a for a in argv if not a.startswith("-")], conf_dir)  # ~group too
    # Until the job starts, Hydra raises what it fails on instead of reporting it.
    _full_error = os.environ.get("HYDRA_FULL_ERROR", "")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as error:
        if _started:
            raise  # the run's own failures are mapped in run_job; this is a defect
        if isinstance(error, OSError):  # a fault, not the input: Hydra writing its files
            fail(f"{error.strerror or first_line(error)}: {error.filename}", code=EXIT_FAILED)
        fail(composition_error(error))


def _job_started() -> None:
    """From here a failure is the run's: Hydra reports what run_job does not map, as ever."""
    global _started, _full_error
    _started = True
    if _full_error == "":
        os.environ.pop("HYDRA_FULL_ERROR", None)
    elif _full_error is not None:
        os.environ["HYDRA_FULL_ERROR"] = _full_error
    _full_error = None


def run_job(cfg: DictConfig, project_root: Path) -> float:
    """The body of ``run.py``'s Hydra job: validate, run, and map failures to exit codes.

    Returns the objective a Hydra sweeper would minimise: the estimator's ``score_metric``
    (the EBM's test NLL; the flow's where only the flow trains). In a multirun a diverged job
    returns NaN and the grid goes on.
    """
    from hydra.core.hydra_config import HydraConfig

    _job_started()
    hydra_cfg = HydraConfig.get()
    try:
        name_options(cfg, hydra_cfg.runtime.choices)
    except ConfigError as error:
        remove_if_unused(Path(hydra_cfg.runtime.output_dir))
        fail(str(error))
    # As typed: a value may interpolate a node's name (``tracking.run_name=x-${flow.name}``),
    # which Hydra's own copy of the config never gets.
    overrides = list(OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False))
    if not SingleRunChecks.done:  # a grid's job: the grid's preflight checked its values
        try:
            validate(cfg)
        except ConfigError as error:
            remove_if_unused(Path(hydra_cfg.runtime.output_dir))
            fail(str(error))
    # torch and mlflow load only once the input is known to be good.
    from hydra.utils import get_class

    from fce.grid import swept_values
    from fce.interrupts import RunInterrupted, running, stop_when_orphaned
    from fce.train import RunContext, RunFault, run
    from fce.trainer import DivergenceError

    multirun = hydra_cfg.mode.name == "MULTIRUN"
    if multirun and multiprocessing.current_process().name != "MainProcess":
        stop_when_orphaned()  # a launcher's worker process (joblib): it dies with its launcher
    output_dir = Path(hydra_cfg.runtime.output_dir)
    # A grid's runs share its sweep_id, so the tracking store and pandas can group them.
    tags = {"sweep_id": hydra_cfg.sweep.dir, "job_num": str(hydra_cfg.job.num)} if multirun else {}
    context = RunContext(
        output_dir=output_dir,
        project_root=project_root,
        overrides=overrides,
        tags=tags,
        # Jobs that differ by a swept learning rate (say) get names that differ by it too.
        name_suffix=" ".join(swept_values(Path(hydra_cfg.sweep.dir), overrides))
        if multirun
        else "",
    )
    running.set()
    try:
        metrics = run(cfg, context)
    except ConfigError as error:
        if not resumes_in(cfg, output_dir):  # a run's own directory stays, to resume later
            remove_if_unused(output_dir)
        fail(str(error))
    except DivergenceError as error:
        if not multirun:
            fail(str(error), code=EXIT_FAILED)
        logging.getLogger("fce").error("job %s: %s", hydra_cfg.job.num, error)
        return math.nan  # the grid goes on; the run is FAILED in its store
    except RunFault as error:  # a full disk, a locked store, a dead server: the grid stops too
        fail(str(error), code=EXIT_FAILED)
    except RunInterrupted as interrupt:
        raise SystemExit(interrupt.exit_code) from None
    except KeyboardInterrupt:  # before the tracked run existed: nothing to end or save
        remove_if_unused(output_dir)
        fail("interrupted before the run started", code=130)
    finally:
        running.clear()
    # Above 2-D a metric that needs the EBM's log Z is absent where its estimate is not
    # trusted (its ESS below eval.min_ess): no score then.
    return metrics.get(get_class(cfg.estimator._target_).score_metric, math.nan)


def resumes_in(cfg: DictConfig, output_dir: Path) -> bool:
    """Whether ``train.resume`` names ``output_dir`` (the run directory, its checkpoints/ or a
    checkpoint in it)."""
    if not cfg.train.resume:
        return False
    target = Path(cfg.train.resume).expanduser().resolve()
    return output_dir.resolve() in (target, target.parent, target.parent.parent)


def remove_if_unused(output_dir: Path) -> None:
    """Remove a run directory that holds nothing but Hydra's own files (a run that never
    started): bad input leaves no empty folder behind."""
    hydra_files = {".hydra", ".lock", "run.log", f"{Path(sys.argv[0]).stem}.log"}
    if output_dir.is_dir() and {p.name for p in output_dir.iterdir()} <= hydra_files:
        shutil.rmtree(output_dir, ignore_errors=True)
