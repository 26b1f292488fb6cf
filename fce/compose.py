"""Compose a run's config from conf/ outside ``@hydra.main``: for scripts, notebooks and tests.

Hydra's compose API is initialised once per process (it cannot be re-initialised from
another thread while in use), on the project's conf/ with its schemas registered.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from omegaconf import DictConfig

from fce.config import CONF_DIR, register_configs

_lock = threading.Lock()
_initialised = False


def compose(
    overrides: Sequence[str] = (), config_name: str = "config", return_hydra_config: bool = False
) -> DictConfig:
    """The config ``python run.py *overrides`` would run (with Hydra's own node if asked)."""
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
        return hydra_compose(
            config_name, overrides=list(overrides), return_hydra_config=return_hydra_config
        )
