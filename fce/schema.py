"""Typed schemas of the run configuration: each key's type and range; the values live in conf/.

Hydra registers these dataclasses as structured configs, so types are checked when a config
is composed; ``fce.config.validate`` then walks them, checking each field's range (its
``metadata["check"]``), and runs the cross-field rules: the run's (``fce.config.RULES``) and
each variant's own (``rules``). A variant is its class, its YAML file (a ``_target_`` and
values) and, where one is kept, its schema here, whose fields are the class's constructor
parameters (tests/test_configs.py checks them against the signature). Its name is the option
chosen (``flow=spline``): composition writes it into the node (``fce.config.name_options``).
Torch-free.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import MISSING, DictConfig, OmegaConf

from fce.errors import ConfigError
from fce.names import EBM_METRICS, EVAL_METRICS, FLOW_METRICS  # noqa: F401 (re-exported)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def options(group: str, conf_dir: Path = CONF_DIR) -> tuple[str, ...]:
    """The options of a config group: its YAML files, by name."""
    return tuple(sorted(p.stem for p in (conf_dir / group).glob("*.yaml")))


# The options, as conf/ holds them (datasets in the order tables show them).
DATASET_NAMES = ("8gaussians", "spiral", "2spirals", "checkerboard", "rings", "pinwheel")
FLOW_NAMES = options("flow")
ESTIMATOR_NAMES = options("estimator")
DEVICES = ("auto", "cpu", "cuda")
PROGRESS_MODES = ("auto", "bar", "log", "none")
EBM_ACTIVATIONS = ("leaky_relu", "silu", "softplus", "elu", "tanh")
# Keys of Hydra's instantiation machinery: not settings of the user's, so neither logged as
# MLflow params nor compared on resume.
INTERNAL_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")
# The groups whose option names the node (``flow=spline`` -> ``flow.name: spline``).
NAMED_GROUPS = ("dataset", "flow", "optimizer", "threshold", "schedule", "estimator")
SEED_MAX = 2**63 - 1  # torch.manual_seed's range, and the streams' seeds


# --- ranges: what a field's value may be, and the one line when it is not ----------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Count:
    """An integer >= ``low`` (1, or 0 where 0 turns a feature off), at most ``limit``: upper
    bounds far above anything these 2-D models need, far below an allocator error or a run
    of days (docs/configuration.md)."""

    low: int = 1
    limit: int | None = None

    def __call__(self, key: str, value: Any) -> None:
        if not _is_int(value) or value < self.low:
            if self.low == 1:
                raise ConfigError(f"{key}={value!r}: must be a positive integer")
            raise ConfigError(f"{key}={value!r}: must be an integer >= 0 (0 turns it off)")
        if self.limit is not None and value > self.limit:
            raise ConfigError(f"{key}={value}: must be at most {self.limit:,}")


@dataclass(frozen=True)
class Interval:
    """A number in an interval: ``closed`` says which ends belong to it ("()", "[)", ...);
    ``note`` follows the message ("0 turns it off")."""

    low: float
    high: float
    closed: str = "()"
    note: str = ""

    def __call__(self, key: str, value: Any) -> None:
        low_ok = value >= self.low if self.closed[0] == "[" else value > self.low
        high_ok = value <= self.high if self.closed[1] == "]" else value < self.high
        if not _is_number(value) or not (low_ok and high_ok):
            note = f" ({self.note})" if self.note else ""
            raise ConfigError(
                f"{key}={value!r}: must be in {self.closed[0]}{self.low:g}, {self.high:g}"
                f"{self.closed[1]}{note}"
            )


@dataclass(frozen=True)
class Positive:
    """A number > 0: finite, or also inf where ``inf`` says what inf means."""

    inf: bool = False

    def __call__(self, key: str, value: Any) -> None:
        if not _is_number(value) or not value > 0 or (math.isinf(value) and not self.inf):
            raise ConfigError(
                f"{key}={value!r}: must be a positive number" + (" (or inf)" if self.inf else "")
            )


@dataclass(frozen=True)
class Finite:
    """A finite number, at least ``low``."""

    low: float = -math.inf

    def __call__(self, key: str, value: Any) -> None:
        if not _is_number(value) or not math.isfinite(value) or value < self.low:
            bound = "" if self.low == -math.inf else f" >= {self.low:g}"
            raise ConfigError(f"{key}={value!r}: must be a finite number{bound}")


@dataclass(frozen=True)
class OneOf:
    """One of ``choices``."""

    choices: tuple[str, ...]

    def __call__(self, key: str, value: Any) -> None:
        if value not in self.choices:
            raise ConfigError(
                f"{key}={value!r}: unknown; choose one of: {', '.join(self.choices)}"
            )


@dataclass(frozen=True)
class Seed:
    """A seed: torch's and the streams' range."""

    def __call__(self, key: str, value: Any) -> None:
        if not _is_int(value) or not 0 <= value <= SEED_MAX:
            raise ConfigError(f"{key}={value!r}: must be an integer in [0, 2**63 - 1]")


@dataclass(frozen=True)
class Dimension:
    """A data dimension d: even (d / 2 copies of a 2-D dataset), in [2, ``limit``]."""

    limit: int

    def __call__(self, key: str, value: Any) -> None:
        if not _is_int(value) or value < 2 or value % 2 or value > self.limit:
            raise ConfigError(
                f"{key}={value!r}: must be an even integer in [2, {self.limit}] "
                "(d / 2 independent copies of the 2-D dataset)"
            )


@dataclass(frozen=True)
class Flag:
    def __call__(self, key: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: must be true or false")


@dataclass(frozen=True)
class Switch:
    """true, false or auto (what the run decides where it pays)."""

    def __call__(self, key: str, value: Any) -> None:
        if not (isinstance(value, bool) or value == "auto"):
            raise ConfigError(f"{key}={value!r}: unknown; choose one of: true, false, auto")


@dataclass(frozen=True)
class Name:
    """A non-empty string."""

    def __call__(self, key: str, value: Any) -> None:
        if not value:
            raise ConfigError(f"{key}={value!r}: must be a non-empty name")


@dataclass(frozen=True)
class Widths:
    """Hidden widths: a non-empty list of at most ``depth`` integers in [1, ``limit``]."""

    limit: int
    depth: int

    def __call__(self, key: str, value: Any) -> None:
        widths = list(value)
        if not widths or any(not _is_int(h) or not 0 < h <= self.limit for h in widths):
            raise ConfigError(f"{key}={widths}: a non-empty list of integers in [1, {self.limit}]")
        if len(widths) > self.depth:
            raise ConfigError(f"{key}={widths}: at most {self.depth} layers")


@dataclass(frozen=True)
class Betas:
    """Adam's two decay rates, each in [0, 1)."""

    def __call__(self, key: str, value: Any) -> None:
        betas = list(value)
        if len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"{key}={betas}: two numbers in [0, 1)")


