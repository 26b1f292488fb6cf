"""What a trial searches and how it is named: suggestions, distributions, run names, and
the one search space a study keeps."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import optuna
from omegaconf import DictConfig

from fce.errors import ConfigError
from fce.sweep_space import override

log = logging.getLogger("fce.sweep")
# The study user attribute that records its search space: a study is one space.
SPACE_ATTR = "fce.search_space"


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
    the tracked runs table (keys by their last part where that is unambiguous)."""
    last = [key.rsplit(".", 1)[-1] for key in params]
    parts = [
        f"{short if last.count(short) == 1 else key}={_short(value)}"
        for (key, value), short in zip(params.items(), last, strict=True)
    ]
    name = " ".join([f"t{number:03d}", *parts])
    return f"{prefix} {name}" if prefix else name


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
