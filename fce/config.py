"""Validation of the run configuration, in one place, and the upgrade of older configs.

Torch-free on purpose: ``run.py`` validates the composed config and reports bad input in well
under a second, before torch or mlflow are imported.

One source of truth: the values of every setting are written once, in ``conf/`` (the YAML
files); ``fce/schema.py`` gives their types (checked by Hydra at composition) and ``validate``
checks ranges, choices and keys, naming the offending one. Every group node carries a
``_target_`` and is built by ``hydra.utils.instantiate`` as it stands (``fce/factory.py``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fce.errors import ConfigError
from fce.schema import (  # noqa: F401 (the names the rest of the package imports from here)
    CONF_DIR,
    CONTRAST_NAMES,
    DATASET_NAMES,
    DEVICES,
    EBM_ACTIVATIONS,
    EBM_METRICS,
    ESTIMATOR_NAMES,
    EVAL_METRICS,
    FLOW_METRICS,
    FLOW_NAMES,
    FLOW_OBJECTIVE_NAMES,
    INTERNAL_KEYS,
    NOISE_NAMES,
    OPTIMIZER_NAMES,
    PROGRESS_MODES,
    SCHEDULE_NAMES,
    THRESHOLD_NAMES,
    UPDATE_NAMES,
    RunConfig,
    register_configs,
)


def user_settings(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without Hydra's ``_target_``/``_partial_`` keys: what the user set."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in INTERNAL_KEYS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(OmegaConf.to_container(cfg, resolve=True))


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Keys that no schema declares (``+train.maxsteps=300``, a stray key in a YAML file)."""
    found = []
    schema = OmegaConf.get_type(cfg)
    known = (
        {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    )
    for key in cfg:
        name = f"{prefix}{key}"
        if known is not None and key not in known:
            found.append(name)
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            found += unknown_keys(node, f"{name}.")
    return found


HELP = "python run.py --help"
OPTION_SCHEMAS = ("flow", "estimator", "threshold", "schedule")


def setting_keys(tree: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (nodes and leaves), without Hydra's own keys."""
    keys = []
    for key, value in tree.items():
        if key in INTERNAL_KEYS or (not prefix and key == "hydra"):
            continue
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys += setting_keys(value, f"{prefix}{key}.")
    return keys


def no_such_setting(key: str, cfg: DictConfig) -> str:
    """The one line for a key no schema declares, with the nearest key ``cfg`` has (a typo is
    the usual cause, and Hydra's own advice, to append it with ``+``, only leads to this)."""
    tree = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    known = [k for k in setting_keys(tree) if k != key and not k.startswith(f"{key}.")]
    # In the groups whose options differ in their keys, the key may be another option's.
    group = key.split(".", 1)[0]
    node = tree.get(group) if "." in key and group in OPTION_SCHEMAS else None
    where = f" with {group}={node['name']}" if isinstance(node, dict) and "name" in node else ""
    # A high cutoff: a far-fetched guess misleads more than no guess.
    nearest = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
    if nearest:
        return f"{key}: no such setting{where}; did you mean {nearest[0]}? ({HELP} lists them)"
    return f"{key}: no such setting{where}; {HELP} lists them"


# Keys of the ebm node added with its variants, and the values every earlier run had.
EBM_SHAPE_DEFAULTS = {"activation": "leaky_relu", "fourier_features": 0, "fourier_scale": 1.0}


def upgrade(saved: DictConfig) -> DictConfig:
    """A config saved by an older fce, completed as today's (in place).

    Adds the ``_target_`` of each group node from its conf/ file, and the defaults of keys
    added since: the estimator group (every run was FCE before it) and its options (FCE's
    contrast, flow objective and updates: the paper's game, as before them), Glow's
    ``scale_bound`` (its log-scale had no floor then), ``eval.flow_samples`` (as many as
    held-out points).
    """
    if "estimator" not in saved:
        saved.estimator = {"name": "fce"}
    if "schedule" not in saved:  # every run trained at a constant rate before schedules
        saved.schedule = {"name": "constant"}
    if "ema_decay" not in saved.train:
        saved.train.ema_decay = 0.0
    if "flow_samples" not in saved.eval:  # the reverse KL drew one sample per held-out point
        saved.eval.flow_samples = saved.eval.n_points
    if "ebm" in saved:  # the energy's shape options came with the ebm group's variants
        for key, value in EBM_SHAPE_DEFAULTS.items():
            if key not in saved.ebm:
                saved.ebm[key] = value
    if saved.flow.name == "glow" and "scale_bound" not in saved.flow:
        saved.flow.scale_bound = math.inf
    if "tracking" in saved and "_target_" not in saved.tracking:
        saved.tracking._target_ = "fce.tracking.MLflowTracker"
        saved.tracking._partial_ = True
    options = {
        "dataset": "dataset",
        "ebm": "reference",
        "flow": saved.flow.name,
        "optimizer": saved.optimizer.get("name", "adam"),
        "threshold": saved.threshold.get("name", "fixed"),
        "schedule": saved.schedule.name,
        "estimator": saved.estimator.name,
    }
    for group, option in options.items():
        node = saved.get(group)
        if node is None or "_target_" in node:
            continue
        path = CONF_DIR / group / f"{option}.yaml"
        if group == "dataset":
            path = CONF_DIR / group / f"{saved.dataset.name}.yaml"
        current = OmegaConf.load(path)
        for key in INTERNAL_KEYS:
            if key in current:
                node[key] = current[key]
        if group == "estimator":  # an estimator's options default to what it did before them
            for key, value in current.items():
                if key != "defaults" and key not in node:
                    node[key] = value
    return saved


# --- validation: ranges and choices, one place -------------------------------------------------


# Upper bounds on sizes: far above anything these 2-D models need, far below what would end
# in an allocator error or a run of days (docs/configuration.md).
LIMITS = {
    "dataset.n_samples": 50_000_000,
    "train.batch_size": 1_000_000,
    "eval.n_points": 1_000_000,
    "eval.flow_samples": 1_000_000,
    "eval.grid_cells": 2048,
    # estimator=mle differentiates through every grid point each step: 1024^2 points hold
    # about 0.5 GiB per hidden layer of width 128, forward and backward.
    "estimator.grid_cells": 1024,
    "threads": 256,
    "flow.n_steps": 256,
    "flow.n_blocks": 256,
    "flow.n_layers": 256,
    "flow.bins": 256,
    "flow.width": 8192,
    "flow.hidden": 8192,
    "flow.hidden_layers": 32,
    "ebm.hidden": 8192,
}
# Each flow's integer sizes (besides hidden_layers): positive, at most their LIMITS.
FLOW_SIZES = {
    "glow": ("n_steps", "width"),
    "maf": ("n_blocks", "hidden"),
    "spline": ("n_layers", "bins", "hidden"),
}
SEED_MAX = 2**63 - 1  # torch.manual_seed's range, and the streams' seeds


def _positive_int(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r}: must be a positive integer")
    limit = LIMITS.get(key)
    if limit is not None and value > limit:
        raise ConfigError(f"{key}={value}: must be at most {limit:,}")


def _seed(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{key}={value!r}: must be an integer in [0, 2**63 - 1]")


def _finite(cfg: DictConfig, key: str, low: float = -math.inf) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int | float) or not math.isfinite(value) or value < low:
        bound = "" if low == -math.inf else f" >= {low:g}"
        raise ConfigError(f"{key}={value!r}: must be a finite number{bound}")


def total_steps(cfg: DictConfig | dict[str, Any]) -> int:
    """The steps a run of this config takes (``fce.trainer.Trainer.total_steps``): whole
    batches per epoch times the epochs, capped by ``train.max_steps``."""
    train, n_samples = cfg["train"], cfg["dataset"]["n_samples"]
    steps = n_samples // train["batch_size"] * train["epochs"]
    return steps if train["max_steps"] is None else min(steps, train["max_steps"])


def _schedule(cfg: DictConfig) -> None:
    schedule = cfg.schedule
    if schedule.name == "cosine":
        if not 0 <= schedule.min_factor <= 1:
            raise ConfigError(f"schedule.min_factor={schedule.min_factor}: must be in [0, 1]")
        _non_negative_int(cfg, "schedule.warmup")
        steps = total_steps(cfg)
        if schedule.warmup >= steps:
            raise ConfigError(
                f"schedule.warmup={schedule.warmup}: must be less than the run's {steps} steps"
            )
    elif schedule.name == "step":
        milestones = list(schedule.milestones)
        if not all(0 < m < 1 for m in milestones):
            raise ConfigError(
                f"schedule.milestones={milestones}: fractions of the run, each in (0, 1)"
            )
        if not 0 < schedule.gamma <= 1:
            raise ConfigError(f"schedule.gamma={schedule.gamma}: must be in (0, 1]")


def _fce_options(cfg: DictConfig) -> None:
    """FCE's contrast, flow objective and updates (docs/method.md): choices, ranges, and the
    combinations that would leave a setting without effect."""
    est = cfg.estimator
    _choice(cfg, "estimator.contrast", CONTRAST_NAMES)
    _choice(cfg, "estimator.flow_objective", FLOW_OBJECTIVE_NAMES)
    _choice(cfg, "estimator.updates", UPDATE_NAMES)
    _positive_float(cfg, "estimator.base_scale")
    _open_interval(cfg, "estimator.mixture_weight", 0.0, 1.0)
    _finite(cfg, "estimator.nll_weight", low=0.0)
    _open_interval(cfg, "estimator.accuracy_target", 0.0, 1.0)
    _positive_float(cfg, "estimator.controller_gain")
    if est.contrast == "gaussian" and est.flow_objective == "value":
        raise ConfigError(
            "estimator.contrast=gaussian: V does not depend on the flow then, so the flow "
            "would not learn; use estimator.flow_objective=nll"
        )
    if est.contrast == "gaussian" and est.base_scale != 1:
        raise ConfigError(
            f"estimator.base_scale={est.base_scale}: widens the flow's part of the contrast, "
            "and estimator.contrast=gaussian has none; use 1"
        )
    if est.flow_objective == "nll" and est.nll_weight != 0:
        raise ConfigError(
            f"estimator.nll_weight={est.nll_weight}: weighs the NLL against V, and "
            "estimator.flow_objective=nll is the NLL alone; use 0"
        )


def missing_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Settings without a value: a key removed with ``~key``, or a group with ``~group``."""
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return []
    found = []
    for spec in dataclasses.fields(schema):
        name = f"{prefix}{spec.name}"
        node = cfg._get_node(spec.name) if spec.name in cfg else None
        optional = "None" in str(spec.type)
        if node is None or node._is_missing() or (node._is_none() and not optional):
            found.append(name)
        elif isinstance(node, DictConfig):
            inner = missing_keys(node, f"{name}.")
            every = len(inner) == len(dataclasses.fields(OmegaConf.get_type(node) or object))
            found += [name] if inner and every else inner
    return found


def _non_negative_int(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{key}={value!r}: must be an integer >= 0 (0 turns it off)")


def _positive_float(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key}={value!r}: must be a positive number")


def _choice(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: unknown; choose one of: {', '.join(allowed)}")


def _open_interval(cfg: DictConfig, key: str, low: float, high: float) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int | float) or not low < value < high:
        raise ConfigError(f"{key}={value!r}: must be in ({low:g}, {high:g})")


def validate(cfg: DictConfig) -> None:
    """Check keys, choices and ranges of a composed config; raise ``ConfigError`` naming one."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(no_such_setting(unknown[0], cfg))
    missing = missing_keys(cfg)
    if missing:
        key = missing[0].split(".")[0] if "." in missing[0] else missing[0]
        raise ConfigError(f"{missing[0]}: has no value (removed with ~{key}?); every run needs it")
    _choice(cfg, "dataset.name", DATASET_NAMES)
    _choice(cfg, "flow.name", FLOW_NAMES)
    _choice(cfg, "optimizer.name", OPTIMIZER_NAMES)
    _choice(cfg, "threshold.name", THRESHOLD_NAMES)
    _choice(cfg, "schedule.name", SCHEDULE_NAMES)
    _choice(cfg, "estimator.name", ESTIMATOR_NAMES)
    if cfg.estimator.name == "nce":
        _choice(cfg, "estimator.noise", NOISE_NAMES)
        if cfg.estimator.noise == "flow" and not cfg.estimator.noise_checkpoint:
            raise ConfigError(
                "estimator.noise_checkpoint=None: estimator.noise=flow needs the checkpoint "
                "(file or run directory) of a trained flow"
            )
    if cfg.estimator.name == "fce":
        _fce_options(cfg)
    if cfg.estimator.name == "mle":
        _positive_int(cfg, "estimator.grid_cells")
        _positive_float(cfg, "estimator.grid_limit")
        if not isinstance(cfg.estimator.jitter, bool):
            raise ConfigError(f"estimator.jitter={cfg.estimator.jitter!r}: must be true or false")
    _choice(cfg, "device", DEVICES)
    _choice(cfg, "progress", PROGRESS_MODES)
    for key in ("dataset.n_samples", "train.batch_size", "train.epochs", "train.eval_every"):
        _positive_int(cfg, key)
    for key in ("train.plot_every", "train.checkpoint_every"):
        _non_negative_int(cfg, key)
    if cfg.train.max_steps is not None:
        _positive_int(cfg, "train.max_steps")
    if cfg.train.batch_size > cfg.dataset.n_samples:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size}: larger than dataset.n_samples="
            f"{cfg.dataset.n_samples}; must be at most the number of training points"
        )
    for key in ("optimizer.lr_ebm", "optimizer.lr_flow"):
        _positive_float(cfg, key)
    if len(cfg.optimizer.betas) != 2 or not all(0 <= b < 1 for b in cfg.optimizer.betas):
        raise ConfigError(f"optimizer.betas={list(cfg.optimizer.betas)}: two numbers in [0, 1)")
    _finite(cfg, "optimizer.weight_decay", low=0.0)
    _open_interval(cfg, "threshold.value", 0.0, 1.0)
    if cfg.threshold.name == "ema" and not 0 <= cfg.threshold.decay < 1:
        raise ConfigError(f"threshold.decay={cfg.threshold.decay}: must be in [0, 1)")
    for key in (*FLOW_SIZES[cfg.flow.name], "hidden_layers"):
        _positive_int(cfg, f"flow.{key}")
    if cfg.flow.name == "spline":
        _positive_float(cfg, "flow.tail_bound")
    else:
        if cfg.flow.name == "maf":
            _positive_float(cfg, "flow.scale_bound")
        bound = cfg.flow.scale_bound  # Glow: inf is no floor, as in the reference's Glow
        if not isinstance(bound, int | float) or not bound > 0:
            raise ConfigError(f"flow.scale_bound={bound!r}: must be a positive number (or inf)")
    hidden = list(cfg.ebm.hidden)
    if not hidden or any(
        not isinstance(h, int) or not 0 < h <= LIMITS["ebm.hidden"] for h in hidden
    ):
        raise ConfigError(
            f"ebm.hidden={hidden}: a non-empty list of integers in [1, {LIMITS['ebm.hidden']}]"
        )
    if len(hidden) > LIMITS["flow.hidden_layers"]:
        raise ConfigError(f"ebm.hidden={hidden}: at most {LIMITS['flow.hidden_layers']} layers")
    _finite(cfg, "ebm.negative_slope")
    _finite(cfg, "ebm.log_z_init")
    _schedule(cfg)
    ema_decay = cfg.train.ema_decay
    if not isinstance(ema_decay, int | float) or not 0 <= ema_decay < 1:
        raise ConfigError(f"train.ema_decay={ema_decay!r}: must be in [0, 1) (0 turns it off)")
    if ema_decay > 0 and cfg.estimator.name == "flow_mle":
        raise ConfigError(
            f"train.ema_decay={ema_decay}: averages the EBM's weights, and estimator=flow_mle "
            "trains no EBM; use 0"
        )
    _choice(cfg, "ebm.activation", EBM_ACTIVATIONS)
    _non_negative_int(cfg, "ebm.fourier_features")
    if cfg.ebm.fourier_features > LIMITS["ebm.hidden"]:
        raise ConfigError(
            f"ebm.fourier_features={cfg.ebm.fourier_features}: must be at most "
            f"{LIMITS['ebm.hidden']:,}"
        )
    _positive_float(cfg, "ebm.fourier_scale")
    _seed(cfg, "seed")
    _seed(cfg, "eval.seed")
    _positive_int(cfg, "threads")
    _positive_int(cfg, "eval.n_points")
    _positive_int(cfg, "eval.flow_samples")
    _positive_int(cfg, "eval.grid_cells")
    _positive_float(cfg, "eval.grid_limit")
    if "experiment" in cfg.tracking and not cfg.tracking.experiment:
        raise ConfigError("tracking.experiment='': must be a non-empty name")
