"""Optuna studies whose trials are FCE runs, each an MLflow child run of one parent run.

Optuna itself (5.x) drives the study; Hydra only composes each trial's config (the
hydra-optuna-sweeper plugin is not used: it pins optuna < 3 and cannot prune). Trials report
the objective at every evaluation so that a pruner can stop poor ones; the study lives in an
RDB storage (SQLite by default, PostgreSQL or MySQL to share it between machines), so rerunning
the command continues it and parallel workers, and parallel drivers, cooperate through it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from fce.cli import one_line
from fce.config import ConfigError, validate
from fce.interrupts import RunInterrupted
from fce.storage import StudyStorage
from fce.sweep_space import Composer, override
from fce.tracking import (
    MLflowTracker,
    TrackingError,
    check_reachable,
    flatten,
    set_run_status,
    tracking_uri,
)
from fce.tracking.housekeeping import process_gone, process_identity
from fce.train import RunContext, RunFault, run
from fce.trainer import DivergenceError, StopRun

log = logging.getLogger("fce.sweep")
# Heartbeats are "experimental" in Optuna 5 but are the documented way to fail dead trials.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# Trials are run with ask and tell (to count them under the study lock first) and beat with
# ``heartbeat`` below, as ``optimize`` would.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


# Seconds a stopped worker has to reach a step boundary and end its run before it is killed.
STOP_GRACE_S = 60.0
# The study user attribute that records its search space: a study is one space.
SPACE_ATTR = "fce.search_space"

Stopping = Callable[[], "int | None"]
"""Returns the signal number once SIGINT or SIGTERM asked this process to stop, else None."""


class SweepError(RuntimeError):
    """The study could not run as asked for a reason other than bad input (a dead worker)."""


def suggest(trial: optuna.Trial, params: DictConfig) -> list[str]:
    """Draw one value per searched key; return them as Hydra overrides."""
    overrides = []
    for key, spec in params.items():
        if spec.type == "categorical":
            value = trial.suggest_categorical(key, list(spec.choices))
        elif spec.type == "int":
            value = trial.suggest_int(key, spec.low, spec.high, log=spec.get("log", False))
        else:
            value = trial.suggest_float(key, spec.low, spec.high, log=spec.get("log", False))
        overrides.append(override(key, value))
    return overrides


def distributions(params: DictConfig) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distribution of each searched key, as ``suggest`` draws from it."""
    found: dict[str, optuna.distributions.BaseDistribution] = {}
    for key, spec in params.items():
        log_scale = spec.get("log", False)
        if spec.type == "categorical":
            found[key] = optuna.distributions.CategoricalDistribution(list(spec.choices))
        elif spec.type == "int":
            found[key] = optuna.distributions.IntDistribution(spec.low, spec.high, log=log_scale)
        else:
            found[key] = optuna.distributions.FloatDistribution(spec.low, spec.high, log=log_scale)
    return found


def _short(value: Any) -> str:
    if isinstance(value, float) and value != 0 and math.isfinite(value):
        if not 1e-2 <= abs(value) < 1e4:
            mantissa, exponent = f"{value:.1e}".split("e")
            return f"{mantissa}e{int(exponent)}"
        return f"{value:.2g}"
    return str(value)


def trial_run_name(number: int, params: Mapping[str, Any], prefix: str | None = None) -> str:
    """``t007 lr_ebm=3.1e-3 value=0.62``: the trial and its values, to tell trials apart in
    the MLflow runs table (keys by their last part where that is unambiguous)."""
    last = [key.rsplit(".", 1)[-1] for key in params]
    parts = [
        f"{short if last.count(short) == 1 else key}={_short(value)}"
        for (key, value), short in zip(params.items(), last, strict=True)
    ]
    name = " ".join([f"t{number:03d}", *parts])
    return f"{prefix} {name}" if prefix else name


