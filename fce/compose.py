"""Compose a run's config from conf/ outside ``@hydra.main``: for scripts, notebooks and tests.

Hydra's compose API is initialised once per process (it cannot be re-initialised from
another thread while in use), on the project's conf/ with its schemas registered.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence

from omegaconf import DictConfig, open_dict

from fce.config import CONF_DIR, HELP, name_options, no_such_setting, register_configs
from fce.errors import first_line

_lock = threading.Lock()
_initialised = False


def compose(
    overrides: Sequence[str] = (), config_name: str = "config", return_hydra_config: bool = False
) -> DictConfig:
    """The config ``python run.py *overrides`` would run (with Hydra's own node if asked),
    each group's node named by the option chosen."""
    global _initialised
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with _lock:
        if not _initialised or not GlobalHydra.instance().is_initialized():
            register_configs()
            GlobalHydra.instance().clear()
            initialize_config_dir(str(CONF_DIR), version_base="1.3").__enter__()
            _initialised = True
        cfg = hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
    name_options(cfg, cfg.hydra.runtime.choices)
    if not return_hydra_config:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


# Lines of Hydra's messages that name neither the key nor the value.
_NOISE = ("Set the environment variable HYDRA_FULL_ERROR", "reference_type=", "object_type=")


def composition_error(error: BaseException) -> str:
    """A failed composition as one line: Hydra/OmegaConf messages span several lines; keep
    what names the key and the value.

    An override of a key the config lacks is "no such setting" with the nearest known key, as
    for ``+key=value``: Hydra's advice to append it with ``+`` only leads to that error.
    """
    # ~key: every setting is typed and every run needs it (groups: fce.preflight)
    removed = re.match(r"Could not delete from config\. '([^']+)' does not exist", str(error))
    deleting = re.match(r"Error merging override ~(\S+)$", str(error))
    if not removed and deleting and "does not support deletion" in str(error.__cause__):
        removed = deleting
    if removed:
        key = removed.group(1)
        return (
            f"~{key}: a setting cannot be removed, only set ({key}=<value>; null where it "
            f"may be unset); {HELP} lists the settings"
        )
    unknown = re.match(r"Could not override '([^']+)'", str(error))
    cause = error.__cause__
    root = getattr(cause, "parent_node", None)
    if unknown and root is not None and " not in " in str(cause):
        return no_such_setting(unknown.group(1), root._get_root())
    lines = [line.strip() for line in str(error).splitlines()]
    kept = [line for line in lines if line and not line.startswith(_NOISE)]
    if cause is not None and str(cause).splitlines() and str(cause) not in str(error):
        kept.append(first_line(cause, limit=10_000))
    return "; ".join(kept) or type(error).__name__
