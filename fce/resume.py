"""Resuming a run: find its checkpoint, check it belongs to this config, and say where to write.

A run is resumed with ``train.resume=<run directory or checkpoint file>``. The models, the
data, the randomness and the training settings must be those of the run that saved it; only
how long and how often (epochs, max_steps, eval_every, plot_every, checkpoint_every) and where
it logs may change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from fce import checkpoint
from fce.config import (
    ConfigError,
    RunConfig,
    load_run_config,
    total_steps,
    upgrade,
    user_settings,
)
from fce.errors import first_line

if TYPE_CHECKING:
    from fce.trainer import Trainer

log = logging.getLogger("fce")

# Keys that define the models, the data, the randomness and the optimisation: a checkpoint
# resumes only a run that agrees on all of them. The held-out set (eval.*) may not change
# either, so metrics stay comparable across the resume.
RESUME_KEYS = (
    "dataset",
    "flow",
    "ebm",
    "seed",
    "optimizer",
    "threshold",
    "schedule",
    "estimator",
    "train.batch_size",
    "train.ema_decay",
    "eval",
)
# What may change on resume, recorded on the run as a tag when it does.
CHANGEABLE_KEYS = (
    "train.epochs",
    "train.max_steps",
    "train.eval_every",
    "train.plot_every",
    "train.checkpoint_every",
)


@dataclass
class Resume:
    """Where a resumed run continues and the checkpoint it loads.

    Args:
        output_dir: the run's own directory; None when the checkpoint is not inside one (a
            bare ``.pt`` file): the resumed run then writes into its new directory.
        path, state: the checkpoint; None for a run killed before its first checkpoint,
            which starts again from step 0 in the same directory, as a new MLflow run.
        changed: settings that differ from the saved run's, as ``key: (old, new)``.
    """

    output_dir: Path | None
    path: Path | None = None
    state: dict[str, Any] | None = None
    changed: dict[str, tuple[Any, Any]] | None = None


def _select(settings: dict[str, Any], key: str) -> Any:
    node: Any = settings
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_same_run(cfg: RunConfig, saved: DictConfig, source: str) -> dict[str, tuple]:
    """Raise ``ConfigError`` unless ``cfg`` agrees with ``saved`` on every ``RESUME_KEYS``;
    return the changeable settings that differ."""
    mine, theirs = user_settings(cfg), user_settings(saved)
    for key in RESUME_KEYS:
        old, new = _select(theirs, key), _select(mine, key)
        if old != new:
            raise ConfigError(
                f"train.resume={cfg.train.resume}: {source} has {key}={old}, this run "
                f"{key}={new}; they must match (only {', '.join(CHANGEABLE_KEYS)} may change)"
            )
    changed = {
        key: (_select(theirs, key), _select(mine, key))
        for key in CHANGEABLE_KEYS
        if _select(theirs, key) != _select(mine, key)
    }
    if not get_class(cfg.schedule._target_).constant and total_steps(theirs) != total_steps(mine):
        raise ConfigError(
            f"train.resume={cfg.train.resume}: this run would take {total_steps(mine)} steps, "
            f"the saved run {total_steps(theirs)}, and schedule={cfg.schedule.name} spreads "
            "its decay over the run's length; keep the length (train.epochs, train.max_steps)"
        )
    return changed


def load_resume(cfg: RunConfig) -> Resume | None:
    """The checkpoint named by ``train.resume``, checked against this run's config."""
    if cfg.train.resume is None:
        return None
    target = Path(cfg.train.resume).expanduser()
    # A run killed before its first checkpoint has its config.yaml, or at least the config
    # Hydra wrote when the job started (killed before fce wrote its own).
    configs = [
        p for p in (target / "config.yaml", target / ".hydra" / "config.yaml") if p.is_file()
    ]
    never_checkpointed = (
        target.is_dir()
        and configs
        and not checkpoint.list_checkpoints(target / "checkpoints")
        and not checkpoint.list_checkpoints(target)
    )
    if never_checkpointed:
        saved = upgrade(load_run_config(configs[0]))
        check_same_run(cfg, saved, str(configs[0]))
        log.warning("%s has no checkpoint yet: starting again from step 0 there", target)
        return Resume(target)
    try:
        path, state, warnings = checkpoint.resolve(target)
    except checkpoint.CheckpointError as error:
        raise ConfigError(f"train.resume={cfg.train.resume}: {error}") from None
    for warning in warnings:
        log.warning(warning)
    changed = check_same_run(cfg, upgrade(OmegaConf.create(state["config"])), "the checkpoint")
    # <run>/checkpoints/step_N.pt: the run continues in <run>. Anywhere else, in a new one.
    output_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    return Resume(output_dir, path, state, changed)


def load_into(trainer: Trainer, resume: Resume) -> None:
    """Load the checkpoint into ``trainer`` (this run's, at step 0), once; raise
    ``ConfigError`` unless it fits this run's models and its step is within this run's
    length: found before the tracked run is reopened, so a bad checkpoint never turns a
    FINISHED run FAILED."""
    where = f"train.resume={resume.path}"
    try:
        trainer.load_state_dict(resume.state["trainer"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as error:
        reason = first_line(error, limit=200)
        raise ConfigError(f"{where}: the checkpoint does not fit this run ({reason})") from None
    step = trainer.step
    if not isinstance(step, int) or step < 0:
        raise ConfigError(f"{where}: the checkpoint's step {step!r} is not a step count")
    if step > trainer.total_steps:
        raise ConfigError(
            f"{where}: the checkpoint is at step {step}, beyond this run's {trainer.total_steps} "
            "steps; raise train.max_steps or train.epochs to continue it"
        )