@contextlib.contextmanager
def sqlite_lock(url: str) -> Iterator[None]:
    """An exclusive lock on a SQLite storage, among the processes of this machine (a lock
    file beside it); a no-op for other storages."""
    if not url.startswith("sqlite:///"):
        yield
        return
    with open(url.removeprefix("sqlite:///") + ".study-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def schema_lock(url: str) -> Iterator[None]:
    """Held while a storage is opened (and its tables made, the first time): SQLite, the
    lock file beside it; PostgreSQL, a session advisory lock on a connection of its own."""
    if not url.startswith("postgresql"):
        with sqlite_lock(url):
            yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            key = int.from_bytes(hashlib.sha256(b"fce-schema").digest()[:8], "big", signed=True)
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, url: str, study_name: str) -> Iterator[None]:
    """Hold the study's lock, shared by every process that runs it (workers and drivers).

    Counting a study's trials and starting one, or finding and creating its parent run, is
    then one step: two drivers on one study neither overshoot ``n_trials`` nor make two
    parent runs. SQLite lives on one machine: a lock file beside it. PostgreSQL and MySQL:
    the server's advisory lock, held by one connection (released if the process dies).
    """
    if url.startswith("sqlite:///"):
        with sqlite_lock(url):
            yield
        return
    import sqlalchemy

    key = f"fce-study:{study_name}"
    dialect = storage.engine.dialect.name
    if dialect == "postgresql":
        number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
        take, give, args = "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)", number
    elif dialect in ("mysql", "mariadb"):
        take, give, args = "SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)", key[:64]
    else:
        log.warning("no study lock for %s storages: parallel drivers may overshoot", dialect)
        yield
        return
    with storage.engine.connect() as connection:
        connection.execute(sqlalchemy.text(take), {"k": args})
        try:
            yield
        finally:
            connection.execute(sqlalchemy.text(give), {"k": args})


def check_same_space(study: optuna.Study, settings: DictConfig, where: str) -> None:
    """Record the study's search space (and objective) the first time; refuse another one.

    A study is one search space: trials drawn from two would be compared as if from one,
    and a sampler fitted to both. Studies made before the space was recorded are checked
    against the distributions of their trials instead.
    """
    mine = {
        "objective": settings.objective,
        "params": {
            key: optuna.distributions.distribution_to_json(dist)
            for key, dist in distributions(settings.params).items()
        },
    }
    recorded = study.user_attrs.get(SPACE_ATTR)
    if recorded is None:
        drawn = {
            key: optuna.distributions.distribution_to_json(dist)
            for trial in study.get_trials(deepcopy=False)
            for key, dist in trial.distributions.items()
        }
        recorded = {"objective": mine["objective"], "params": drawn or mine["params"]}
    differ = sorted(
        key
        for key in {*recorded["params"], *mine["params"]}
        if recorded["params"].get(key) != mine["params"].get(key)
    )
    if differ or recorded["objective"] != mine["objective"]:
        what = (
            f"its params differ in: {', '.join(differ)}"
            if differ
            else f"its objective is {recorded['objective']}, this one {mine['objective']}"
        )
        raise ConfigError(
            f"sweep={settings.name}: study {study.study_name} in {where} was run with another "
            f"search space ({what}); use another sweep.study_name, or the same space"
        )
    if SPACE_ATTR not in study.user_attrs:
        study.set_user_attr(SPACE_ATTR, mine)


@dataclass(frozen=True)
class StudyPlan:
    """Everything a worker process needs, picklable."""

    settings: dict[str, Any]
    base_overrides: list[str]
    storage: str
    study_name: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    sweep_dir: str
    project_root: str
    conf_dir: str
    trials_before: int
    driver: int = 0  # how many drivers of this study started before this one


