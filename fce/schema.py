"""Typed schemas of the run configuration: the types of every key; the values live in conf/.

Hydra registers these dataclasses as structured configs, so types are checked when a config
is composed; ``fce.config.validate`` then checks ranges, choices and keys. Torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from fce.names import EBM_METRICS, EVAL_METRICS, FLOW_METRICS  # noqa: F401 (re-exported)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DATASET_NAMES = ("8gaussians", "spiral", "2spirals", "checkerboard", "rings", "pinwheel")
FLOW_NAMES = ("glow", "maf", "spline")
OPTIMIZER_NAMES = ("adam", "adamw")
THRESHOLD_NAMES = ("fixed", "ema")
EBM_ACTIVATIONS = ("leaky_relu", "silu", "softplus", "elu", "tanh")
SCHEDULE_NAMES = ("constant", "cosine", "step")
ESTIMATOR_NAMES = ("fce", "nce", "flow_mle", "mle")
NOISE_NAMES = ("gaussian", "flow")  # NCE's fixed noise: a fitted Gaussian or a frozen flow
# FCE's options (fce/estimators/fce_estimator.py, fce/contrast.py); the first is the paper's.
CONTRAST_NAMES = ("flow", "mixture", "gaussian")
FLOW_OBJECTIVE_NAMES = ("value", "nll")
UPDATE_NAMES = ("alternate", "simultaneous", "controlled")
DEVICES = ("auto", "cpu", "cuda")
PROGRESS_MODES = ("auto", "bar", "log", "none")
# Keys of Hydra's instantiation machinery: not settings of the user's, so neither logged as
# MLflow params nor compared on resume.
INTERNAL_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


@dataclass
class Node:
    """A config group node: what to build (``_target_``)."""

    _target_: str = MISSING


@dataclass
class PartialNode(Node):
    """A node built in two steps: the config's values now, the run's objects later."""

    _partial_: bool = True


@dataclass
class DatasetConfig(Node):
    name: str = MISSING
    n_samples: int = MISSING


@dataclass
class EBMConfig(Node):
    hidden: list[int] = MISSING
    negative_slope: float = MISSING
    log_z_init: float = MISSING
    activation: str = MISSING
    fourier_features: int = MISSING  # 0: none
    fourier_scale: float = MISSING


@dataclass
class GlowConfig(Node):
    name: str = MISSING
    n_steps: int = MISSING
    width: int = MISSING
    hidden_layers: int = MISSING
    scale_bound: float = MISSING  # log s >= -scale_bound in every coupling


@dataclass
class MAFConfig(Node):
    name: str = MISSING
    n_blocks: int = MISSING
    hidden: int = MISSING
    hidden_layers: int = MISSING
    scale_bound: float = MISSING


@dataclass
class SplineConfig(Node):
    name: str = MISSING
    n_layers: int = MISSING
    bins: int = MISSING
    hidden: int = MISSING
    hidden_layers: int = MISSING
    tail_bound: float = MISSING  # each spline bends [-tail_bound, tail_bound]; identity outside


@dataclass
class OptimizerConfig(Node):
    name: str = MISSING
    lr_ebm: float = MISSING
    lr_flow: float = MISSING
    betas: list[float] = MISSING
    weight_decay: float = MISSING
    fused: bool = MISSING


@dataclass
class FixedThresholdConfig(Node):
    name: str = MISSING
    value: float = MISSING


@dataclass
class EMAThresholdConfig(FixedThresholdConfig):
    decay: float = MISSING


@dataclass
class ScheduleConfig(Node):
    name: str = MISSING


@dataclass
class CosineScheduleConfig(ScheduleConfig):
    min_factor: float = MISSING
    warmup: int = MISSING


@dataclass
class StepScheduleConfig(ScheduleConfig):
    milestones: list[float] = MISSING
    gamma: float = MISSING


@dataclass
class EstimatorConfig(PartialNode):
    name: str = MISSING


@dataclass
class FCEEstimatorConfig(EstimatorConfig):
    contrast: str = MISSING  # what the EBM is contrasted against: flow, mixture, gaussian
    base_scale: float = MISSING  # T: the flow's base N(0, T^2 I) in the contrast (1: itself)
    mixture_weight: float = MISSING  # the flow's share of contrast=mixture, in (0, 1)
    flow_objective: str = MISSING  # value (V + nll_weight NLL, the paper's) or nll alone
    nll_weight: float = MISSING  # lambda >= 0 of flow_objective=value
    updates: str = MISSING  # alternate (the threshold rule), simultaneous, controlled
    accuracy_target: float = MISSING  # updates=controlled: the accuracy it holds
    controller_gain: float = MISSING  # updates=controlled: s += gain (acc - target) a step


@dataclass
class NCEEstimatorConfig(EstimatorConfig):
    noise: str = MISSING
    noise_checkpoint: str | None = MISSING  # noise=flow: a checkpoint (or run dir) with a flow


@dataclass
class MLEEstimatorConfig(EstimatorConfig):
    grid_cells: int = MISSING  # the quadrature's cells per axis: grid_cells^2 points a step
    grid_limit: float = MISSING  # the square [-grid_limit, grid_limit]^2 it integrates over
    jitter: bool = MISSING  # shift the whole grid by one uniform offset each step


@dataclass
class MLflowTrackingConfig(PartialNode):
    uri: str | None = MISSING  # None: $MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db
    experiment: str = MISSING
    run_name: str | None = MISSING


@dataclass
class TrainConfig:
    batch_size: int = MISSING
    epochs: int = MISSING
    max_steps: int | None = MISSING
    eval_every: int = MISSING
    plot_every: int = MISSING
    checkpoint_every: int = MISSING
    ema_decay: float = MISSING  # EMA of the EBM's weights, evaluated instead of them (0: off)
    resume: str | None = MISSING


@dataclass
class EvalConfig:
    n_points: int = MISSING
    flow_samples: int = MISSING  # the flow's samples for kl_flow_data and js_flow_data
    seed: int = MISSING
    grid_limit: float = MISSING
    grid_cells: int = MISSING


@dataclass
class RunConfig:
    """One run's configuration, as composed from conf/ and typed by these schemas.

    The library takes this type; at run time it is the ``DictConfig`` Hydra composed, which
    reads the same (``cfg.flow.n_steps``) and keeps the schema's types on assignment.
    """

    dataset: DatasetConfig = MISSING
    ebm: EBMConfig = MISSING
    flow: Any = MISSING  # GlowConfig | MAFConfig | SplineConfig
    optimizer: OptimizerConfig = MISSING
    threshold: Any = MISSING  # FixedThresholdConfig | EMAThresholdConfig
    schedule: Any = MISSING  # ScheduleConfig | CosineScheduleConfig | StepScheduleConfig
    estimator: Any = MISSING  # EstimatorConfig | FCE-, NCE- or MLEEstimatorConfig
    tracking: Any = MISSING  # MLflowTrackingConfig | PartialNode (none)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = MISSING
    device: str = MISSING
    threads: int = MISSING
    progress: str = MISSING


SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": {"dataset": DatasetConfig},
    "ebm": {"ebm": EBMConfig},
    "flow": {"glow": GlowConfig, "maf": MAFConfig, "spline": SplineConfig},
    "optimizer": {"optimizer": OptimizerConfig},
    "threshold": {"fixed": FixedThresholdConfig, "ema": EMAThresholdConfig},
    "schedule": {
        "constant": ScheduleConfig,
        "cosine": CosineScheduleConfig,
        "step": StepScheduleConfig,
    },
    "estimator": {
        "estimator": EstimatorConfig,
        "fce": FCEEstimatorConfig,
        "nce": NCEEstimatorConfig,
        "mle": MLEEstimatorConfig,
    },
    "tracking": {"mlflow": MLflowTrackingConfig, "none": PartialNode},
}


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (called once, from the entry points)."""
    from hydra.core.config_store import ConfigStore

    # ``${pid:}`` in conf/config.yaml: the run directory of each process is its own.
    # Cached like Hydra's ${now:}: a multirun's workers resolve it as the launcher did.
    OmegaConf.register_new_resolver("pid", os.getpid, replace=True, use_cache=True)
    store = ConfigStore.instance()
    # Schemas live in their own "schema" group so they never show up as user choices.
    store.store(group="schema", name="run", node=RunConfig)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            store.store(group=f"schema/{group}", name=name, node=node)
