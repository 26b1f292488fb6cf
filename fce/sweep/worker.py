"""One worker process of a study: it takes trials until the study has its total, each an
FCE run logged as a child of the study's tracked run."""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path

import optuna
from omegaconf import OmegaConf

from fce.compose import composition_error
from fce.config import validate
from fce.errors import ConfigError
from fce.interrupts import RunInterrupted
from fce.names import NEEDS_LOG_Z
from fce.sweep.locks import study_lock
from fce.sweep.study import (
    ENDED_ATTR,
    Stopping,
    StudyPlan,
    budget_used,
    heartbeat,
    make_pruner,
    make_sampler,
    make_storage,
)
from fce.sweep.trials import suggest, trial_run_name
from fce.sweep_space import Composer
from fce.tracking import (
    MAX_TAG_LENGTH,
    RUN_ID_ATTR,
    TrackingError,
    check_reachable,
    child_tags,
    open_run,
    set_run_status,
)
from fce.tracking.housekeeping import process_identity
from fce.train import RunContext, RunFault, run
from fce.trainer import DivergenceError, StopRun

log = logging.getLogger("fce.sweep")


TRACKING_WAIT_S = 180.0


def wait_for_tracking(uri: str | None, timeout_s: float = TRACKING_WAIT_S) -> None:
    """Before a trial: a tracking server that is restarting is waited for, with a bound, and
    the trial fails (``ConfigError``) if it does not come back. Without this each trial would
    fail at once while the server is down, and a worker would burn through the study."""
    if uri is None:  # tracking=none
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check_reachable(uri)
            return
        except TrackingError as error:
            if time.monotonic() > deadline:
                raise ConfigError(str(error)) from None
            log.warning("%s; retrying in 2s", error)
            time.sleep(2.0)


def end_trial_run(uri: str | None, run_id: str, state: optuna.trial.TrialState) -> None:
    """Tag a trial's tracked run with its Optuna state; a failed trial's run still RUNNING
    (its end was lost to a tracking server that was down) is ended FAILED, once the server
    answers again. A store that stays away is logged, not raised: the study goes on."""
    failed = state == optuna.trial.TrialState.FAIL
    try:
        wait_for_tracking(uri)
        tags = {"optuna.state": state.name}
        set_run_status(uri, run_id, "FAILED" if failed else None, tags, if_running=True)
    except Exception as error:
        log.warning("tracked run %s: could not record its trial's end (%s)", run_id, error)


def record_refused_trial(plan: StudyPlan, trial: optuna.Trial, reason: str) -> None:
    """A trial refused before its run started (a combination of values the config rejects)
    still gets its tracked child run, FAILED with the reason, so that the parent's children
    and the study's trials agree. A store that cannot take it is logged, not raised."""
    if plan.tracking_uri is None or plan.parent_run_id is None:
        return
    tags = {
        "optuna.study": plan.study_name,
        "optuna.trial": str(trial.number),
        "optuna.state": optuna.trial.TrialState.FAIL.name,
        "fce.error": reason[:MAX_TAG_LENGTH],
    }
    try:
        tracker = open_run(
            plan.tracking_uri,
            plan.experiment,
            run_name=trial_run_name(trial.number, trial.params),
            tags=tags,
            parent_run_id=plan.parent_run_id,
        )
        trial.set_user_attr(RUN_ID_ATTR, tracker.run_id)
        tracker.finish("FAILED")
    except TrackingError as error:
        log.warning("trial %d: could not record its refusal (%s)", trial.number, error)


