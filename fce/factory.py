"""Build a run's objects from its config: data, models, optimizers, rule, estimator, trainer.

Every group node is built from its ``_target_`` (``instantiate_node``); this module only
decides the order (which fixes the random initialisation) and wires the parts together.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from fce import checkpoint
from fce.config import INTERNAL_KEYS, RunConfig, upgrade, user_settings
from fce.data import Dataset, make_generator
from fce.errors import ConfigError
from fce.estimators import Estimator, Players
from fce.flows import Flow
from fce.flows.fused import should_compile
from fce.metrics import AnnealedNormaliser, Evaluator, Grid, ImportanceNormaliser
from fce.recording import Tracker
from fce.schedule import Schedule
from fce.trainer import Callback, LoopSettings, Trainer

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``device``: auto picks CUDA when there is a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda': no CUDA GPU is available here; use device=cpu or auto")
    return torch.device(name)


def target_of(node: DictConfig) -> Any:
    """The class (or function) a group node's ``_target_`` names."""
    try:
        return get_class(node._target_)
    except ValueError:
        return get_method(node._target_)


def option_class(group: str, option: str) -> Any:
    """The class an option of a group builds (``estimator``, ``nce``): its YAML's ``_target_``."""
    from fce.config import CONF_DIR

    return target_of(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))


def instantiate_node(node: DictConfig, group: str, **given: Any) -> Any:
    """Build a group node by ``hydra.utils.instantiate``. Its ``name`` (the option chosen) is
    passed only to a class that takes one (a dataset's, an optimizer's algorithm); a key the
    class does not take, in a node no schema types, is one line naming it. ``given``: values
    the run decides rather than the node (a model's ``dim``, the data's)."""
    target = target_of(node)
    parameters = inspect.signature(target).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    settings = {k: v for k, v in node.items() if k != "name" or "name" in parameters}
    for key, value in given.items():
        if key not in parameters and not takes_any:
            if key == "dim" and value == 2:  # a 2-D class need not say so
                continue
            raise ConfigError(
                f"{group}={node.get('name', node._target_)}: {node._target_} takes no "
                f"{key} (2-D only), and this run's data have {key}={value}; use dataset.dim=2"
            )
        settings[key] = value
    for key in settings:
        if key not in INTERNAL_KEYS and key not in parameters and not takes_any:
            raise ConfigError(
                f"{group}.{key}: no such setting of {node._target_}; it takes: "
                f"{', '.join(p for p in parameters if p != 'players')}"
            )
    return instantiate(OmegaConf.create(settings, flags={"allow_objects": True}))


@dataclass
class RunParts:
    """A run's objects before its trainer: what ``build`` makes from the config."""

    estimator: Estimator
    train_data: Tensor
    evaluator: Evaluator
    settings: LoopSettings
    schedule: Schedule

    def trainer(
        self, tracker: Tracker | None = None, callbacks: list[Callback] | None = None
    ) -> Trainer:
        return Trainer(
            self.estimator,
            self.train_data,
            self.evaluator,
            self.settings,
            tracker,
            callbacks,
            self.schedule,
        )


def build(cfg: RunConfig, device: torch.device) -> RunParts:
    """The data, models, optimizers, rule and estimator of ``cfg``, on ``device``."""
    source = instantiate_node(cfg.dataset, "dataset")
    train_data = source.training_set(cfg.seed)
    eval_points = source.dataset.sample(cfg.eval.n_points, make_generator(cfg.eval.seed, "eval"))
    evaluator = make_evaluator(source.dataset, eval_points.to(device), cfg.eval)

    # Parameter initialisation only (data and noise have their own streams): the EBM first,
    # then the flow, whatever the estimator, so one seed starts every estimator alike.
    torch.manual_seed(cfg.seed)
    dim = source.dataset.dim
    ebm = instantiate_node(cfg.ebm, "ebm", dim=dim).to(device)
    flow = instantiate_node(cfg.flow, "flow", dim=dim).to(device)
    if cfg.estimator.get("noise_checkpoint"):  # NCE against a flow trained by another run
        load_noise_flow(flow, str(cfg.estimator.noise_checkpoint), user_settings(cfg.flow), dim)
    players = Players(
        ebm=ebm,
        flow=flow,
        optimizers=instantiate_node(cfg.optimizer, "optimizer"),
        rule=instantiate_node(cfg.threshold, "threshold"),
        train_data=train_data,
        seed=cfg.seed,
    )
    estimator = instantiate_node(cfg.estimator, "estimator")(players)
    settings = LoopSettings(
        batch_size=cfg.train.batch_size,
        epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps,
        eval_every=cfg.train.eval_every,
        seed=cfg.seed,
        ema_decay=cfg.train.ema_decay,
    )
    steps = settings.total_steps(train_data.shape[0])
    mode = cfg.train.compile
    if should_compile(mode, estimator.flow, steps, estimator.makes_passes):
        estimator.fuse_passes()
        name = estimator.flow.name
        log.info("train.compile=%s: the %s flow's no-grad passes run compiled", mode, name)
    schedule = instantiate_node(cfg.schedule, "schedule")
    return RunParts(estimator, train_data.to(device), evaluator, settings, schedule)


