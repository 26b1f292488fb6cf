"""Typed schemas of the run configuration, and their validation.

Torch-free on purpose: ``run.py`` validates the composed config and reports bad input in well
under a second, before torch or mlflow are imported. Hydra registers these dataclasses as
structured configs (types are checked at composition); ``validate`` then checks ranges and
choices and names the offending key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

DATASET_NAMES = ("8gaussians", "spiral", "2spirals", "checkerboard", "rings", "pinwheel")
FLOW_NAMES = ("glow", "maf")
OPTIMIZER_NAMES = ("adam", "adamw")
THRESHOLD_NAMES = ("fixed", "ema")
ESTIMATOR_NAMES = ("fce", "nce", "flow_mle")
NOISE_NAMES = ("gaussian", "flow")  # NCE's fixed noise: a fitted Gaussian or a frozen flow
DEVICES = ("auto", "cpu", "cuda")
# What an evaluation logs (fce/metrics.py), in the order tables show them.
EVAL_METRICS = (
    "nll_ebm",
    "nll_flow",
    "nll_data",
    "kl_data_ebm",
    "kl_data_flow",
    "tv_ebm",
    "mse_logp",
    "mse_logp_centered",
    "logz_gap",
    "flow_step_share",
)
# What an evaluation reports for an estimator that never trains the EBM (flow_mle).
FLOW_METRICS = ("nll_flow", "nll_data", "kl_data_flow")


class ConfigError(ValueError):
    """Bad user input, reported as one line that names the key and what is allowed."""


@dataclass
class DatasetConfig:
    name: str = "8gaussians"
    n_samples: int = 500_000


@dataclass
class GlowConfig:
    _target_: str = "fce.flows.Glow"
    name: str = "glow"
    n_steps: int = 10
    width: int = 64
    hidden_layers: int = 2
    scale_bound: float = 10.0  # log s >= -scale_bound in every coupling


@dataclass
class MAFConfig:
    _target_: str = "fce.flows.MAF"
    name: str = "maf"
    n_blocks: int = 5
    hidden: int = 100
    hidden_layers: int = 2
    scale_bound: float = 3.0


@dataclass
class EBMConfig:
    hidden: list[int] = field(default_factory=lambda: [128, 128])
    negative_slope: float = 0.2
    log_z_init: float = 1.0


@dataclass
class OptimizerConfig:
    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    name: str = "adam"
    lr_ebm: float = 1e-3
    lr_flow: float = 7e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    fused: bool = True  # one fused kernel for the update: 0.6 ms instead of 3.5 for Glow


@dataclass
class FixedThresholdConfig:
    name: str = "fixed"
    value: float = 0.6


@dataclass
class EMAThresholdConfig:
    name: str = "ema"
    value: float = 0.6
    decay: float = 0.9


@dataclass
class FCEEstimatorConfig:
    name: str = "fce"


@dataclass
class NCEEstimatorConfig:
    name: str = "nce"
    noise: str = "gaussian"
    noise_checkpoint: str | None = None  # noise=flow: a checkpoint (or run dir) with a flow


@dataclass
class FlowMLEEstimatorConfig:
    name: str = "flow_mle"


@dataclass
class TrainConfig:
    batch_size: int = 1000
    epochs: int = 10
    max_steps: int | None = None
    eval_every: int = 250
    plot_every: int = 1000
    checkpoint_every: int = 1000
    resume: str | None = None


@dataclass
class EvalConfig:
    n_points: int = 20_000
    seed: int = 0
    grid_limit: float = 4.0
    grid_cells: int = 256


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: sqlite:///<project root>/mlflow.db
    experiment: str = "fce"
    run_name: str | None = None


@dataclass
class FCEConfig:
    dataset: DatasetConfig = MISSING
    flow: Any = MISSING
    optimizer: OptimizerConfig = MISSING
    threshold: Any = MISSING
    estimator: Any = MISSING
    ebm: EBMConfig = field(default_factory=EBMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 42
    device: str = "auto"
    threads: int = 1
    progress: str = "auto"


def upgrade(saved: DictConfig) -> DictConfig:
    """A config saved by an older fce, with the defaults of keys added since (in place)."""
    if "estimator" not in saved:  # before the estimator group, every run was FCE
        saved.estimator = {"name": "fce"}
    if saved.flow.name == "glow" and "scale_bound" not in saved.flow:
        saved.flow.scale_bound = math.inf  # Glow's log-scale had no floor then
    return saved


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (called once, from the entry points)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    # Schemas live in their own "schema" group so they never show up as user choices.
    store.store(group="schema", name="fce", node=FCEConfig)
    store.store(group="schema/dataset", name="dataset", node=DatasetConfig)
    store.store(group="schema/flow", name="glow", node=GlowConfig)
    store.store(group="schema/flow", name="maf", node=MAFConfig)
    store.store(group="schema/optimizer", name="optimizer", node=OptimizerConfig)
    store.store(group="schema/threshold", name="fixed", node=FixedThresholdConfig)
    store.store(group="schema/threshold", name="ema", node=EMAThresholdConfig)
    store.store(group="schema/estimator", name="fce", node=FCEEstimatorConfig)
    store.store(group="schema/estimator", name="nce", node=NCEEstimatorConfig)
    store.store(group="schema/estimator", name="flow_mle", node=FlowMLEEstimatorConfig)


def _positive_int(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r}: must be a positive integer")


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
    """Check choices and ranges of a composed config; raise ``ConfigError`` naming the key."""
    _choice(cfg, "dataset.name", DATASET_NAMES)
    _choice(cfg, "flow.name", FLOW_NAMES)
    _choice(cfg, "optimizer.name", OPTIMIZER_NAMES)
    _choice(cfg, "threshold.name", THRESHOLD_NAMES)
    _choice(cfg, "estimator.name", ESTIMATOR_NAMES)
    if cfg.estimator.name == "nce":
        _choice(cfg, "estimator.noise", NOISE_NAMES)
        if cfg.estimator.noise == "flow" and not cfg.estimator.noise_checkpoint:
            raise ConfigError(
                "estimator.noise_checkpoint=None: estimator.noise=flow needs the checkpoint "
                "(file or run directory) of a trained flow"
            )
    _choice(cfg, "device", DEVICES)
    _choice(cfg, "progress", ("auto", "bar", "log", "none"))
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
    if cfg.optimizer.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay={cfg.optimizer.weight_decay}: must be >= 0")
    _open_interval(cfg, "threshold.value", 0.0, 1.0)
    if cfg.threshold.name == "ema" and not 0 <= cfg.threshold.decay < 1:
        raise ConfigError(f"threshold.decay={cfg.threshold.decay}: must be in [0, 1)")
    flow_sizes = ("n_steps", "width") if cfg.flow.name == "glow" else ("n_blocks", "hidden")
    for key in (*flow_sizes, "hidden_layers"):
        _positive_int(cfg, f"flow.{key}")
    if cfg.flow.name == "maf":
        _positive_float(cfg, "flow.scale_bound")
    bound = cfg.flow.scale_bound  # Glow: inf is no floor, as in the reference's Glow
    if not isinstance(bound, int | float) or not bound > 0:
        raise ConfigError(f"flow.scale_bound={bound!r}: must be a positive number (or inf)")
    if not cfg.ebm.hidden or any(not isinstance(h, int) or h <= 0 for h in cfg.ebm.hidden):
        raise ConfigError(f"ebm.hidden={list(cfg.ebm.hidden)}: a non-empty list of positive ints")
    _positive_int(cfg, "threads")
    _positive_int(cfg, "eval.n_points")
    _positive_int(cfg, "eval.grid_cells")
    _positive_float(cfg, "eval.grid_limit")
    if not cfg.tracking.experiment:
        raise ConfigError("tracking.experiment='': must be a non-empty name")
