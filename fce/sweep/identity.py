"""What makes a study one study: its name, the directory of its trials, the runs its trials
are (the settings they share), and the name of its objective."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import optuna
from omegaconf import DictConfig

from fce.config import user_settings
from fce.errors import ConfigError
from fce.sweep_space import GROUPS, Composer, override
from fce.tracking import flatten

# The study user attribute that keys its trials' directories: two studies of one name (in two
# storages, or one made again after its database was deleted) never share a directory.
UID_ATTR = "fce.study_uid"
# The study user attribute that records the settings its trials share (``run_definition``).
RUN_ATTR = "fce.run"
# Settings that change how a trial is run or logged but not what it trains or how it is
# scored, so a continuation may change them: where it logs, how it shows progress, the device
# and threads and a fused optimizer step (at most the last bits of a float differ), how often
# it draws panels and saves checkpoints.
NOT_DEFINING = (
    "tracking",
    "progress",
    "threads",
    "device",
    "optimizer.fused",
    "train.resume",
    "train.plot_every",
    "train.checkpoint_every",
)
# Parts of a study's default name, each left out when the space searches it.
NAMED_BY = ("dataset", "flow")
# How many differing settings a refusal lists before it says how many more.
SHOWN = 4


def default_study_name(settings: DictConfig, cfg: DictConfig) -> str:
    """``<space>-<dataset>-<flow>``, without the groups the space searches: a study of the
    flow is named by its space and dataset alone, whatever flow the command line gives."""
    parts = [str(settings.name)]
    parts += [str(cfg[group].name) for group in NAMED_BY if group not in settings.params]
    return "-".join(parts)


def _defining(key: str, searched: set[str]) -> bool:
    if key in searched or any(key == f"{group}.name" for group in searched & set(GROUPS)):
        return False
    return not any(key == part or key.startswith(f"{part}.") for part in NOT_DEFINING)


def run_definition(settings: DictConfig, compose: Composer, base: list[str]) -> dict[str, str]:
    """The resolved settings every trial of the study shares: the run config of ``base``
    without the searched keys and ``NOT_DEFINING``, as ``{"train.max_steps": "300", ...}``.

    A group the space searches decides which keys exist and their defaults, so the config is
    composed under each combination of the searched groups' choices; a key whose value
    depends on the combination is recorded once per combination, as ``key [flow=maf]``.
    """
    searched = set(settings.params)
    groups = [key for key in settings.params if key in GROUPS]
    flats: list[tuple[dict[str, str], dict[str, str]]] = []
    for combo in itertools.product(*(settings.params[g].choices for g in groups)):
        chosen = dict(zip(groups, map(str, combo), strict=True))
        cfg = compose([*base, *(override(g, c) for g, c in zip(groups, combo, strict=True))])
        flat = flatten(user_settings(cfg))
        flats.append((chosen, {k: v for k, v in flat.items() if _defining(k, searched)}))
    found: dict[str, str] = {}
    for key in sorted(set().union(*(flat for _, flat in flats))):
        values = [(chosen, flat.get(key)) for chosen, flat in flats]
        if len({value for _, value in values}) == 1:
            found[key] = str(values[0][1])
            continue
        # Labelled by the searched group the key belongs to where that alone decides it,
        # else by the whole combination.
        owner = key.split(".", 1)[0]
        labelled: dict[str, set[str | None]] = {}
        for chosen, value in values:
            label = f"{owner}={chosen[owner]}" if owner in chosen else ""
            labelled.setdefault(label, set()).add(value)
        if "" in labelled or any(len(v) > 1 for v in labelled.values()):
            labelled = {
                " ".join(f"{g}={c}" for g, c in chosen.items()): {value}
                for chosen, value in values
            }
        for label, (value,) in labelled.items():
            if value is not None:
                found[f"{key} [{label}]"] = value
    return found


def check_same_run(study: optuna.Study, definition: dict[str, str], where: str) -> None:
    """Record the settings the study's trials share the first time; refuse other ones.

    Trials of other runs (another estimator, other steps) would be ranked as if they were
    draws of the same search. Keys known to one side only (a setting added to the project
    since the study began) are not compared: a changed group shows in its ``name``.
    Studies made before this was recorded take the settings of their first continuation.
    """
    recorded: dict[str, Any] | None = study.user_attrs.get(RUN_ATTR)
    if recorded is None:
        study.set_user_attr(RUN_ATTR, definition)
        return
    differ = sorted(k for k in recorded.keys() & definition.keys() if recorded[k] != definition[k])
    if not differ:
        return
    shown = ", ".join(f"{k}={definition[k]} (the study's: {recorded[k]})" for k in differ[:SHOWN])
    more = f" and {len(differ) - SHOWN} more" if len(differ) > SHOWN else ""
    raise ConfigError(
        f"{shown}{more}: study {study.study_name} in {where} runs its trials with other "
        "settings; rerun with the study's, or start another study with "
        "sweep.study_name=<a new name>"
    )


def study_uid(study: optuna.Study) -> str:
    """The study's own key, made the first time (under the study lock)."""
    uid = study.user_attrs.get(UID_ATTR)
    if uid is None:
        uid = uuid.uuid4().hex[:8]
        study.set_user_attr(UID_ATTR, uid)
    return uid


def name_objective(study: optuna.Study, objective: str) -> None:
    """Optuna's metric name for the objective, which optuna-dashboard shows instead of
    "Objective 0"."""
    if study.metric_names != [objective]:
        study.set_metric_names([objective])
