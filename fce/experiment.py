"""One FCE run from a validated config: build, track, train, checkpoint, and end cleanly.

The entry points (run.py, the sweep driver) compose and validate the config and pass it here
with the run's output directory; nothing here reads Hydra's global state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fce import checkpoint
from fce.config import ConfigError, upgrade
from fce.data import get_dataset, make_generator
from fce.ebm import EBM
from fce.flows import Flow, Gaussian
from fce.metrics import Evaluator, Grid
from fce.threshold import THRESHOLD_RULES
from fce.tracking import MLflowTracker, TrackingError, default_tracking_uri, flatten
from fce.train import DivergenceError, FCETrainer, LoopSettings, StopRun

log = logging.getLogger("fce")

# Keys that define the models, the data and the randomness: a checkpoint resumes only a run
# that agrees on all of them (epochs, max_steps, eval_every, plotting and checkpointing may
# change; the held-out set, eval.*, may not, so metrics stay comparable across the resume).
RESUME_KEYS = (
    "dataset",
    "flow",
    "ebm",
    "seed",
    "optimizer.name",
    "threshold.name",
    "estimator",
    "train.batch_size",
    "eval",
)


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; carries the exit code the shell expects (130 or 143).

    A KeyboardInterrupt, so that callers treating Ctrl-C specially (Optuna marks the trial
    FAIL and stops the study) treat SIGTERM the same way.
    """

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


@dataclass
class RunContext:
    """What the entry point knows and the run needs: where things go and how it was called."""

    output_dir: Path
    project_root: Path
    overrides: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    on_eval: Callable[[int, dict[str, float]], None] | None = None
    on_run_created: Callable[[str], None] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda': no CUDA GPU is available here; use device=cpu or auto")
    return torch.device(name)


