"""Study settings and search spaces: loaded, merged and checked without torch or optuna.

So a malformed space or a bad ``sweep.*`` value is reported in a fraction of a second.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fce.compose import composition_error
from fce.config import validate
from fce.errors import ConfigError, first_line
from fce.names import ABOVE_2D_ONLY, EBM_METRICS, EVAL_METRICS, FLOW_METRICS, GRID_ONLY

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("minimize", "maximize")
METRICS = EVAL_METRICS
PARAM_TYPES = ("float", "int", "categorical")
# Config groups a space may search over: their values are option names, not numbers.
GROUPS = ("dataset", "ebm", "flow", "optimizer", "threshold", "schedule", "estimator")
# Samplers seed numpy, which takes seeds below 2**32; workers and continuations add to it.
MAX_SEED = 2**31 - 1

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
        raise ConfigError(f"{path}: not valid YAML ({first_line(error)})") from None
    try:
        settings = OmegaConf.merge(
            OmegaConf.load(defaults), space, OmegaConf.from_dotlist(overrides), {"name": name}
        )
    except Exception as error:
        raise ConfigError(f"sweep overrides {overrides}: {first_line(error)}") from None
    validate_sweep(settings, path, known=tuple(OmegaConf.load(defaults)))
    return settings


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_at_least(settings: DictConfig, key: str, low: int, high: int | None = None) -> None:
    value = settings.get(key)
    if high is not None and not (_is_int(value) and low <= value <= high):
        raise ConfigError(f"sweep.{key}={value!r}: must be an integer in [{low}, {high}]")
    if not _is_int(value) or value < low:
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
    _int_at_least(settings, "seed", 0, MAX_SEED)
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
        if spec.type == "int" and not (_is_int(low) and _is_int(high)):
            raise ConfigError(f"{where}: type int needs integer low and high, got {low}, {high}")
        if not low < high:
            raise ConfigError(f"{where}: low={low} must be < high={high}")
        if spec.get("log", False) and low <= 0:
            raise ConfigError(f"{where}: a log-scale range needs low > 0, got {low}")


def override(key: str, value: Any) -> str:
    """The Hydra override that sets ``key`` to a sampled ``value`` (floats in full precision)."""
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"


def extreme_values(spec: DictConfig) -> list[Any]:
    """The values of one searched key that bound what a trial can get: every choice of a
    categorical, both ends of a range (as the sampler returns them: floats stay floats)."""
    if spec.type == "categorical":
        return list(spec.choices)
    cast = int if spec.type == "int" else float
    return [cast(spec.low), cast(spec.high)]


def check_space_against_run(
    settings: DictConfig, compose: Composer, base: list[str], conf_dir: Path
) -> None:
    """Every value the space can produce composes and validates, before any trial exists.

    Each choice of a categorical and both ends of each range are composed with the run's
    overrides and validated, under every combination of the config groups the space
    chooses (a ``flow.*`` key may exist in one flow and not in another). So a bad option, a
    float on an integer key or an out-of-range bound is one line at the start, not a
    traceback in the middle of the study.
    """
    cfg = compose(base)
    validate(cfg)
    # Some metrics exist on one side of 2-D only (fce/metrics.py).
    dim, objective = cfg.dataset.dim, settings.objective
    fisher_in_2d = objective == "fisher_ebm" and cfg.eval.fisher is True
    if dim == 2 and objective in ABOVE_2D_ONLY and not fisher_in_2d:
        more = " (fisher_ebm with eval.fisher=true)" if objective == "fisher_ebm" else ""
        raise ConfigError(
            f"sweep.objective={objective}: reported above 2-D only{more}, and dataset.dim=2"
        )
    if dim > 2 and objective in GRID_ONLY:
        raise ConfigError(
            f"sweep.objective={objective}: needs the EBM normalised on a 2-D grid, and "
            f"dataset.dim={dim}; choose another (mse_logp_centered, fisher_ebm, kl_data_ebm...)"
        )
    # Estimators that train one model report that model's metrics alone.
    trains = getattr(OmegaConf.get_type(cfg.estimator), "trains", ("EBM", "flow"))
    if len(trains) == 1:
        metrics = EBM_METRICS if trains == ("EBM",) else FLOW_METRICS
        if settings.objective not in metrics:
            untrained = "flow" if trains == ("EBM",) else "EBM"
            raise ConfigError(
                f"sweep.objective={settings.objective}: estimator={cfg.estimator.name} trains "
                f"no {untrained}; choose one of: {', '.join(metrics)}"
            )
    where = f"sweep={settings.name}: params"
    groups = {key: spec for key, spec in settings.params.items() if key in GROUPS}
    for key, spec in groups.items():
        options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
        if spec.type != "categorical":
            raise ConfigError(
                f"{where}.{key}: {key} is a config group; search it with type: categorical "
                f"over its options: {', '.join(options)}"
            )
        for choice in spec.choices:
            if not isinstance(choice, str) or choice not in options:
                raise ConfigError(
                    f"{where}.{key}: {choice!r}: unknown {key}; choose one of: "
                    f"{', '.join(options)}"
                )
    for key in settings.params:
        if key not in groups and OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            raise ConfigError(f"sweep param {key}: no such key in the run config")

    def check(overrides: list[str], what: str) -> None:
        try:
            trial_cfg = compose([*base, *overrides])
        except Exception as error:  # composition: a key this group lacks, a wrong type
            raise ConfigError(f"{where}{what}: {composition_error(error)}") from None
        try:
            validate(trial_cfg)
        except ConfigError as error:
            raise ConfigError(f"{where}{what}: {error}") from None

    def combinations(names: list[str]) -> list[list[str]]:
        chosen = itertools.product(*(groups[name].choices for name in names))
        return [[override(n, c) for n, c in zip(names, combo, strict=True)] for combo in chosen]

    for combo in combinations(list(groups)):
        if combo:
            check(combo, f" can choose {' '.join(combo)}")
    for key, spec in settings.params.items():
        if key in groups:
            continue
        # The groups that decide whether (and with which type) this key exists.
        owners = [name for name in groups if key.startswith(f"{name}.")]
        for combo in combinations(owners):
            with_groups = f" with {' '.join(combo)}" if combo else ""
            for value in extreme_values(spec):
                check([*combo, override(key, value)], f".{key} can be {value!r}{with_groups}")
