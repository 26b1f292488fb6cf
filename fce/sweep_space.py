"""Study settings and search spaces: loaded, merged and checked without torch or optuna.

So a malformed space or a bad ``sweep.*`` value is reported in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fce.config import EVAL_METRICS, FLOW_METRICS, ConfigError, validate

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("minimize", "maximize")
METRICS = EVAL_METRICS
PARAM_TYPES = ("float", "int", "categorical")

Composer = Callable[[list[str]], DictConfig]


def space_names(space_dir: Path) -> list[str]:
    return sorted(p.stem for p in space_dir.glob("*.yaml"))


def load_sweep(name: str, space_dir: Path, defaults: Path, overrides: list[str]) -> DictConfig:
    """The study settings: defaults, then the search space file, then ``sweep.*`` overrides.

    ``name`` is a file of ``space_dir`` without its extension, or a path to any YAML file.
    """
    path = Path(name) if name.endswith((".yaml", ".yml")) else space_dir / f"{name}.yaml"
    name = path.stem
    if not path.is_file():
        raise ConfigError(
            f"sweep={name}: no search space {path}; choose one of: "
            f"{', '.join(space_names(space_dir))}"
        )
    try:
        space = OmegaConf.load(path)
    except Exception as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    try:
        settings = OmegaConf.merge(
            OmegaConf.load(defaults), space, OmegaConf.from_dotlist(overrides), {"name": name}
        )
    except Exception as error:
        raise ConfigError(f"sweep overrides {overrides}: {str(error).splitlines()[0]}") from None
    validate_sweep(settings, path, known=tuple(OmegaConf.load(defaults)))
    return settings


def _int_at_least(settings: DictConfig, key: str, low: int) -> None:
    value = settings.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"sweep.{key}={value!r}: must be an integer >= {low}")


SPACE_KEYS = ("name", "objective", "direction", "params", "description")


def validate_sweep(settings: DictConfig, path: Path, known: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(settings) - set(known) - set(SPACE_KEYS))
    if unknown:
        allowed = ", ".join(sorted({*known, *SPACE_KEYS} - {"name"}))
        raise ConfigError(f"sweep.{unknown[0]}: unknown setting; the settings are: {allowed}")
    _int_at_least(settings, "n_trials", 1)
    _int_at_least(settings, "n_jobs", 1)
    _int_at_least(settings, "pruner_startup_trials", 0)
    _int_at_least(settings, "pruner_warmup_evals", 0)
    _int_at_least(settings, "heartbeat_s", 1)
    for key, allowed in (
        ("sampler", SAMPLERS),
        ("pruner", PRUNERS),
        ("direction", DIRECTIONS),
        ("objective", METRICS),
    ):
        if settings.get(key) not in allowed:
            raise ConfigError(
                f"sweep.{key}={settings.get(key)!r}: choose one of: {', '.join(allowed)}"
            )
    params = settings.get("params")
    if not isinstance(params, DictConfig) or len(params) == 0:
        raise ConfigError(f"{path}: 'params' must map config keys to distributions")
    for key, spec in params.items():
        where = f"{path}: params.{key}"
        if not isinstance(spec, DictConfig) or spec.get("type") not in PARAM_TYPES:
            raise ConfigError(f"{where}: needs type: one of {', '.join(PARAM_TYPES)}")
        if spec.type == "categorical":
            if not spec.get("choices"):
                raise ConfigError(f"{where}: a categorical needs a non-empty 'choices' list")
            continue
        low, high = spec.get("low"), spec.get("high")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
            raise ConfigError(f"{where}: needs numeric low and high")
        if not low < high:
            raise ConfigError(f"{where}: low={low} must be < high={high}")
        if spec.get("log", False) and low <= 0:
            raise ConfigError(f"{where}: a log-scale range needs low > 0, got {low}")


def check_space_against_run(settings: DictConfig, compose: Composer, base: list[str]) -> None:
    """Every searched key exists and one trial's config validates."""
    cfg = compose(base)
    validate(cfg)
    if cfg.estimator.name == "flow_mle" and settings.objective not in FLOW_METRICS:
        raise ConfigError(
            f"sweep.objective={settings.objective}: estimator=flow_mle trains no EBM; "
            f"choose one of: {', '.join(FLOW_METRICS)}"
        )
    groups = ("dataset", "flow", "optimizer", "threshold", "estimator")
    for key in settings.params:
        if key not in groups and OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            raise ConfigError(f"sweep param {key}: no such key in the run config")