def make_evaluator(dataset: Dataset, eval_points: Tensor, settings: DictConfig) -> Evaluator:
    """The run's evaluator on ``eval_points``: in 2-D the EBM is normalised on the grid of
    ``settings`` (``cfg.eval``); above it by importance sampling."""
    grid, normaliser, annealer = None, None, None
    if dataset.dim == 2:
        grid = Grid.make(settings.grid_limit, settings.grid_cells, device=eval_points.device)
    elif dataset.has_log_prob:
        normaliser = ImportanceNormaliser(
            dataset, eval_points, settings.logz_samples, settings.seed, settings.min_ess
        )
        if settings.logz == "annealed":
            chains, steps = settings.ais_chains, settings.ais_steps
            annealer = AnnealedNormaliser(
                eval_points, chains, steps, settings.seed, settings.min_ess
            )
    return Evaluator(
        dataset,
        eval_points,
        grid,
        seed=settings.seed,
        n_flow_samples=settings.flow_samples,
        normaliser=normaliser,
        panel_limit=settings.grid_limit,
        fisher=None if settings.fisher == "auto" else settings.fisher,
        annealer=annealer,
    )


def load_noise_flow(
    flow: Flow, noise_checkpoint: str, flow_settings: dict[str, Any], dim: int = 2
) -> None:
    """Load into ``flow`` the flow of another run's checkpoint (or run directory), whose flow
    settings must be ``flow_settings`` and whose data's dimension ``dim`` (the
    ``noise_checkpoint`` an estimator contrasts with)."""
    where = f"estimator.noise_checkpoint={noise_checkpoint}"
    try:
        _, state, _ = checkpoint.resolve(Path(noise_checkpoint).expanduser())
    except checkpoint.CheckpointError as error:
        raise ConfigError(f"{where}: {error}") from None
    saved_cfg = upgrade(OmegaConf.create(state["config"]))
    if saved_cfg.dataset.dim != dim:
        raise ConfigError(
            f"{where}: its flow is of dataset.dim={saved_cfg.dataset.dim}, this run's data "
            f"dataset.dim={dim}; train the noise flow on data of the same dimension"
        )
    saved = user_settings(saved_cfg.flow)
    if saved != flow_settings:
        raise ConfigError(
            f"{where}: its flow is {saved}, this run's flow={flow_settings}; "
            "choose the same flow group and sizes"
        )
    flow.load_state_dict(state["trainer"]["flow"])


def build_trainer(cfg: RunConfig, device: torch.device) -> Trainer:
    """The trainer of ``cfg`` on ``device``, at step 0, logging nowhere: for scripts, notebooks
    and tests that drive the loop themselves."""
    return build(cfg, device).trainer()


def run_name(cfg: RunConfig) -> str:
    """``<dataset>-<model>-s<seed>``, the model as the estimator names it (``glow`` for FCE
    with Glow, ``nce-gaussian``, ``mle-maf``...)."""
    model = target_of(cfg.estimator).model_label(cfg.estimator, cfg.flow.name)
    return f"{cfg.dataset.name}-{model}-s{cfg.seed}"