@dataclass(frozen=True)
class Fractions:
    """Points of the run, as fractions of its steps, each in (0, 1)."""

    def __call__(self, key: str, value: Any) -> None:
        fractions = list(value)
        if not all(_is_number(m) and 0 < m < 1 for m in fractions):
            raise ConfigError(f"{key}={fractions}: fractions of the run, each in (0, 1)")


def checked(check: Any, default: Any = MISSING) -> Any:
    """A schema field whose value ``check(key, value)`` accepts."""
    return field(default=default, metadata={"check": check})


WIDTH, DEPTH, LAYERS, BINS = Count(limit=8192), Count(limit=32), Count(limit=256), Count(limit=256)


@dataclass
class Node:
    """A config group node: what to build (``_target_``), and the cross-field rules of its
    variant (``rules``, called with the whole run's config once every field is in range)."""

    _target_: str = MISSING

    @staticmethod
    def rules(cfg: DictConfig) -> None:
        return None


@dataclass
class PartialNode(Node):
    """A node built in two steps: the config's values now, the run's objects later."""

    _partial_: bool = True


@dataclass
class DatasetConfig(Node):
    name: str = MISSING  # the option chosen (dataset=rings)
    n_samples: int = checked(Count(limit=50_000_000))
    dim: int = checked(Dimension(limit=64))  # d: the product of d / 2 copies of the 2-D data