def run_worker(plan: StudyPlan, worker: int, compose: Composer, stopping: Stopping) -> int | None:
    """Run trials of the study in this process until ``n_trials`` of them are finished.

    Before each trial the study's finished and running trials are counted under the study
    lock (``budget_used``), and the trial is created under it too, so workers of any number
    of drivers stop at ``n_trials`` exactly; a trial cut off from outside does not count.

    Returns:
        The signal number if SIGINT or SIGTERM stopped the worker (its trial in flight FAIL,
        the trial's tracked run KILLED), None once the study has its trials.
    """
    settings = OmegaConf.create(plan.settings)
    first = compose(plan.base_overrides)
    storage = make_storage(plan.storage, settings.heartbeat_s, plan.tracking_uri)
    study = optuna.load_study(
        study_name=plan.study_name,
        storage=storage,
        sampler=make_sampler(settings, worker, plan.trials_before, plan.driver),
        pruner=make_pruner(settings, first.train.eval_every),
    )
    study_id = storage.get_study_id_from_name(plan.study_name)
    interrupted: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        """The trial's objective; NaN (FAIL, the study goes on) for a config error, a
        divergence or a fault of its disk or store, with the reason in its ``error`` user
        attribute."""
        overrides = [*plan.base_overrides, *suggest(trial, settings.params), "progress=none"]
        output_dir = Path(plan.sweep_dir) / f"trial_{trial.number:04d}"
        trial.set_user_attr("fce.output_dir", str(output_dir))
        try:
            wait_for_tracking(plan.tracking_uri)
            try:
                cfg = compose(overrides)
            except Exception as error:  # a combination the space check could not foresee
                raise ConfigError(composition_error(error)) from None
            validate(cfg)
            if "run_name" in cfg.tracking:  # tracking=none names no run
                cfg.tracking.run_name = trial_run_name(
                    trial.number, trial.params, cfg.tracking.run_name
                )

            def report(step: int, metrics: dict[str, float]) -> None:
                signum = stopping()
                if signum is not None:  # a signal that came before the run could note it
                    raise RunInterrupted(128 + signum)
                if settings.objective not in metrics:  # an untrusted log Z (above 2-D)
                    return
                trial.report(metrics[settings.objective], step)
                if trial.should_prune():
                    raise StopRun(f"pruned at step {step}")

            parent = child_tags(plan.parent_run_id)
            context = RunContext(
                output_dir=output_dir,
                project_root=Path(plan.project_root),
                overrides=overrides,
                tags={
                    **parent,
                    "optuna.study": plan.study_name,
                    "optuna.trial": str(trial.number),
                },
                on_eval=report,
                on_run_created=lambda run_id: trial.set_user_attr(RUN_ID_ATTR, run_id),
            )
            metrics = run(cfg, context)
        except (DivergenceError, ConfigError, RunFault) as error:  # RunFault: its disk or store
            trial.set_user_attr("error", str(error))
            log.error("trial %d failed: %s", trial.number, error)
            if RUN_ID_ATTR not in trial.user_attrs:  # refused before its run started
                record_refused_trial(plan, trial, str(error))
            return math.nan
        if settings.objective not in metrics:
            why = f"sweep.objective={settings.objective}: not reported at the end"
            if settings.objective in NEEDS_LOG_Z:
                why += (
                    "; its log Z estimate's effective sample size (logz_ess, and "
                    "logz_ais_ess where annealing ran) was below eval.min_ess"
                )
            trial.set_user_attr("error", why)
            log.error("trial %d failed: %s", trial.number, why)
            return math.nan
        return metrics[settings.objective]

    def run_one(trial: optuna.Trial) -> None:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        value, state = None, optuna.trial.TrialState.FAIL
        with heartbeat(storage, trial_id, settings.heartbeat_s):
            try:
                value = objective(trial)
                trial.set_user_attr(ENDED_ATTR, True)
                if math.isfinite(value):
                    state = optuna.trial.TrialState.COMPLETE
            except StopRun:
                trial.set_user_attr(ENDED_ATTR, True)
                state = optuna.trial.TrialState.PRUNED
            except optuna.exceptions.StorageInternalError as error:
                # The database went away mid-trial (a restart outlasting the reconnects): this
                # trial fails, the worker goes on to the next.
                log.error("trial %d failed: the study's database: %s", trial.number, error)
            except KeyboardInterrupt as interrupt:  # the run ended KILLED, checkpoint saved
                signum = getattr(interrupt, "exit_code", 128 + signal.SIGINT) - 128
                interrupted.append(signum)
                trial.set_user_attr("error", f"interrupted by {signal.Signals(signum).name}")
            except BaseException:
                study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
                raise
        complete = state == optuna.trial.TrialState.COMPLETE
        # Skipped if the trial was failed meanwhile (its worker thought dead, its beat stale).
        study.tell(trial, value if complete else None, state=state, skip_if_finished=True)
        done = f" {settings.objective}={value:.4g}" if complete else ""
        log.info("trial %d %s%s", trial.number, state.name, done)
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id and plan.tracking_uri:
            end_trial_run(plan.tracking_uri, run_id, state)

    while not interrupted and stopping() is None:
        optuna.storages.fail_stale_trials(study)
        with study_lock(storage, plan.storage, plan.study_name):
            if budget_used(study) >= settings.n_trials:
                return None
            trial = study.ask()
            trial.set_user_attr("fce.worker", process_identity())
            trial.set_user_attr("fce.driver", plan.driver)
        run_one(trial)
    return interrupted[0] if interrupted else stopping()
