"""Optuna studies whose trials are FCE runs, each an MLflow child run of one parent run.

Optuna itself (5.x) drives the study; Hydra only composes each trial's config (the
hydra-optuna-sweeper plugin pins optuna < 3 and cannot prune: DESIGN §6). Trials report the
objective at every evaluation so that a pruner can stop poor ones; the study lives in an RDB
storage (SQLite by default, PostgreSQL or MySQL to share it between machines), so rerunning
the command continues it and parallel workers cooperate through it.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from fce.config import ConfigError, validate
from fce.experiment import RunContext, run
from fce.storage import StudyFull, StudyStorage
from fce.sweep_space import Composer
from fce.tracking import (
    MLflowTracker,
    TrackingError,
    check_reachable,
    default_tracking_uri,
    flatten,
    set_run_status,
)
from fce.train import DivergenceError, StopRun

log = logging.getLogger("fce.sweep")
# Heartbeats are "experimental" in Optuna 5 but are the documented way to fail dead trials.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


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
        overrides.append(f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}")
    return overrides


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


def make_storage(
    plan_storage: str, heartbeat_s: int, tracking_uri: str, max_trials: int | None = None
) -> StudyStorage:
    """RDB storage with heartbeats: a trial whose worker died is failed (and its MLflow run
    marked KILLED) once it has been silent for 3 heartbeats. With ``max_trials``, no trial is
    created past that total, however many drivers share the study."""

    def on_stale(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            set_run_status(tracking_uri, run_id, "KILLED", {"optuna.state": "FAIL"})
        log.warning("trial %d: its worker stopped beating; marked FAIL", trial.number)

    return StudyStorage(
        plan_storage,
        max_trials=max_trials,
        heartbeat_interval=heartbeat_s,
        grace_period=3 * heartbeat_s,
        heartbeat_stale_trial_callback=on_stale,
    )


def make_sampler(settings: DictConfig, worker: int, done: int) -> optuna.samplers.BaseSampler:
    # Distinct streams per worker and per continuation: with one seed, parallel workers (and a
    # resumed study) would propose the same random start-up points again.
    seed = settings.seed + 1009 * done + worker
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


TRACKING_WAIT_S = 180.0


def wait_for_tracking(uri: str, timeout_s: float = TRACKING_WAIT_S) -> None:
    """Before a trial: a tracking server that is restarting is waited for, with a bound.

    Without this, each trial would fail at once while the server is down, and a worker would
    burn through the study in seconds. (During a trial MLflow's client retries by itself.)
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check_reachable(uri)
            return
        except TrackingError as error:
            if time.monotonic() > deadline:
                raise
            log.warning("%s; retrying in 2s", error)
            time.sleep(2.0)


def run_worker(plan: StudyPlan, worker: int, n_trials: int, compose: Composer) -> None:
    """Run up to ``n_trials`` trials of the study in this process, fewer if the study reaches
    its total (``sweep.n_trials``) first: other workers, anywhere, take trials too."""
    settings = OmegaConf.create(plan.settings)
    first = compose(plan.base_overrides)
    storage = make_storage(
        plan.storage, settings.heartbeat_s, plan.tracking_uri, max_trials=settings.n_trials
    )
    study = optuna.load_study(
        study_name=plan.study_name,
        storage=storage,
        sampler=make_sampler(settings, worker, plan.trials_before),
        pruner=make_pruner(settings, first.train.eval_every),
    )

    def objective(trial: optuna.Trial) -> float:
        wait_for_tracking(plan.tracking_uri)
        overrides = [*plan.base_overrides, *suggest(trial, settings.params), "progress=none"]
        cfg = compose(overrides)
        validate(cfg)

        def report(step: int, metrics: dict[str, float]) -> None:
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
        try:
            metrics = run(cfg, context)
        except StopRun:
            raise optuna.TrialPruned() from None
        except (DivergenceError, ConfigError) as error:
            # NaN marks the trial FAIL in Optuna; the study goes on. One line, no traceback.
            trial.set_user_attr("error", str(error))
            log.error("trial %d failed: %s", trial.number, error)
            return math.nan
        return metrics[settings.objective]

    def tag_state(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            set_run_status(plan.tracking_uri, run_id, None, {"optuna.state": trial.state.name})

    try:
        # A storage error inside a trial (a write that met the database restarting) fails
        # that trial, not the worker; reconnects are retried by the storage itself.
        study.optimize(
            objective,
            n_trials=n_trials,
            callbacks=[tag_state],
            catch=(optuna.exceptions.StorageInternalError,),
        )
    except StudyFull:
        log.info("worker %d: the study has its %d trials", worker, settings.n_trials)


def fail_stale_trials(
    study: optuna.Study, storage: optuna.storages.RDBStorage, wait_s: float
) -> None:
    """Trials left RUNNING by a killed sweep: wait out their grace period, then fail them."""
    deadline = time.monotonic() + wait_s
    while True:
        optuna.storages.fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if not running or time.monotonic() > deadline:
            return
        log.info("%d trial(s) RUNNING: waiting for them to beat or go stale", len(running))
        time.sleep(1.0)


def run_study(
    settings: DictConfig,
    base_overrides: list[str],
    compose: Composer,
    project_root: Path,
    conf_dir: Path,
    sweep_root: Path,
    worker_entry: Callable[[StudyPlan, int, int], None],
) -> optuna.Study:
    """Create or continue the study and run it to ``settings.n_trials`` trials in total.

    The caller has checked the space against the run config (``check_space_against_run``).
    """
    cfg = compose(base_overrides)
    storage_url = settings.storage or f"sqlite:///{(project_root / 'optuna.db').resolve()}"
    study_name = settings.study_name or f"{settings.name}-{cfg.dataset.name}-{cfg.flow.name}"
    tracking_uri = cfg.tracking.uri or default_tracking_uri(project_root)
    try:
        check_reachable(tracking_uri)  # before the study is touched
        storage = make_storage(
            storage_url, settings.heartbeat_s, tracking_uri, max_trials=settings.n_trials
        )
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
    fail_stale_trials(study, storage, wait_s=3 * settings.heartbeat_s + 2)

    parent_tags = {"optuna.study": study_name, "optuna.storage": storage_url.split("@")[-1]}
    created: list[MLflowTracker] = []

    def new_parent() -> str:
        created.append(
            MLflowTracker(
                tracking_uri,
                cfg.tracking.experiment,
                run_name=f"study-{study_name}",
                tags=parent_tags,
            )
        )
        return created[0].run_id

    try:
        # One parent run per study, even when several drivers start it at once.
        parent_id = storage.claim_study_user_attr(
            storage.get_study_id_from_name(study_name), "mlflow_parent_run_id", new_parent
        )
        parent = (
            created[0]
            if created
            else MLflowTracker(
                tracking_uri, cfg.tracking.experiment, run_id=parent_id, tags=parent_tags
            )
        )
    except TrackingError as error:
        raise ConfigError(str(error)) from None
    if created:
        parent.log_params(
            {f"sweep.{k}": v for k, v in flatten(OmegaConf.to_container(settings)).items()}
        )
        parent.log_params({"base_overrides": " ".join(base_overrides) or "(none)"})

    remaining = settings.n_trials - len(study.trials)
    status = "FAILED"
    try:
        if remaining <= 0:
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
                tracking_uri=tracking_uri,
                experiment=cfg.tracking.experiment,
                parent_run_id=parent.run_id,
                sweep_dir=str(sweep_root / study_name),
                project_root=str(project_root),
                conf_dir=str(conf_dir),
                trials_before=len(study.trials),
            )
            # Each worker may take every remaining trial: the storage stops them all at the
            # total, and a worker that dies leaves its share to the others.
            shares = [remaining] * n_workers
            log.info(
                "study %s: %d trial(s) to run on %d worker(s)", study_name, remaining, n_workers
            )
            if n_workers == 1:
                worker_entry(plan, 0, shares[0])
            else:
                context = mp.get_context("spawn")
                workers = [
                    context.Process(target=worker_entry, args=(plan, k, shares[k]))
                    for k in range(n_workers)
                ]
                for process in workers:
                    process.start()
                try:
                    for process in workers:
                        process.join()
                except BaseException:
                    for process in workers:
                        process.terminate()
                    for process in workers:
                        process.join()
                    raise
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        summarise(study, parent, settings)
        parent.finish(status)
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