@dataclass
class EBMConfig(Node):
    hidden: list[int] = checked(Widths(limit=8192, depth=32))
    negative_slope: float = checked(Finite())
    log_z_init: float = checked(Finite())
    activation: str = checked(OneOf(EBM_ACTIVATIONS))
    fourier_features: int = checked(Count(low=0, limit=8192))  # 0: none
    fourier_scale: float = checked(Positive())
    # none; or noise: log p = log q - f - c on the estimator's fixed noise q (NCE's)
    base: str = checked(OneOf(("none", "noise")), default="none")

    @staticmethod
    def rules(cfg: DictConfig) -> None:
        schema = OmegaConf.get_type(cfg.estimator)
        if cfg.ebm.base == "noise" and not getattr(schema, "fixed_noise", False):
            raise ConfigError(
                f"ebm.base=noise: puts the energy on the estimator's fixed noise, and "
                f"estimator={cfg.estimator.name} has none; use estimator=nce (or ebm.base=none)"
            )


@dataclass
class FlowConfig(Node):
    name: str = MISSING  # the option chosen (flow=glow)


@dataclass
class GlowConfig(FlowConfig):
    n_steps: int = checked(LAYERS)
    width: int = checked(WIDTH)
    hidden_layers: int = checked(DEPTH)
    scale_bound: float = checked(Positive(inf=True))  # log s >= -scale_bound; inf: no floor


@dataclass
class MAFConfig(FlowConfig):
    n_blocks: int = checked(LAYERS)
    hidden: int = checked(WIDTH)
    hidden_layers: int = checked(DEPTH)
    scale_bound: float = checked(Positive())


@dataclass
class SplineConfig(FlowConfig):
    n_layers: int = checked(LAYERS)
    bins: int = checked(BINS)
    hidden: int = checked(WIDTH)
    hidden_layers: int = checked(DEPTH)
    tail_bound: float = checked(Positive())  # each spline bends [-tail_bound, tail_bound]


@dataclass
class OptimizerConfig(Node):
    name: str = MISSING  # the option chosen (optimizer=adam): the algorithm
    lr_ebm: float = checked(Positive())
    lr_flow: float = checked(Positive())
    betas: list[float] = checked(Betas())
    weight_decay: float = checked(Finite(low=0.0))
    fused: bool = checked(Flag())


@dataclass
class FixedThresholdConfig(Node):
    name: str = MISSING
    value: float = checked(Interval(0.0, 1.0))


@dataclass
class EMAThresholdConfig(FixedThresholdConfig):
    decay: float = checked(Interval(0.0, 1.0, "[)"))


@dataclass
class ScheduleConfig(Node):
    name: str = MISSING


@dataclass
class CosineScheduleConfig(ScheduleConfig):
    min_factor: float = checked(Interval(0.0, 1.0, "[]"))
    warmup: int = checked(Count(low=0))

    @staticmethod
    def rules(cfg: DictConfig) -> None:
        steps = total_steps(cfg)
        if cfg.schedule.warmup >= steps:
            raise ConfigError(
                f"schedule.warmup={cfg.schedule.warmup}: must be less than the run's {steps} steps"
            )


@dataclass
class StepScheduleConfig(ScheduleConfig):
    milestones: list[float] = checked(Fractions())
    gamma: float = checked(Interval(0.0, 1.0, "(]"))


@dataclass
class EstimatorConfig(PartialNode):
    """An estimator's options. ``trains``: the models it trains, whose metrics its runs
    report (an objective on the other's is refused before a study starts)."""

    name: str = MISSING
    trains: ClassVar[tuple[str, ...]] = ("EBM", "flow")


