"""The study's storage, sampler and pruner, its heartbeat, and the failing of trials whose
process is gone."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from omegaconf import DictConfig

from fce.errors import first_line
from fce.storage import StudyStorage
from fce.tracking import RUN_ID_ATTR, set_run_status
from fce.tracking.housekeeping import process_gone

log = logging.getLogger("fce.sweep")

Stopping = Callable[[], "int | None"]
"""Returns the signal number once SIGINT or SIGTERM asked this process to stop, else None."""

# The trial user attribute of a trial that ran to its end, whatever its state: one that was
# cut off from outside (a signal, its worker killed, its heartbeat stale, the study's database
# lost) lacks it.
ENDED_ATTR = "fce.ended"


@dataclass(frozen=True)
class StudyPlan:
    """Everything a worker process needs, picklable."""

    settings: dict[str, Any]
    base_overrides: list[str]
    storage: str
    study_name: str
    tracking_uri: str | None  # None: tracking=none, nothing tracked
    experiment: str
    parent_run_id: str | None
    sweep_dir: str
    project_root: str
    trials_before: int
    driver: int = 0  # how many drivers of this study started before this one


def make_storage(plan_storage: str, heartbeat_s: int, tracking_uri: str | None) -> StudyStorage:
    """RDB storage with heartbeats: a trial whose worker died is failed (and its tracked run
    marked KILLED) once it has been silent for 3 heartbeats. Its connections are bounded per
    process and reconnect after a database restart (``fce.storage``)."""

    def on_stale(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id and tracking_uri:
            set_run_status(tracking_uri, run_id, "KILLED", {"optuna.state": "FAIL"})
        log.warning("trial %d: its worker stopped beating; marked FAIL", trial.number)

    return StudyStorage(
        plan_storage,
        heartbeat_interval=heartbeat_s,
        grace_period=3 * heartbeat_s,
        heartbeat_stale_trial_callback=on_stale,
    )


def make_sampler(
    settings: DictConfig, worker: int, done: int, driver: int = 0
) -> optuna.samplers.BaseSampler:
    # Distinct streams per worker, per continuation and per driver of the study: with one
    # seed, parallel workers (a resumed study, a second driver started alongside) would
    # propose the same random start-up points again.
    seed = (settings.seed + 1009 * done + worker + 7919 * driver) % 2**32
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(settings: DictConfig, eval_every: int) -> optuna.pruners.BasePruner:
    if settings.pruner == "none":
        return optuna.pruners.NopPruner()
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=settings.pruner_startup_trials,
        n_warmup_steps=settings.pruner_warmup_evals * eval_every,
    )


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.RDBStorage, trial_id: int, interval_s: float):
    """Beat for a trial while it runs (Optuna's ``optimize`` does the same), so that a trial
    whose process died is failed as stale by whoever opens the study next."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(interval_s):
            try:
                storage.record_heartbeat(trial_id)
            except Exception as error:  # a busy store: the next beat will do
                log.warning(
                    "heartbeat of trial id %d not recorded: %s", trial_id, first_line(error)
                )

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def fail_trial(
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    tracking_uri: str | None,
    trial: optuna.trial.FrozenTrial,
    why: str,
) -> bool:
    """Fail a RUNNING trial whose process is gone and mark its tracked run KILLED; False if it
    ended meanwhile."""
    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    try:
        storage.set_trial_user_attr(trial_id, "error", why)
        if not storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id and tracking_uri:
        set_run_status(tracking_uri, run_id, "KILLED", {"optuna.state": "FAIL"})
    log.warning("trial %d marked FAIL: %s", trial.number, why)
    return True


def running_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))


def finished(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts toward ``n_trials``: COMPLETE, PRUNED, or FAIL by its own run
    (it diverged, its config was rejected, its disk or tracking store failed). A trial cut off
    from outside is FAIL too but not finished, so a rerun runs another in its place."""
    state = trial.state
    if state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
        return True
    return state == optuna.trial.TrialState.FAIL and ENDED_ATTR in trial.user_attrs


def budget_used(study: optuna.Study) -> int:
    """Trials finished, plus those RUNNING (each expected to finish): a worker starts another
    only below ``n_trials``."""
    trials = study.get_trials(deepcopy=False)
    running = optuna.trial.TrialState.RUNNING
    return sum(finished(t) or t.state == running for t in trials)


def fail_trials_of(
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    tracking_uri: str | None,
    pid: int,
    why: str,
) -> list[int]:
    """Fail the RUNNING trials of a worker process of this host that died; return their
    numbers."""
    host = socket.gethostname()
    return [
        trial.number
        for trial in running_trials(study)
        if (worker := trial.user_attrs.get("fce.worker"))
        and worker.get("fce.host") == host
        and worker.get("fce.pid") == str(pid)
        and fail_trial(study, storage, tracking_uri, trial, why)
    ]


def fail_dead_trials(
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    tracking_uri: str | None,
    wait_s: float,
    stopping: Stopping,
) -> None:
    """Trials left RUNNING by a killed sweep.

    Those of a process of this host that is gone are failed at once. Those whose process is
    not known (a study of an older version) are waited for until their heartbeat goes stale.
    Those of live processes, e.g. another driver of the study, are theirs to finish (and if
    that driver dies, its trials go stale and any worker of the study fails them).
    """
    host = socket.gethostname()
    deadline = time.monotonic() + wait_s
    while True:
        optuna.storages.fail_stale_trials(study)
        unknown = []
        for trial in running_trials(study):
            worker = trial.user_attrs.get("fce.worker")
            if not isinstance(worker, dict):
                unknown.append(trial)
            elif worker.get("fce.host") == host and process_gone(
                int(worker.get("fce.pid", 0)), worker.get("fce.pid_start", "")
            ):
                why = f"its worker (pid {worker.get('fce.pid')}) is gone"
                fail_trial(study, storage, tracking_uri, trial, why)
        if not unknown or time.monotonic() > deadline or stopping() is not None:
            return
        log.info("%d trial(s) RUNNING: waiting for them to beat or go stale", len(unknown))
        time.sleep(1.0)