def make_storage(plan_storage: str, heartbeat_s: int, tracking_uri: str) -> StudyStorage:
    """RDB storage with heartbeats: a trial whose worker died is failed (and its MLflow run
    marked KILLED) once it has been silent for 3 heartbeats. Its connections are bounded per
    process and reconnect after a database restart (``fce.storage``)."""

    def on_stale(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
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
                log.warning("heartbeat of trial id %d not recorded: %s", trial_id, one_line(error))

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


TRACKING_WAIT_S = 180.0


def wait_for_tracking(uri: str, timeout_s: float = TRACKING_WAIT_S) -> None:
    """Before a trial: a tracking server that is restarting is waited for, with a bound, and
    the trial fails (``ConfigError``) if it does not come back. Without this each trial would
    fail at once while the server is down, and a worker would burn through the study."""
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


def end_trial_run(uri: str, run_id: str, state: optuna.trial.TrialState) -> None:
    """Tag a trial's MLflow run with its Optuna state; a failed trial's run still RUNNING
    (its end was lost to a tracking server that was down) is ended FAILED, once the server
    answers again. A store that stays away is logged, not raised: the study goes on."""
    failed = state == optuna.trial.TrialState.FAIL
    try:
        wait_for_tracking(uri)
        tags = {"optuna.state": state.name}
        set_run_status(uri, run_id, "FAILED" if failed else None, tags, if_running=True)
    except Exception as error:
        log.warning("MLflow run %s: could not record its trial's end (%s)", run_id, error)


def run_worker(plan: StudyPlan, worker: int, compose: Composer, stopping: Stopping) -> int | None:
    """Run trials of the study in this process until it has ``n_trials`` in total.

    Before each trial the study's trials are counted under the study lock, and the trial is
    created under it too, so workers of any number of drivers stop at ``n_trials`` exactly.

    Returns:
        The signal number if SIGINT or SIGTERM stopped the worker (its trial in flight FAIL,
        the trial's MLflow run KILLED), None once the study has its trials.
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
        try:
            wait_for_tracking(plan.tracking_uri)
            try:
                cfg = compose(overrides)
            except Exception as error:  # a combination the space check could not foresee
                raise ConfigError(one_line(error)) from None
            validate(cfg)
            cfg.tracking.run_name = trial_run_name(
                trial.number, trial.params, cfg.tracking.run_name
            )

            def report(step: int, metrics: dict[str, float]) -> None:
                signum = stopping()
                if signum is not None:  # a signal that came before the run could note it
                    raise RunInterrupted(128 + signum)
                trial.report(metrics[settings.objective], step)
                if trial.should_prune():
                    raise StopRun(f"pruned at step {step}")

            context = RunContext(
                output_dir=Path(plan.sweep_dir) / f"trial_{trial.number:04d}",
                project_root=Path(plan.project_root),
                overrides=overrides,
                tags={
                    "mlflow.parentRunId": plan.parent_run_id,
                    "optuna.study": plan.study_name,
                    "optuna.trial": str(trial.number),
                },
                on_eval=report,
                on_run_created=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id),
            )
            metrics = run(cfg, context)
        except (DivergenceError, ConfigError, RunFault) as error:  # RunFault: its disk or store
            trial.set_user_attr("error", str(error))
            log.error("trial %d failed: %s", trial.number, error)
            return math.nan
        return metrics[settings.objective]

    def run_one(trial: optuna.Trial) -> None:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        value, state = None, optuna.trial.TrialState.FAIL
        with heartbeat(storage, trial_id, settings.heartbeat_s):
            try:
                value = objective(trial)
                if math.isfinite(value):
                    state = optuna.trial.TrialState.COMPLETE
            except StopRun:
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
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            end_trial_run(plan.tracking_uri, run_id, state)

    while not interrupted and stopping() is None:
        optuna.storages.fail_stale_trials(study)
        with study_lock(storage, plan.storage, plan.study_name):
            if storage.get_n_trials(study_id) >= settings.n_trials:
                return None
            trial = study.ask()
            trial.set_user_attr("fce.worker", process_identity())
        run_one(trial)
    return interrupted[0] if interrupted else stopping()


def fail_trial(
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    tracking_uri: str,
    trial: optuna.trial.FrozenTrial,
    why: str,
) -> bool:
    """Fail a RUNNING trial whose process is gone and mark its MLflow run KILLED; False if it
    ended meanwhile."""
    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    try:
        storage.set_trial_user_attr(trial_id, "error", why)
        if not storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        set_run_status(tracking_uri, run_id, "KILLED", {"optuna.state": "FAIL"})
    log.warning("trial %d marked FAIL: %s", trial.number, why)
    return True


def running_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))


def fail_trials_of(
    study: optuna.Study, storage: optuna.storages.RDBStorage, tracking_uri: str, pid: int, why: str
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
    tracking_uri: str,
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
    and its MLflow run marked KILLED; the other workers go on, up to ``n_trials``. On SIGINT
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
    conf_dir: Path,
    sweep_root: Path,
    worker_entry: Callable[[StudyPlan, int, Any], None],
    stopping: Stopping,
) -> optuna.Study:
    """Create or continue the study and run it to ``settings.n_trials`` trials in total.

    The caller has checked the space against the run config (``check_space_against_run``)
    and installed SIGINT/SIGTERM handlers that only record the signal (``stopping``): it is
    acted on here at safe points, never in the middle of a store write.

    Raises:
        ConfigError: the storage cannot be opened, or the study exists with another space or
            direction; nothing is changed.
        RunInterrupted: SIGINT or SIGTERM; trials in flight FAIL, their runs and the parent
            run KILLED.
        SweepError: a worker process died; its trial FAIL, the parent run FAILED.
    """
    cfg = compose(base_overrides)
    storage_url = settings.storage or f"sqlite:///{(project_root / 'optuna.db').resolve()}"
    study_name = settings.study_name or f"{settings.name}-{cfg.dataset.name}-{cfg.flow.name}"
    store = tracking_uri(cfg.tracking.uri, project_root)
    try:
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
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ConfigError(
            f"sweep.storage={storage_url}: cannot open the Optuna storage ({reason})"
        ) from None
    if study.direction.name.lower() != settings.direction:
        raise ConfigError(
            f"sweep.direction={settings.direction}: study {study_name} already exists with "
            f"direction {study.direction.name.lower()}; use another sweep.study_name"
        )
    where = storage_url.split("@")[-1]
    with study_lock(storage, storage_url, study_name):
        check_same_space(study, settings, where)
    fail_dead_trials(study, storage, store, 3 * settings.heartbeat_s + 2, stopping)
    if stopping() is not None:
        raise RunInterrupted(128 + stopping())

    # Found or created under the lock: two drivers starting at once share one parent run.
    with study_lock(storage, storage_url, study_name):
        parent_id = study.user_attrs.get("mlflow_parent_run_id")
        try:
            parent = MLflowTracker(
                store,
                cfg.tracking.experiment,
                run_name=f"study-{study_name}",
                run_id=parent_id,
                tags={"optuna.study": study_name, "optuna.storage": where},
            )
        except TrackingError as error:
            raise ConfigError(str(error)) from None
        if parent_id is None:
            study.set_user_attr("mlflow_parent_run_id", parent.run_id)
        driver = study.user_attrs.get("fce.drivers", 0)
        study.set_user_attr("fce.drivers", driver + 1)
    if parent_id is None:
        parent.log_params(
            {f"sweep.{k}": v for k, v in flatten(OmegaConf.to_container(settings)).items()}
        )
        parent.log_params({"base_overrides": " ".join(base_overrides) or "(none)"})

    remaining = settings.n_trials - len(study.trials)
    status, problems = "FAILED", []
    try:
        if stopping() is not None:
            pass
        elif remaining <= 0:
            log.info(
                "study %s already has %d trials (n_trials=%d)",
                study_name,
                len(study.trials),
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
                experiment=cfg.tracking.experiment,
                parent_run_id=parent.run_id,
                sweep_dir=str(sweep_root / study_name),
                project_root=str(project_root),
                conf_dir=str(conf_dir),
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
        status = "KILLED" if stopping() is not None else "FAILED" if problems else "FINISHED"
    finally:
        summarise(study, parent, settings)
        parent.finish(status)
    if stopping() is not None:
        raise RunInterrupted(128 + stopping())
    if problems:
        have = len(study.trials)
        raise SweepError(
            f"{'; '.join(problems)}; study {study_name} has {have} of {settings.n_trials} "
            "trials; rerun the command to continue it"
        )
    return study


def summarise(study: optuna.Study, parent: MLflowTracker, settings: DictConfig) -> None:
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