@dataclass
class FlowMLEEstimatorConfig(EstimatorConfig):
    trains: ClassVar[tuple[str, ...]] = ("flow",)

    @staticmethod
    def rules(cfg: DictConfig) -> None:
        if cfg.train.ema_decay > 0:
            raise ConfigError(
                f"train.ema_decay={cfg.train.ema_decay}: averages the EBM's weights, and "
                f"estimator={cfg.estimator.name} trains no EBM; use 0"
            )


@dataclass
class FCEEstimatorConfig(EstimatorConfig):
    # what the EBM is contrasted against: the flow (the paper's), a mixture with the fitted
    # Gaussian, or that Gaussian alone
    contrast: str = checked(OneOf(("flow", "mixture", "gaussian")))
    base_scale: float = checked(Positive())  # T: the flow's base N(0, T^2 I) in the contrast
    mixture_weight: float = checked(Interval(0.0, 1.0))  # the flow's share of contrast=mixture
    flow_objective: str = checked(OneOf(("value", "nll")))  # V + nll_weight NLL, or NLL alone
    nll_weight: float = checked(Finite(low=0.0))  # lambda of flow_objective=value
    updates: str = checked(OneOf(("alternate", "simultaneous", "controlled")))
    accuracy_target: float = checked(Interval(0.0, 1.0))  # updates=controlled: held accuracy
    controller_gain: float = checked(Positive())  # updates=controlled: s += gain (acc - target)

    @staticmethod
    def rules(cfg: DictConfig) -> None:
        """The combinations that would leave a setting without effect."""
        est = cfg.estimator
        if est.contrast == "gaussian" and est.flow_objective == "value":
            raise ConfigError(
                "estimator.contrast=gaussian: V does not depend on the flow then, so the flow "
                "would not learn; use estimator.flow_objective=nll"
            )
        if est.contrast == "gaussian" and est.base_scale != 1:
            raise ConfigError(
                f"estimator.base_scale={est.base_scale}: widens the flow's part of the "
                "contrast, and estimator.contrast=gaussian has none; use 1"
            )
        if est.flow_objective == "nll" and est.nll_weight != 0:
            raise ConfigError(
                f"estimator.nll_weight={est.nll_weight}: weighs the NLL against V, and "
                "estimator.flow_objective=nll is the NLL alone; use 0"
            )


@dataclass
class NCEEstimatorConfig(EstimatorConfig):
    trains: ClassVar[tuple[str, ...]] = ("EBM",)
    fixed_noise: ClassVar[bool] = True  # what ebm.base=noise sits on
    noise: str = checked(OneOf(("gaussian", "flow")))  # a fitted Gaussian or a frozen flow
    noise_checkpoint: str | None = MISSING  # noise=flow: a checkpoint (or run dir) with a flow
    base_scale: float = checked(Positive())  # noise=flow: T, that flow's base N(0, T^2 I)

    @staticmethod
    def rules(cfg: DictConfig) -> None:
        est = cfg.estimator
        if est.noise == "flow" and not est.noise_checkpoint:
            raise ConfigError(
                "estimator.noise_checkpoint=None: estimator.noise=flow needs the checkpoint "
                "(file or run directory) of a trained flow"
            )
        if est.noise == "gaussian" and est.base_scale != 1:
            raise ConfigError(
                f"estimator.base_scale={est.base_scale}: widens a flow's base, and "
                "estimator.noise=gaussian has no flow; use 1 (or estimator.noise=flow)"
            )


@dataclass
class MLEEstimatorConfig(EstimatorConfig):
    trains: ClassVar[tuple[str, ...]] = ("EBM",)
    # estimator=mle differentiates through every grid point each step: 1024^2 points hold
    # about 0.5 GiB per hidden layer of width 128, forward and backward.
    grid_cells: int = checked(Count(limit=1024))  # grid_cells^2 points a step
    grid_limit: float = checked(Positive())  # the square [-grid_limit, grid_limit]^2
    jitter: bool = checked(Flag())  # shift the whole grid by one uniform offset each step

    @staticmethod
    def rules(cfg: DictConfig) -> None:
        if cfg.dataset.dim != 2:
            raise ConfigError(
                f"dataset.dim={cfg.dataset.dim}: estimator=mle normalises the EBM on a 2-D "
                "grid; use dataset.dim=2 (or another estimator)"
            )


