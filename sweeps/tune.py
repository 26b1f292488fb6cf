"""python sweeps/tune.py sweep=<space> [run overrides ...] [sweep.<key>=<value> ...]

An Optuna study whose trials are FCE runs, each logged to MLflow under one parent run:

    python sweeps/tune.py sweep=threshold_lr dataset=spiral flow=maf train.max_steps=2000
    python sweeps/tune.py sweep=threshold_lr sweep.n_trials=40 sweep.n_jobs=2  # continue it

Search spaces are sweeps/spaces/<space>.yaml; study settings are sweeps/defaults.yaml.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from fce.cli import (
    check_group_choices,
    check_store,
    check_study_storage,
    check_writable_dir,
    fail,
    one_line,
)
from fce.config import ConfigError
from fce.tracking import TrackingError, tracking_uri

ROOT = Path(__file__).resolve().parents[1]

CONF = ROOT / "conf"
SPACES = ROOT / "sweeps" / "spaces"
DEFAULTS = ROOT / "sweeps" / "defaults.yaml"


def make_composer():
    """The project's config composer (``fce.compose``): Hydra initialised once per process."""
    from fce.compose import compose

    return compose


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s"
    )


def stop_on_sigterm() -> None:
    """SIGTERM (``kill``, a scheduler's stop) ends the study the way Ctrl-C does.

    By default it would end the driver at once and leave its workers training, orphaned.
    Raised as ``RunInterrupted`` (a KeyboardInterrupt): the driver stops its workers, the
    parent run ends KILLED, and the exit code is 143. During a trial in this process, the
    run's own handler takes over and stops at the next step boundary.
    """
    from fce.interrupts import RunInterrupted

    def handler(signum: int, _frame: object) -> None:
        raise RunInterrupted(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def watch_parent(interval_s: float = 2.0) -> None:
    """A worker whose driver died (even by SIGKILL) stops itself as if sent SIGTERM."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def worker_entry(plan, worker: int, n_trials: int) -> None:
    """One worker process of a parallel study (spawned: a fresh interpreter)."""
    setup_logging()
    stop_on_sigterm()
    watch_parent()
    from fce.sweep import run_worker

    run_worker(plan, worker, n_trials, make_composer())


def main(argv: list[str]) -> None:
    names = [a.split("=", 1)[1] for a in argv if a.startswith("sweep=")]
    sweep_overrides = [a.removeprefix("sweep.") for a in argv if a.startswith("sweep.")]
    run_overrides = [a for a in argv if not a.startswith(("sweep=", "sweep."))]
    if len(names) != 1:
        spaces = ", ".join(sorted(p.stem for p in SPACES.glob("*.yaml")))
        fail(f"sweep=<space> is required once; choose one of: {spaces}")
    check_group_choices(run_overrides, CONF)
    setup_logging()
    try:
        from fce.sweep_space import check_space_against_run, load_sweep

        settings = load_sweep(names[0], SPACES, DEFAULTS, sweep_overrides)
        compose = make_composer()
        try:
            compose(run_overrides)
        except Exception as error:  # composition: unknown key, wrong type
            raise ConfigError(one_line(error)) from None
        check_space_against_run(settings, compose, run_overrides)
        uri = compose(run_overrides).tracking.get("uri")
        check_store(uri)
        check_study_storage(
            settings.storage or f"sqlite:///{(ROOT / 'optuna.db').resolve()}",
            tracking_uri(uri, ROOT),
        )
        if str(settings.storage).startswith("sqlite:///"):
            database = Path(settings.storage.removeprefix("sqlite:///"))
            check_writable_dir(f"sweep.storage={settings.storage}", str(database.parent))
        # Only now the heavy imports (torch, optuna, mlflow).
        from fce.sweep import run_study

        stop_on_sigterm()
        # Trial output directories sit under the working directory, as Hydra's do.
        sweep_root = Path.cwd().resolve() / "multirun" / "optuna"
        run_study(settings, run_overrides, compose, ROOT, CONF, sweep_root, worker_entry)
    except (ConfigError, TrackingError) as error:
        fail(str(error))
    except KeyboardInterrupt as interrupt:
        print(
            "interrupted: finished trials are kept; rerun the command to continue", file=sys.stderr
        )
        raise SystemExit(getattr(interrupt, "exit_code", 130)) from None


if __name__ == "__main__":
    main(sys.argv[1:])
