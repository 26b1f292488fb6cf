"""The driver of a study: create or continue it, run its workers as processes and watch
them, and sum it up on the parent run."""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from fce.errors import ConfigError, first_line
from fce.interrupts import RunInterrupted
from fce.sweep.identity import (
    check_same_run,
    default_study_name,
    name_objective,
    run_definition,
    study_uid,
)
from fce.sweep.locks import schema_lock, study_lock
from fce.sweep.study import (
    Stopping,
    StudyPlan,
    budget_used,
    fail_dead_trials,
    fail_trials_of,
    finished,
    make_storage,
)
from fce.sweep.trials import check_same_space
from fce.sweep.worker import run_worker
from fce.sweep_space import Composer
from fce.tracking import (
    PARENT_RUN_ID_ATTR,
    NullTracker,
    Tracker,
    TrackingError,
    check_reachable,
    flatten,
    open_run,
    tracking_uri,
)

log = logging.getLogger("fce.sweep")
# Seconds a stopped worker has to reach a step boundary and end its run before it is killed.
STOP_GRACE_S = 60.0


class SweepError(RuntimeError):
    """The study could not run as asked for a reason other than bad input (a dead worker)."""


def describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


def run_workers(
    plan: StudyPlan,
    n_workers: int,
    worker_entry: Callable[[StudyPlan, int, Any], None],
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    stopping: Stopping,
) -> list[str]:
    """Run the workers as processes and watch them; return what went wrong with any.

    A worker that dies (the out-of-memory killer, a SIGKILL) has its trial failed at once
    and its tracked run marked KILLED; the other workers go on, up to ``n_trials``. On SIGINT
    or SIGTERM the driver tells every worker to stop (an event between trials, SIGTERM
    during one: each ends its run at the next step boundary), and kills any that has not
    stopped within ``STOP_GRACE_S``.
    """
    context = mp.get_context("spawn")
    stop_event = context.Event()
    running = {}
    # Workers start with SIGINT ignored (a Ctrl-C to the process group while they import would
    # be a traceback each) until they install their own handler; the driver tells them.
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for k in range(n_workers):
            process = context.Process(target=worker_entry, args=(plan, k, stop_event))
            process.start()
            running[process.sentinel] = (k, process)
    finally:
        signal.signal(signal.SIGINT, handler)
    problems: list[str] = []
    stop_since: float | None = None
    while running:
        for sentinel in mp.connection.wait(list(running), timeout=0.5):
            k, process = running.pop(sentinel)
            process.join()
            if process.exitcode == 0:
                continue
            what = f"worker {k} (pid {process.pid}) {describe_exit(process.exitcode)}"
            failed = fail_trials_of(study, storage, plan.tracking_uri, process.pid, what)
            if stop_since is not None and process.exitcode in (130, 143, -15):
                continue  # it stopped as told
            if failed:
                what += f"; its trial {', '.join(map(str, failed))} marked FAIL"
            log.error(what)
            problems.append(what)
        if stop_since is None and stopping() is not None:
            stop_since = time.monotonic()
            stop_event.set()
            for _, process in running.values():
                process.terminate()
        elif stop_since is not None and time.monotonic() - stop_since > STOP_GRACE_S:
            for _, process in running.values():
                process.kill()
    return problems