@dataclass
class MLflowTrackingConfig(PartialNode):
    uri: str | None = MISSING  # None: $MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db
    experiment: str = checked(Name())
    run_name: str | None = MISSING


@dataclass
class TrainConfig:
    batch_size: int = checked(Count(limit=1_000_000))
    epochs: int = checked(Count())
    max_steps: int | None = checked(Count())  # None: the epochs decide
    eval_every: int = checked(Count())
    plot_every: int = checked(Count(low=0))
    checkpoint_every: int = checked(Count(low=0))
    # EMA of the EBM's weights, evaluated instead of them
    ema_decay: float = checked(Interval(0.0, 1.0, "[)", note="0 turns it off"))
    resume: str | None = MISSING
    # the flow's no-grad passes under torch.compile (fce.flows.fused): true, false or auto
    compile: Any = checked(Switch())


@dataclass
class EvalConfig:
    n_points: int = checked(Count(limit=1_000_000))
    flow_samples: int = checked(Count(limit=1_000_000))  # for kl_flow_data and js_flow_data
    seed: int = checked(Seed())
    grid_limit: float = checked(Positive())
    grid_cells: int = checked(Count(limit=2048))
    # dataset.dim > 2: the EBM's log Z by importance sampling, reported only where the
    # weights' effective sample size reaches min_ess
    logz_samples: int = checked(Count(limit=10_000_000))
    min_ess: int = checked(Count(limit=10_000_000))
    fisher: Any = checked(Switch())  # fisher_ebm: auto (above 2-D), true (also in 2-D), false
    # dataset.dim > 2: the log Z that metrics use, by importance sampling or by annealed
    # importance sampling (importance sampling's ESS and se logged beside it)
    logz: str = checked(OneOf(("importance", "annealed")))
    ais_chains: int = checked(Count(limit=1_000_000))
    ais_steps: int = checked(Count(limit=1_000_000))


@dataclass
class RunConfig:
    """One run's configuration, as composed from conf/ and typed by these schemas.

    The library takes this type; at run time it is the ``DictConfig`` Hydra composed, which
    reads the same (``cfg.flow.n_steps``) and keeps the schema's types on assignment.
    """

    dataset: DatasetConfig = MISSING
    ebm: EBMConfig = MISSING
    flow: Any = MISSING  # a FlowConfig
    optimizer: OptimizerConfig = MISSING
    threshold: Any = MISSING  # FixedThresholdConfig | EMAThresholdConfig
    schedule: Any = MISSING  # ScheduleConfig | CosineScheduleConfig | StepScheduleConfig
    estimator: Any = MISSING  # an EstimatorConfig
    tracking: Any = MISSING  # MLflowTrackingConfig | PartialNode (none)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = checked(Seed())
    device: str = checked(OneOf(DEVICES))
    threads: int = checked(Count(limit=256))
    progress: str = checked(OneOf(PROGRESS_MODES))


def total_steps(cfg: DictConfig | dict[str, Any]) -> int:
    """The steps a run of this config takes (``fce.trainer.Trainer.total_steps``): whole
    batches per epoch times the epochs, capped by ``train.max_steps``."""
    train, n_samples = cfg["train"], cfg["dataset"]["n_samples"]
    steps = n_samples // train["batch_size"] * train["epochs"]
    return steps if train["max_steps"] is None else min(steps, train["max_steps"])


# The schemas conf/ files name in their defaults (``/schema/flow/spline@_here_``).
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
        "fce": FCEEstimatorConfig,
        "nce": NCEEstimatorConfig,
        "flow_mle": FlowMLEEstimatorConfig,
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
