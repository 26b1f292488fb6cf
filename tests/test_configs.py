"""Every option of every config group composes, validates and builds (lightning-hydra style)."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from fce.compose import compose
from fce.config import (
    DATASET_NAMES,
    ESTIMATOR_NAMES,
    FLOW_NAMES,
    INTERNAL_KEYS,
    ConfigError,
    upgrade,
    user_settings,
    validate,
)
from fce.factory import build_trainer, instantiate_node, target_of
from fce.flows import Flow, Transform
from fce.flows.fused import FusedPasses
from fce.preflight import group_options
from fce.schema import SCHEMAS
from tests.helpers import ROOT, TINY, TINY_FLOW, run_cli

CONF = ROOT / "conf"


def compose_cfg(overrides: list[str]):
    return compose(overrides)


def test_groups_hold_exactly_the_documented_options():
    assert group_options(CONF, "dataset") == sorted(DATASET_NAMES)
    assert group_options(CONF, "flow") == sorted(FLOW_NAMES)
    assert group_options(CONF, "estimator") == sorted(ESTIMATOR_NAMES)
    assert "adam" in group_options(CONF, "optimizer")
    assert {"fixed", "ema"} <= set(group_options(CONF, "threshold"))
    assert "reference" in group_options(CONF, "experiment")


def test_the_torch_free_choices_are_the_libraries_own():
    # The science does not import the config: the choices validation offers before torch
    # loads are checked here against the modules that implement them.
    from fce import data, ebm
    from fce.config import EBM_ACTIVATIONS

    assert data.DATASET_NAMES == DATASET_NAMES == tuple(data.DATASETS)
    assert ebm.ACTIVATIONS == EBM_ACTIVATIONS


def test_defaults_are_the_reference_values():
    cfg = compose_cfg([])
    validate(cfg)
    assert (cfg.dataset.name, cfg.flow.name, cfg.threshold.name) == ("8gaussians", "glow", "fixed")
    assert cfg.estimator.name == "fce"
    assert cfg.seed == 42 and cfg.train.batch_size == 1000 and cfg.dataset.n_samples == 500_000
    assert (cfg.optimizer.lr_ebm, cfg.optimizer.lr_flow) == (1e-3, 7e-4)
    assert list(cfg.optimizer.betas) == [0.9, 0.999] and cfg.threshold.value == 0.6
    assert cfg.device == "auto" and cfg.threads == 1
    for key in (
        "train.epochs",
        "train.max_steps",
        "train.eval_every",
        "train.checkpoint_every",
        "train.resume",
        "tracking.uri",
        "tracking.experiment",
    ):
        assert OmegaConf.select(cfg, key, default="absent") != "absent", key


def test_reference_experiment_pins_100_epochs():
    cfg = compose_cfg(["experiment=reference"])
    assert cfg.train.epochs == 100 and cfg.flow.n_steps == 10 and cfg.flow.width == 64


INSTANTIABLE = ("dataset", "ebm", "flow", "optimizer", "threshold", "estimator", "tracking")
GROUP_OPTIONS = [
    (group, option)
    for group in (*INSTANTIABLE, "experiment")
    for option in group_options(CONF, group)
]


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_option_composes_validates_and_builds(group, option):
    # Sized down for speed: the flow's own size keys, whichever flow the option runs.
    flow = compose_cfg([f"{group}={option}"]).flow.name
    cfg = compose_cfg([f"{group}={option}", *TINY, *TINY_FLOW[flow], "device=cpu"])
    validate(cfg)
    trainer = build_trainer(cfg, torch.device("cpu"))
    assert trainer.data.shape == (cfg.dataset.n_samples, 2)
    estimator = trainer.estimator
    noise = estimator.name == "nce"  # NCE's default noise: a Gaussian fitted to the data
    assert type(trainer.flow).__name__.lower() == ("gaussian" if noise else cfg.flow.name)
    assert estimator.name == cfg.estimator.name
    for name, optimizer in estimator.optimizers.items():
        assert type(optimizer).__name__.lower() == cfg.optimizer.name
        lr = cfg.optimizer.lr_ebm if name == "opt_ebm" else cfg.optimizer.lr_flow
        assert optimizer.param_groups[0]["lr"] == lr
    if estimator.name == "fce":
        assert estimator.rule.name == cfg.threshold.name


@pytest.mark.parametrize(("group", "option"), [g for g in GROUP_OPTIONS if g[0] in INSTANTIABLE])
def test_every_group_node_is_instantiable_as_it_stands(group, option):
    # lightning-hydra style: the node alone, with its _target_, builds its object.
    node = compose_cfg([f"{group}={option}"])[group]
    built = instantiate_node(node, group)
    if node.get("_partial_"):
        assert built.func.__module__.startswith("fce.")
    else:
        assert type(built).__module__.startswith("fce.")
    assert OmegaConf.to_container(node) == OmegaConf.to_container(
        compose_cfg([f"{group}={option}"])[group]
    )  # building it changed nothing
    assert user_settings(node) == {
        k: v for k, v in OmegaConf.to_container(node).items() if not k.startswith("_")
    }


def test_a_key_no_schema_knows_is_refused_with_or_without_plus():
    for override in ("+train.maxsteps=300", "+flow.widht=3", "+extra=1"):
        with pytest.raises(ConfigError, match=r"no such setting"):
            validate(compose_cfg([override]))


def test_internal_keys_are_not_user_settings():
    settings = user_settings(compose_cfg([]))
    flat = str(settings)
    assert "_target_" not in flat and "_partial_" not in flat
    assert settings["threshold"] == {"name": "fixed", "value": 0.6}


def test_an_old_config_without_targets_is_upgraded_to_build():
    old = OmegaConf.create(user_settings(compose_cfg(["flow=maf", "threshold=ema"])))
    upgraded = upgrade(old)
    assert upgraded.flow._target_ == "fce.flows.MAF"
    assert upgraded.threshold._target_ == "fce.threshold.EMAThreshold"
    assert upgraded.estimator._target_ == "fce.estimators.FCE"
    validate(compose_cfg(["flow=maf", "threshold=ema"]))


def test_an_old_config_draws_one_flow_sample_per_held_out_point():
    # Runs saved before eval.flow_samples drew as many as eval.n_points: a resumed one goes on
    # logging kl_flow_data from the same samples.
    old = OmegaConf.create(user_settings(compose_cfg(["eval.n_points=3000"])))
    del old.eval.flow_samples
    assert upgrade(old).eval.flow_samples == 3000


def test_an_old_config_from_before_the_compile_switch_builds_eager():
    # analysis/figures.py and benchmarks/stability.py build a trainer from a saved config.
    old = OmegaConf.create(user_settings(compose_cfg(["flow=spline", "train.max_steps=20000"])))
    del old.train.compile
    trainer = build_trainer(upgrade(old), torch.device("cpu"))
    assert not isinstance(trainer.estimator.frozen_flow(), FusedPasses)
    assert old.train.compile is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("threshold.value=0", r"threshold.value=0.0: must be in \(0, 1\)"),
        ("optimizer.lr_ebm=-1", r"optimizer.lr_ebm=-1.0: must be a positive number"),
        ("train.batch_size=0", r"train.batch_size=0: must be a positive integer"),
        ("dataset.n_samples=10", r"train.batch_size=1000: larger than dataset.n_samples=10"),
        ("dataset.name=moons", r"dataset.name='moons': the name is the option chosen; choose"),
        ("flow=maf flow.name=glow", r"flow.name='glow': the name is the option chosen"),
        ("device=tpu", r"device='tpu': unknown; choose one of: auto, cpu, cuda"),
        ("threads=0", r"threads=0: must be a positive integer"),
        ("eval.flow_samples=0", r"eval.flow_samples=0: must be a positive integer"),
        ("flow.scale_bound=0", r"flow.scale_bound=0.0: must be a positive number \(or inf\)"),
        ("flow=maf flow.scale_bound=inf", r"flow.scale_bound=inf: must be a positive number"),
        ("flow=spline flow.n_layers=0", r"flow.n_layers=0: must be a positive integer"),
        ("flow=spline flow.bins=0", r"flow.bins=0: must be a positive integer"),
        ("flow=spline flow.bins=1000", r"flow.bins=1000: must be at most 256"),
        ("flow=spline flow.hidden=9000", r"flow.hidden=9000: must be at most 8,192"),
        ("flow=spline flow.hidden_layers=0", r"flow.hidden_layers=0: must be a positive integer"),
        ("flow=spline flow.tail_bound=0", r"flow.tail_bound=0.0: must be a positive number"),
        ("flow=spline flow.tail_bound=inf", r"flow.tail_bound=inf: must be a positive number"),
        ("flow=spline +flow.scale_bound=3", r"flow.scale_bound: no such setting"),
    ],
)
def test_validation_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg(override.split()))


def schema_options():
    for group, schemas in SCHEMAS.items():
        for option, schema in schemas.items():
            if option in group_options(CONF, group):
                yield group, option, schema


@pytest.mark.parametrize(("group", "option", "schema"), list(schema_options()))
def test_a_schema_is_its_class_signature(group, option, schema):
    # One description per variant: the schema's fields are the constructor's parameters, and
    # a default the class keeps for library use is the value conf/ gives it.
    import dataclasses
    import inspect

    node = compose_cfg([f"{group}={option}"])[group]
    parameters = {
        key: parameter
        for key, parameter in inspect.signature(target_of(node)).parameters.items()
        if parameter.kind is not inspect.Parameter.VAR_KEYWORD  # takes and ignores the rest
    }
    fields = {f.name for f in dataclasses.fields(schema)} - set(INTERNAL_KEYS)
    if "name" not in parameters:  # the option's name, for classes that take one
        fields.discard("name")
    # A partial node's class also takes the run's objects when it is built (an estimator its
    # players, a tracker its run's id and tags); "dim" is the data's, 2.
    given_later = {"players", "run_id", "tags", "project_root"} if node.get("_partial_") else set()
    assert fields == set(parameters) - given_later - {"dim"}
    for key, parameter in parameters.items():
        if key in node and parameter.default is not inspect.Parameter.empty:
            default = parameter.default
            value = OmegaConf.to_container(node)[key]
            assert (list(default) if isinstance(default, tuple) else default) == value, key


def test_every_schema_field_has_a_range_or_is_free_text():
    # validate() walks the schemas: a typed number or list without a range would go unchecked.
    import dataclasses

    from fce.schema import EvalConfig, RunConfig, TrainConfig

    free = {"name", "_target_", "_partial_", "uri", "run_name", "resume", "noise_checkpoint"}
    schemas = [s for group in SCHEMAS.values() for s in group.values()]
    for schema in [*schemas, RunConfig, TrainConfig, EvalConfig]:
        for spec in dataclasses.fields(schema):
            if spec.name in free or dataclasses.is_dataclass(spec.default_factory):
                continue
            if spec.name in {"dataset", "ebm", "flow", "optimizer", "threshold"} | {
                "schedule",
                "estimator",
                "tracking",
                "train",
                "eval",
            }:
                continue
            assert "check" in spec.metadata, f"{schema.__name__}.{spec.name}"


def test_glow_without_a_log_scale_floor_is_allowed():
    validate(compose_cfg(["flow.scale_bound=inf"]))


class ToyAffine(Transform):
    """x -> (x - b) / s elementwise, s = exp(log_s) learned."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.log_s = torch.nn.Parameter(torch.full((2,), math.log(scale)))
        self.shift = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return (x - self.shift) * torch.exp(-self.log_s), (-self.log_s.sum()).expand(len(x))

    def inverse(self, z):
        return z * torch.exp(self.log_s) + self.shift, self.log_s.sum().expand(len(z))