def run_study(
    settings: DictConfig,
    base_overrides: list[str],
    compose: Composer,
    project_root: Path,
    sweep_root: Path,
    worker_entry: Callable[[StudyPlan, int, Any], None],
    stopping: Stopping,
) -> optuna.Study:
    """Create or continue the study and run it until ``settings.n_trials`` trials are
    finished (``fce.sweep.study.finished``).

    The caller has checked the space against the run config (``check_space_against_run``)
    and installed SIGINT/SIGTERM handlers that only record the signal (``stopping``): it is
    acted on here at safe points, never in the middle of a store write.

    Raises:
        ConfigError: the storage cannot be opened, or the study exists with another space,
            direction or run settings; nothing is changed.
        RunInterrupted: SIGINT or SIGTERM; trials in flight FAIL, their runs and the parent
            run KILLED.
        SweepError: a worker process died (its trial FAIL), or no trial this command ran
            finished with a value; the parent run FAILED.
    """
    cfg = compose(base_overrides)
    storage_url = settings.storage or f"sqlite:///{(project_root / 'optuna.db').resolve()}"
    study_name = settings.study_name or default_study_name(settings, cfg)
    definition = run_definition(settings, compose, base_overrides)
    # tracking=none: the trials are scored and kept in the study alone, with no parent run.
    store = tracking_uri(cfg.tracking.uri, project_root) if "uri" in cfg.tracking else None
    try:
        if store is not None:
            check_reachable(store)  # before the study is touched
        # Two drivers creating one storage at once race on its schema (SQLite: alembic's
        # tables; PostgreSQL: "duplicate key ... pg_type_typname_nsp_index").
        with schema_lock(storage_url):
            storage = make_storage(storage_url, settings.heartbeat_s, store)
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            direction=settings.direction,
            load_if_exists=True,
        )
    except TrackingError as error:
        raise ConfigError(str(error)) from None
    except Exception as error:  # a bad URL, an unwritable file, a server that is down
        raise ConfigError(
            f"sweep.storage={storage_url}: cannot open the Optuna storage ({first_line(error)})"
        ) from None
    if study.direction.name.lower() != settings.direction:
        raise ConfigError(
            f"sweep.direction={settings.direction}: study {study_name} already exists with "
            f"direction {study.direction.name.lower()}; use another sweep.study_name"
        )
    where = storage_url.split("@")[-1]
    with study_lock(storage, storage_url, study_name):
        check_same_space(study, settings, where)
        check_same_run(study, definition, where)
        uid = study_uid(study)
        name_objective(study, settings.objective)
    fail_dead_trials(study, storage, store, 3 * settings.heartbeat_s + 2, stopping)
    if stopping() is not None:
        raise RunInterrupted(128 + stopping())

    # Found or created under the lock: two drivers starting at once share one parent run.
    with study_lock(storage, storage_url, study_name):
        parent_id = study.user_attrs.get(PARENT_RUN_ID_ATTR)
        parent: Tracker = NullTracker()
        try:
            if store is not None:
                parent = open_run(
                    store,
                    cfg.tracking.experiment,
                    run_name=f"study-{study_name}",
                    run_id=parent_id,
                    tags={"optuna.study": study_name, "optuna.storage": where},
                )
        except TrackingError as error:
            raise ConfigError(str(error)) from None
        if parent_id is None and parent.run_id is not None:
            study.set_user_attr(PARENT_RUN_ID_ATTR, parent.run_id)
        driver = study.user_attrs.get("fce.drivers", 0)
        study.set_user_attr("fce.drivers", driver + 1)
    if parent_id is None and parent.run_id is not None:
        parent.log_params(
            {f"sweep.{k}": v for k, v in flatten(OmegaConf.to_container(settings)).items()}
        )
        parent.log_params({"base_overrides": " ".join(base_overrides) or "(none)"})

    remaining = settings.n_trials - budget_used(study)
    status, problems, nothing = "FAILED", [], None
    try:
        if stopping() is not None:
            pass
        elif remaining <= 0:
            log.info(
                "study %s already has %d finished or running trials (n_trials=%d)",
                study_name,
                settings.n_trials - remaining,
                settings.n_trials,
            )
        else:
            n_workers = min(settings.n_jobs, remaining)
            plan = StudyPlan(
                settings=OmegaConf.to_container(settings, resolve=True),
                base_overrides=list(base_overrides),
                storage=storage_url,
                study_name=study_name,
                tracking_uri=store,
                experiment=cfg.tracking.get("experiment", ""),
                parent_run_id=parent.run_id,
                # Keyed by the study, not only its name: another study of the same name (in
                # another storage, or made again) writes its trial_0000 elsewhere.
                sweep_dir=str(sweep_root / f"{study_name}-{uid}"),
                project_root=str(project_root),
                trials_before=len(study.trials),
                driver=driver,
            )
            log.info(
                "study %s: up to %d trial(s) to run on %d worker(s)",
                study_name,
                remaining,
                n_workers,
            )
            if n_workers == 1:
                run_worker(plan, 0, compose, stopping)
            else:
                problems = run_workers(plan, n_workers, worker_entry, study, storage, stopping)
        nothing = no_result(study, driver)
        failed = problems or nothing
        status = "KILLED" if stopping() is not None else "FAILED" if failed else "FINISHED"
    finally:
        summarise(study, parent, settings)
        parent.finish(status)
    if stopping() is not None:
        raise RunInterrupted(128 + stopping())
    if problems:
        have = sum(map(finished, study.get_trials(deepcopy=False)))
        raise SweepError(
            f"{'; '.join(problems)}; study {study_name} has {have} of {settings.n_trials} "
            "trials finished; rerun the command to continue it"
        )
    if nothing:
        raise SweepError(nothing)
    return study


def no_result(study: optuna.Study, driver: int) -> str | None:
    """Why this command leaves the study with nothing to show, or None: every trial it ran
    failed, or (having run none) the study has no completed trial at all."""
    trials = study.get_trials(deepcopy=False)
    mine = [t for t in trials if t.user_attrs.get("fce.driver") == driver]
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    if mine and not any(t.state in done for t in mine):
        first = next((t for t in mine if "error" in t.user_attrs), mine[0])
        why = first.user_attrs.get("error", f"it ended {first.state.name}")
        return (
            f"study {study.study_name}: none of the {len(mine)} trial(s) this command ran "
            f"completed (trial {first.number}: {why}); the reason of each is its 'error' "
            "user attribute"
        )
    if not mine and not any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
        return (
            f"study {study.study_name}: no trial of its {len(trials)} completed; raise "
            "sweep.n_trials to run more, or start another study with sweep.study_name"
        )
    return None


def summarise(study: optuna.Study, parent: Tracker, settings: DictConfig) -> None:
    states = [t.state.name for t in study.trials]
    counts = {s: states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    parent.log_metrics(
        {f"trials_{k.lower()}": float(v) for k, v in counts.items()}, step=len(states)
    )
    if counts["COMPLETE"] == 0:
        log.warning("no trial completed yet: %s", counts)
        return
    best = study.best_trial
    parent.log_metrics({f"best_{settings.objective}": best.value}, step=len(states))
    parent.set_tags(
        {"best_trial": str(best.number), **{f"best.{k}": str(v) for k, v in best.params.items()}}
    )
    print(
        f"study {study.study_name}: {len(states)} trials ({counts}); best trial {best.number}: "
        f"{settings.objective}={best.value:.4f} with "
        + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()
        ),
        flush=True,
    )
    if not math.isfinite(best.value):
        log.warning("best value is not finite")
