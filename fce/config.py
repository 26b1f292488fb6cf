"""Validation of the run configuration, in one place, and the upgrade of older configs.

Torch-free on purpose: ``run.py`` validates the composed config and reports bad input in well
under a second, before torch or mlflow are imported.

The values of every setting live in ``conf/`` (the YAML files); ``fce/schema.py`` gives their
types (checked by Hydra at composition) and ranges, and ``validate`` walks it: unknown and
missing keys, each field's range, then the cross-field rules (``RULES`` and each variant's
own), naming the offending key. A node's ``name`` is the option chosen (``name_options``).
Every group node carries a ``_target_`` and is built by ``fce.factory.instantiate_node``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from fce.errors import ConfigError
from fce.schema import (  # noqa: F401 (the names the rest of the package imports from here)
    CONF_DIR,
    DATASET_NAMES,
    EBM_ACTIVATIONS,
    EBM_METRICS,
    ESTIMATOR_NAMES,
    EVAL_METRICS,
    FLOW_METRICS,
    FLOW_NAMES,
    INTERNAL_KEYS,
    NAMED_GROUPS,
    SCHEMAS,
    RunConfig,
    options,
    register_configs,
    total_steps,
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


def name_options(cfg: DictConfig, choices: Any) -> DictConfig:
    """Write each group's chosen option into its node as ``name`` (``flow=spline`` ->
    ``flow.name: spline``), in place: the name a run logs, groups and resumes by.

    ``choices`` is Hydra's ``runtime.choices``. A name set by hand that differs from the
    option is refused: the option is what builds the node.
    """
    for group in NAMED_GROUPS:
        chosen = choices.get(group) if choices is not None else None
        if chosen is None or group not in cfg or cfg[group] is None:
            continue
        node = cfg[group]
        given = node._get_node("name") if "name" in node else None
        unset = given is None or given._is_missing() or given._is_interpolation()
        if not unset and given._value() != chosen:
            raise ConfigError(
                f"{group}.name={given._value()!r}: the name is the option chosen; choose it "
                f"with {group}=<one of: {', '.join(options(group))}>"
            )
        with open_dict(node):
            node.name = chosen
    return cfg


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
    chosen = node.get("name", "???") if isinstance(node, dict) else "???"
    if chosen == "???" or "${" in str(chosen):  # mid-composition: not named yet
        chosen = "???"
    if chosen == "???" and isinstance(node, dict):
        schema = OmegaConf.get_type(cfg[group])
        chosen = next((k for k, v in SCHEMAS.get(group, {}).items() if v is schema), "???")
    where = f" with {group}={chosen}" if chosen != "???" else ""
    # A high cutoff: a far-fetched guess misleads more than no guess.
    nearest = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
    if nearest:
        return f"{key}: no such setting{where}; did you mean {nearest[0]}? ({HELP} lists them)"
    return f"{key}: no such setting{where}; {HELP} lists them"


def load_run_config(path: Path) -> DictConfig:
    """A run's saved config.yaml: fce's own, or Hydra's copy (``<run>/.hydra/config.yaml``,
    written before the job named its options: they are named here from the ``hydra.yaml``
    beside it, as the job named them)."""
    saved = OmegaConf.load(path)
    hydra_yaml = path.parent / "hydra.yaml"
    # A run stopped while Hydra wrote its files may leave hydra.yaml empty: no names then.
    choices = None
    if path.parent.name == ".hydra" and hydra_yaml.is_file():
        choices = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.choices")
    if choices is not None:
        for group in NAMED_GROUPS:
            node = saved.get(group)
            if node is not None and (
                OmegaConf.is_missing(node, "name") or OmegaConf.is_interpolation(node, "name")
            ):
                saved[group].name = choices.get(group)
    return saved


# Keys of the ebm node added with its variants, and the values every earlier run had.
EBM_SHAPE_DEFAULTS = {
    "activation": "leaky_relu",
    "fourier_features": 0,
    "fourier_scale": 1.0,
    "base": "none",
}


# Keys of the eval node added with dataset.dim, and the values conf/ gives them.
EVAL_DEFAULTS = {"logz_samples": 20000, "min_ess": 100, "fisher": "auto"}
# ... and those added with annealed importance sampling.
ANNEALING_DEFAULTS = {"logz": "importance", "ais_chains": 1024, "ais_steps": 500}


def upgrade(saved: DictConfig) -> DictConfig:
    """A config saved by an older fce, completed as today's (in place).

    Adds the ``_target_`` of each group node from its conf/ file, and the defaults of keys
    added since: the estimator group (every run was FCE before it) and its options (FCE's
    contrast, flow objective and updates: the paper's game, as before them), Glow's
    ``scale_bound`` (its log-scale had no floor then), ``eval.flow_samples`` (as many as
    held-out points), ``train.compile`` (false: every run was eager before it),
    ``dataset.dim`` (2) and the eval keys that only runs above 2-D use.
    """
    if "estimator" not in saved:
        saved.estimator = {"name": "fce"}
    if "schedule" not in saved:  # every run trained at a constant rate before schedules
        saved.schedule = {"name": "constant"}
    if "ema_decay" not in saved.train:
        saved.train.ema_decay = 0.0
    if "compile" not in saved.train:
        saved.train.compile = False
    if "dim" not in saved.dataset:  # every run was 2-D before products of the datasets
        saved.dataset.dim = 2
    for key, value in (EVAL_DEFAULTS | ANNEALING_DEFAULTS).items():  # used above 2-D only
        if key not in saved.eval:
            saved.eval[key] = value
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
        if node is None:
            continue
        path = CONF_DIR / group / f"{option}.yaml"
        if group == "dataset":
            path = CONF_DIR / group / f"{saved.dataset.name}.yaml"
        current = OmegaConf.load(path)
        if "_target_" not in node:
            for key in INTERNAL_KEYS:
                if key in current:
                    node[key] = current[key]
        if group == "estimator":  # an estimator's options default to what it did before them
            for key, value in current.items():
                if key != "defaults" and key not in node:
                    node[key] = value
    return saved


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
        elif isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node)):
            inner = missing_keys(node, f"{name}.")
            every = len(inner) == len(dataclasses.fields(OmegaConf.get_type(node)))
            found += [name] if inner and every else inner
    return found


# --- validation: each field's range, then the rules across fields -------------------------------


def checked_fields(cfg: DictConfig, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, value, check) of every field the schemas give a range, depth first."""
    found = []
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return found
    for spec in dataclasses.fields(schema):
        node = cfg._get_node(spec.name)
        if isinstance(node, DictConfig) and not node._is_none():
            found += checked_fields(node, f"{prefix}{spec.name}.")
        elif "check" in spec.metadata and not node._is_none():
            found.append((f"{prefix}{spec.name}", cfg[spec.name], spec.metadata["check"]))
    return found


def batch_fits_data(cfg: DictConfig) -> None:
    if cfg.train.batch_size > cfg.dataset.n_samples:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size}: larger than dataset.n_samples="
            f"{cfg.dataset.n_samples}; must be at most the number of training points"
        )


