"""python sweeps/tune.py sweep=<space> [run overrides ...] [sweep.<key>=<value> ...]

An Optuna study whose trials are FCE runs, each tracked under one parent run:

    python sweeps/tune.py sweep=threshold_lr dataset=spiral flow=maf train.max_steps=2000
    python sweeps/tune.py sweep=threshold_lr sweep.n_trials=40 sweep.n_jobs=2  # continue it

Search spaces are sweeps/spaces/<space>.yaml (or any YAML file: sweep=path/to/space.yaml);
study settings are sweeps/defaults.yaml; run overrides are those of `python run.py --help`.
Ctrl-C or SIGTERM stops every trial at its next step (exit 130 or 143); a worker that dies
has its trial failed while the others go on, and the driver then exits 1. `sweep.n_trials`
counts finished trials (COMPLETE, PRUNED, or FAIL by their own run), not killed ones; a
command none of whose trials completed exits 1. A continuation with other run settings is
refused (exit 2): another study needs another `sweep.study_name`.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

from fce.compose import composition_error
from fce.config import CONF_DIR, ConfigError
from fce.errors import fail
from fce.preflight import (
    check_group_choices,
    check_store,
    check_study_storage,
    check_writable_dir,
)
from fce.signals import SignalRecorder
from fce.tracking import TrackingError, tracking_uri

ROOT = CONF_DIR.parent

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


def worker_entry(plan, worker: int, stop_event) -> None:
    """One worker process of a parallel study (spawned: a fresh interpreter). Exits 130 or
    143 when a signal, or the driver through ``stop_event``, stopped it."""
    stop = SignalRecorder().install()
    setup_logging()
    from fce.interrupts import sigterm_when_orphaned

    sigterm_when_orphaned()  # its driver died (even by SIGKILL): stop as if sent SIGTERM
    from fce.sweep import run_worker

    def stopping() -> int | None:
        return stop() or (signal.SIGTERM if stop_event.is_set() else None)

    signum = run_worker(plan, worker, make_composer(), stopping)
    if signum is not None:
        raise SystemExit(128 + signum)


def usage() -> str:
    from omegaconf import OmegaConf

    spaces = []
    for path in sorted(SPACES.glob("*.yaml")):
        try:
            searched = ", ".join(OmegaConf.load(path).get("params", {}))
        except Exception:  # a broken space is reported when it is used
            searched = "(not valid YAML)"
        spaces.append(f"  {path.stem:<14} {searched}")
    settings = [f"  {line}" for line in DEFAULTS.read_text().splitlines() if line.strip()]
    return "\n".join(
        [
            f"usage: {(__doc__ or '').strip()}",
            "",
            f"Search spaces ({SPACES.relative_to(ROOT)}/, sweep=<name>):",
            *spaces,
            "",
            f"Study settings ({DEFAULTS.relative_to(ROOT)}, sweep.<key>=<value>):",
            *settings,
        ]
    )


def main(argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return
    stop = SignalRecorder().install()
    names = [a.split("=", 1)[1] for a in argv if a.startswith("sweep=")]
    sweep_overrides = [a.removeprefix("sweep.") for a in argv if a.startswith("sweep.")]
    run_overrides = [a for a in argv if not a.startswith(("sweep=", "sweep."))]
    if len(names) != 1:
        spaces = ", ".join(sorted(p.stem for p in SPACES.glob("*.yaml")))
        fail(f"sweep=<space> is required once; choose one of: {spaces} (--help for more)")
    check_group_choices(run_overrides, CONF_DIR)
    setup_logging()
    try:
        from fce.sweep_space import check_space_against_run, load_sweep

        settings = load_sweep(names[0], SPACES, DEFAULTS, sweep_overrides)
        compose = make_composer()
        try:
            compose(run_overrides)
        except Exception as error:  # composition: unknown key, wrong type
            raise ConfigError(composition_error(error)) from None
        check_space_against_run(settings, compose, run_overrides, CONF_DIR)
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
        from fce.interrupts import RunInterrupted
        from fce.sweep import SweepError, run_study

        if stop() is not None:
            raise RunInterrupted(128 + stop())
        # Trial output directories sit under the working directory, as Hydra's do.
        sweep_root = Path.cwd().resolve() / "multirun" / "optuna"
        try:
            run_study(settings, run_overrides, compose, ROOT, sweep_root, worker_entry, stop)
        except SweepError as error:
            fail(str(error), code=1)
    except (ConfigError, TrackingError) as error:
        fail(str(error))
    except KeyboardInterrupt as interrupt:
        print(
            "interrupted: finished trials are kept; rerun the command to continue", file=sys.stderr
        )
        raise SystemExit(getattr(interrupt, "exit_code", 130)) from None