def git_commit(root: Path) -> str:
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def _select(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


@dataclass
class Resume:
    """Where a resumed run continues: its directory, and the checkpoint to load.

    ``path`` and ``state`` are None for a run killed before its first checkpoint: it starts
    again from step 0 in the same directory, as a new MLflow run.
    """

    output_dir: Path
    path: Path | None = None
    state: dict[str, Any] | None = None


def _check_same_run(cfg: DictConfig, saved: DictConfig, source: str) -> None:
    for key in RESUME_KEYS:
        if _select(saved, key) != _select(cfg, key):
            raise ConfigError(
                f"train.resume={cfg.train.resume}: {source} has {key}="
                f"{_select(saved, key)}, this run {key}={_select(cfg, key)}; they must match"
            )


def load_resume(cfg: DictConfig) -> Resume | None:
    """The checkpoint named by ``train.resume``, checked against this run's config."""
    if cfg.train.resume is None:
        return None
    target = Path(cfg.train.resume).expanduser()
    never_checkpointed = (
        target.is_dir()
        and (target / "config.yaml").is_file()
        and not checkpoint.list_checkpoints(target / "checkpoints")
        and not checkpoint.list_checkpoints(target)
    )
    if never_checkpointed:
        saved = upgrade(OmegaConf.load(target / "config.yaml"))
        _check_same_run(cfg, saved, str(target / "config.yaml"))
        log.warning("%s has no checkpoint yet: starting again from step 0 there", target)
        return Resume(target)
    try:
        path, state, warnings = checkpoint.resolve(target)
    except checkpoint.CheckpointError as error:
        raise ConfigError(f"train.resume={cfg.train.resume}: {error}") from None
    for warning in warnings:
        log.warning(warning)
    _check_same_run(cfg, upgrade(OmegaConf.create(state["config"])), "the checkpoint")
    return Resume(path.parent.parent, path, state)


class StopRequest:
    """SIGINT/SIGTERM noted by a handler and acted on at the next step boundary.

    Raising from the handler itself could land inside an MLflow/SQLite write and leave the
    store locked for the KILLED status that follows; so the handler only records the signal,
    and ``check`` (called after every step) raises ``RunInterrupted`` there.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def check(self) -> None:
        if self.signum is not None:
            raise RunInterrupted(128 + self.signum)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[StopRequest]:
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signals only reach the main thread
        return

    def handler(signum: int, _frame: Any) -> None:
        request.signum = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def build_trainer(cfg: DictConfig, device: torch.device) -> FCETrainer:
    """The models, optimisers, data and evaluator of ``cfg``, on ``device``."""
    dataset = get_dataset(cfg.dataset.name)
    train_data = dataset.sample(cfg.dataset.n_samples, make_generator(cfg.seed, "train"))
    eval_points = dataset.sample(cfg.eval.n_points, make_generator(cfg.eval.seed, "eval"))
    grid = Grid.make(cfg.eval.grid_limit, cfg.eval.grid_cells, device=device)
    evaluator = Evaluator(dataset, eval_points.to(device), grid)

    torch.manual_seed(cfg.seed)  # parameter initialisation only; data and noise have streams
    ebm = EBM(
        hidden=list(cfg.ebm.hidden),
        negative_slope=cfg.ebm.negative_slope,
        log_z_init=cfg.ebm.log_z_init,
    ).to(device)
    flow = build_flow(cfg, train_data).to(device)
    optimizer_kwargs = {
        k: v for k, v in cfg.optimizer.items() if k not in ("name", "lr_ebm", "lr_flow")
    }
    make_optimizer = instantiate(optimizer_kwargs, betas=tuple(cfg.optimizer.betas))
    opt_ebm = make_optimizer(ebm.parameters(), lr=cfg.optimizer.lr_ebm)
    opt_flow = make_optimizer(flow.parameters(), lr=cfg.optimizer.lr_flow)

    threshold = {k: v for k, v in cfg.threshold.items() if k != "name"}
    rule = THRESHOLD_RULES[cfg.threshold.name](**threshold)
    settings = LoopSettings(
        batch_size=cfg.train.batch_size,
        epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps,
        eval_every=cfg.train.eval_every,
        plot_every=cfg.train.plot_every,
        seed=cfg.seed,
    )
    return FCETrainer(
        ebm,
        flow,
        opt_ebm,
        opt_flow,
        train_data.to(device),
        evaluator,
        settings,
        rule,
        estimator=cfg.estimator.name,
    )


def build_flow(cfg: DictConfig, train_data: torch.Tensor) -> Flow:
    """The flow of ``cfg``; for NCE, the fixed noise model instead (frozen)."""
    estimator = cfg.estimator
    if estimator.name == "nce" and estimator.noise == "gaussian":
        return Gaussian.fit(train_data)
    flow_kwargs = {k: v for k, v in cfg.flow.items() if k != "name"}
    flow = instantiate(flow_kwargs)
    if estimator.name == "nce":  # noise=flow: a trained flow, loaded and frozen
        where = f"estimator.noise_checkpoint={estimator.noise_checkpoint}"
        try:
            _, state, _ = checkpoint.resolve(Path(estimator.noise_checkpoint).expanduser())
        except checkpoint.CheckpointError as error:
            raise ConfigError(f"{where}: {error}") from None
        saved_flow = _select(upgrade(OmegaConf.create(state["config"])), "flow")
        if saved_flow != _select(cfg, "flow"):
            raise ConfigError(
                f"{where}: its flow is {saved_flow}, this run's flow={_select(cfg, 'flow')}; "
                "choose the same flow group and sizes"
            )
        flow.load_state_dict(state["trainer"]["flow"])
        flow.requires_grad_(False)
    return flow


def run_name(cfg: DictConfig) -> str:
    """``<dataset>-<flow>-s<seed>`` for FCE; the baselines say which they are."""
    name = cfg.estimator.name
    if name == "nce":
        model = "gaussian" if cfg.estimator.noise == "gaussian" else cfg.flow.name
        return f"{cfg.dataset.name}-nce-{model}-s{cfg.seed}"
    prefix = "mle-" if name == "flow_mle" else ""
    return f"{cfg.dataset.name}-{prefix}{cfg.flow.name}-s{cfg.seed}"


def run(cfg: DictConfig, context: RunContext) -> dict[str, float]:
    """Train FCE as ``cfg`` says, logged to MLflow; return the final metrics.

    Raises:
        ConfigError: bad input found after composition (device, resume); no run is created.
        DivergenceError: a non-finite value; the run is marked FAILED, checkpoints kept.
        RunInterrupted: SIGINT/SIGTERM; a checkpoint is written and the run marked KILLED.
        StopRun: raised by ``context.on_eval`` (a pruned trial); the run is marked KILLED
            and tagged ``stopped_early``.
    """
    started = time.perf_counter()
    resume = load_resume(cfg)
    continued = resume is not None and resume.state is not None
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    trainer = build_trainer(cfg, device)
    # A resumed run keeps writing into the directory it started in.
    output_dir = resume.output_dir if resume else context.output_dir
    checkpoint_dir = output_dir / "checkpoints"
    if continued:
        trainer.load_state_dict(resume.state["trainer"])
        log.info("resuming from %s at step %d", resume.path, trainer.step)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"output directory {output_dir}: {error.strerror}") from None

    uri = cfg.tracking.uri or default_tracking_uri(context.project_root)
    tags = {
        "git_commit": git_commit(context.project_root),
        "overrides": " ".join(context.overrides),
        "device": str(device),
        "output_dir": str(output_dir),
        **context.tags,
    }
    try:
        tracker = MLflowTracker(
            uri,
            cfg.tracking.experiment,
            run_name=cfg.tracking.run_name or run_name(cfg),
            run_id=resume.state["mlflow_run_id"] if continued else None,
            tags=tags,
        )
    except TrackingError as error:
        raise ConfigError(str(error)) from None
    trainer.tracker = tracker
    if context.on_run_created is not None:
        context.on_run_created(tracker.run_id)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    status = "FAILED"
    # From here on the run exists in MLflow: a signal is acted on at a step boundary, never
    # in the middle of a store write, so the run always ends with a status.
    with deferred_interrupts() as stop:
        try:
            if not continued:
                # First: a run dir with config.yaml and no checkpoint is one killed early,
                # which ``train.resume`` starts again in place.
                config_file = output_dir / "config.yaml"
                config_file.write_text(OmegaConf.to_yaml(cfg, resolve=True))
                tracker.log_params(flatten(resolved))
                tracker.log_artifact(config_file)

            def save_checkpoint(t: FCETrainer) -> Path:
                state = {
                    "trainer": t.state_dict(),
                    "config": resolved,
                    "mlflow_run_id": tracker.run_id,
                }
                return checkpoint.save(state, checkpoint_dir, t.step)

            log.info(
                "ready in %.1fs: %s on %s, %s steps, MLflow run %s",
                time.perf_counter() - started,
                cfg.flow.name,
                cfg.dataset.name,
                trainer.total_steps,
                tracker.run_id,
            )
            progress = Progress(cfg.progress, trainer.total_steps, trainer.step)

            def after_step(step: int, value: float, accuracy: float) -> None:
                progress.update(step, value, accuracy)
                stop.check()

            try:
                final = trainer.run(
                    on_checkpoint=save_checkpoint,
                    checkpoint_every=cfg.train.checkpoint_every,
                    on_step=after_step,
                    on_eval=context.on_eval,
                )
            except StopRun:
                status = "KILLED"
                tracker.set_tags({"stopped_early": "true"})
                raise
            except RunInterrupted:
                status = "KILLED"
                path = save_checkpoint(trainer)
                log.warning("interrupted at step %d; checkpoint %s", trainer.step, path)
                raise
            finally:
                progress.close()
            final_path = checkpoint.list_checkpoints(checkpoint_dir)[-1]
            tracker.log_artifact(final_path, "checkpoints")
            tracker.log_metrics({"wall_time_s": time.perf_counter() - started}, trainer.step)
            status = "FINISHED"
            log.info(
                "finished %d steps in %.0fs: %s",
                trainer.step,
                time.perf_counter() - started,
                "  ".join(f"{k} {v:.4g}" for k, v in final.items()),
            )
            return final
        except DivergenceError as error:
            log.error("%s; last good checkpoint kept in %s", error, checkpoint_dir)
            raise
        finally:
            tracker.finish(status)


class Progress:
    """A tqdm bar on a terminal, plain log lines otherwise (or nothing)."""

    def __init__(self, mode: str, total: int, start: int) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self.total = total
        self.bar = None
        self.every = max(1, total // 20)
        self.last_time = time.perf_counter()
        self.last_step = start
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, value: float, accuracy: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0:
                self.bar.set_postfix(acc=f"{accuracy:.3f}", value=f"{value:.4f}", refresh=False)
        elif self.mode == "log" and (step % self.every == 0 or step == self.total):
            now = time.perf_counter()
            rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else math.inf
            log.info(
                "step %d/%d  acc %.3f  value %.4f  %.0f steps/s  eta %.0fs",
                step,
                self.total,
                accuracy,
                value,
                rate,
                eta,
            )
            self.last_time, self.last_step = now, step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