def importance_sampling_can_report(cfg: DictConfig) -> None:
    """Above 2-D: log Z's estimate can reach its floor, and the held-out points can fit the
    Gaussian of its proposal (a covariance of rank d needs more than d points)."""
    if cfg.dataset.dim == 2:
        return
    if cfg.eval.logz_samples < cfg.eval.min_ess:
        raise ConfigError(
            f"eval.min_ess={cfg.eval.min_ess}: more than eval.logz_samples="
            f"{cfg.eval.logz_samples}, so no log Z would ever be reported; lower it"
        )
    if cfg.eval.logz == "annealed" and cfg.eval.ais_chains < cfg.eval.min_ess:
        raise ConfigError(
            f"eval.min_ess={cfg.eval.min_ess}: more than eval.ais_chains="
            f"{cfg.eval.ais_chains}, so annealed importance sampling would never report a "
            "log Z; lower it or raise eval.ais_chains"
        )
    if cfg.eval.n_points <= cfg.dataset.dim:
        raise ConfigError(
            f"eval.n_points={cfg.eval.n_points}: must exceed dataset.dim={cfg.dataset.dim} "
            "(the importance sampler fits a Gaussian to them)"
        )


# The rules across groups; each variant's own are its schema's ``rules``.
RULES = (batch_fits_data, importance_sampling_can_report)


def validate(cfg: DictConfig) -> None:
    """Check keys, ranges and rules of a composed config; raise ``ConfigError`` naming one."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(no_such_setting(unknown[0], cfg))
    missing = missing_keys(cfg)
    if missing:
        key = missing[0].split(".")[0] if "." in missing[0] else missing[0]
        raise ConfigError(f"{missing[0]}: has no value (removed with ~{key}?); every run needs it")
    for key, value, check in checked_fields(cfg):
        check(key, value)
    for rule in RULES:
        rule(cfg)
    for group in cfg:
        schema = OmegaConf.get_type(cfg[group]) if isinstance(cfg[group], DictConfig) else None
        if schema is not None and hasattr(schema, "rules"):
            schema.rules(cfg)