class ToyFlow(Flow):
    """A flow added in a test, as a user would add one: this class and a YAML file."""

    name = "toy"

    def __init__(self, scale: float) -> None:
        super().__init__([ToyAffine(scale)])


def test_a_new_flow_is_its_class_and_its_yaml(tmp_path):
    # Nothing else: no schema, no registry, no name list. Hydra finds the YAML on its search
    # path (run.py takes the same override); the option names it; the loop trains it.
    (tmp_path / "flow").mkdir()
    (tmp_path / "flow" / "toy.yaml").write_text(f"_target_: {__name__}.ToyFlow\nscale: 2.0\n")
    where = f"hydra.searchpath=[file://{tmp_path}]"
    cfg = compose_cfg(["flow=toy", where, *TINY, "device=cpu"])
    validate(cfg)
    assert cfg.flow.name == "toy"
    trainer = build_trainer(cfg, torch.device("cpu"))
    assert isinstance(trainer.flow, ToyFlow)
    metrics = trainer.run()
    assert trainer.step == cfg.train.max_steps and math.isfinite(metrics["nll_flow"])
    with pytest.raises(ConfigError, match=r"^flow.scael: no such setting of .*ToyFlow; it takes"):
        build_trainer(compose_cfg(["flow=toy", where, "+flow.scael=1"]), torch.device("cpu"))
    # And from the command line, as a user adds one.
    done = run_cli(["flow=toy", where, *TINY, "device=cpu", "tracking=none"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "toy on 8gaussians" in done.stderr + done.stdout


def test_hydras_copy_of_a_run_config_gets_its_names_from_the_choices_beside_it(tmp_path):
    # A run killed before fce wrote its config.yaml has only Hydra's copy, written before the
    # job named its options; resuming it reads the names from .hydra/hydra.yaml.
    from fce.config import load_run_config

    cfg = compose_cfg(["flow=maf", "threshold=ema"])
    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()
    saved = OmegaConf.to_container(cfg)
    for group in ("dataset", "flow", "optimizer", "threshold", "schedule", "estimator"):
        saved[group]["name"] = f"${{hydra:runtime.choices.{group}}}"
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    choices = {"flow": "maf", "threshold": "ema", "dataset": "8gaussians", "optimizer": "adam"}
    choices |= {"schedule": "constant", "estimator": "fce"}
    (hydra_dir / "hydra.yaml").write_text(
        OmegaConf.to_yaml({"hydra": {"runtime": {"choices": choices}}})
    )
    loaded = load_run_config(hydra_dir / "config.yaml")
    assert (loaded.flow.name, loaded.threshold.name, loaded.estimator.name) == (
        "maf",
        "ema",
        "fce",
    )
    assert user_settings(upgrade(loaded)) == user_settings(cfg)
