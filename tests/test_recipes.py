"""The opt-in parts of a converging recipe: EBM variants, learning-rate schedules, and the
moving average of the EBM's weights. None of them may change a run that does not ask."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

from fce.averaging import WeightAverage
from fce.callbacks import Checkpoints
from fce.compose import compose
from fce.config import ConfigError, validate
from fce.ebm import EBM
from fce.factory import build
from fce.schedule import Constant, Cosine, StepDecay
from tests import helpers

SMALL = [
    "dataset.n_samples=4000",
    "train.batch_size=200",
    "train.max_steps=40",
    "train.eval_every=10",
    "eval.n_points=1000",
    "eval.grid_cells=32",
    "flow.n_steps=2",
    "flow.width=16",
    "ebm.hidden=[32,32]",
    "device=cpu",
    "tracking=none",
]


def trainer_of(*overrides: str, callbacks=None):
    torch.set_num_threads(1)
    return build(compose([*SMALL, *overrides]), torch.device("cpu")).trainer(callbacks=callbacks)


# --- EBM variants --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["silu", "large", "large_silu", "fourier"])
def test_each_ebm_variant_builds_and_trains(variant):
    trainer = trainer_of(f"ebm={variant}", "ebm.hidden=[16,16]", "train.max_steps=5")
    metrics = trainer.run()
    assert math.isfinite(metrics["kl_data_ebm"])
    assert trainer.ebm(torch.zeros(3, 2)).shape == (3,)


@pytest.mark.parametrize("activation", ["silu", "softplus", "elu", "tanh"])
def test_activation_is_the_one_named(activation):
    ebm = EBM(hidden=(8, 8), activation=activation)
    kinds = {type(m).__name__.lower() for m in ebm.energy_net}
    assert activation in kinds and "leakyrelu" not in kinds


def test_smooth_energy_has_a_continuous_gradient_where_leaky_relu_does_not():
    # Along a line, the gradient of a LeakyReLU net is piecewise constant (it jumps); SiLU's
    # changes by little between close points.
    torch.manual_seed(0)
    line = torch.linspace(-2, 2, 4001)[:, None] * torch.tensor([[1.0, 0.3]])
    jumps = {}
    for activation in ("leaky_relu", "silu"):
        ebm = EBM(hidden=(32, 32), activation=activation)
        x = line.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(ebm.energy(x).sum(), x)
        jumps[activation] = (grad[1:] - grad[:-1]).norm(dim=1).max().item()
    assert jumps["silu"] < jumps["leaky_relu"] / 10


def test_fourier_features_are_fixed_buffers_saved_with_the_model():
    ebm = EBM(hidden=(8,), fourier_features=4, fourier_scale=2.0)
    names = dict(ebm.named_buffers())
    assert names["energy_net.0.frequencies"].shape == (2, 4)
    assert "energy_net.0.frequencies" in ebm.state_dict()
    assert ebm.energy_net[1].in_features == 2 + 2 * 4
    assert not any("frequencies" in n for n, _ in ebm.named_parameters())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ebm.activation=relu", "ebm.activation='relu': unknown; choose one of"),
        ("ebm.fourier_features=-1", "ebm.fourier_features=-1: must be an integer >= 0"),
        ("ebm.fourier_scale=0", "ebm.fourier_scale=0.0: must be"),
        ("schedule=cosine schedule.min_factor=2", "schedule.min_factor=2.0: must be in [0, 1]"),
        ("schedule=step schedule.milestones=[0.5,1.5]", "schedule.milestones=[0.5, 1.5]"),
        ("schedule=step schedule.gamma=0", "schedule.gamma=0.0: must be in (0, 1]"),
        ("train.ema_decay=1.0", "train.ema_decay=1.0: must be in [0, 1)"),
        ("estimator=flow_mle train.ema_decay=0.9", "train.ema_decay=0.9: averages the EBM's"),
        ("schedule=cosine schedule.warmup=5000", "schedule.warmup=5000: must be less than"),
    ],
)
def test_bad_recipe_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as error:
        validate(compose(override.split()))
    assert message in str(error.value) and "\n" not in str(error.value)


# --- schedules ------------------------------------------------------------------------------


def test_cosine_goes_from_one_to_its_floor_after_its_warmup():
    cosine = Cosine(min_factor=0.1, warmup=10)
    assert cosine.factor(0, 110) == pytest.approx(0.1)  # warm-up: (0 + 1) / 10
    assert cosine.factor(9, 110) == pytest.approx(1.0)
    assert cosine.factor(10, 110) == pytest.approx(1.0)
    assert cosine.factor(60, 110) == pytest.approx(0.55)
    assert cosine.factor(110, 110) == pytest.approx(0.1)
    values = [cosine.factor(t, 110) for t in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_step_decay_multiplies_by_gamma_at_each_milestone():
    decay = StepDecay(milestones=[0.75, 0.5], gamma=0.1)
    assert [decay.factor(t, 100) for t in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )


def test_a_schedule_sets_every_players_rate_from_its_base():
    trainer = trainer_of("schedule=cosine", "schedule.min_factor=0.0", "train.max_steps=20")
    base = {n: o.param_groups[0]["lr"] for n, o in trainer.estimator.optimizers.items()}
    seen = []

    class Watch(Checkpoints):
        def on_step(self, trainer, signals):
            seen.append(
                {n: o.param_groups[0]["lr"] for n, o in trainer.estimator.optimizers.items()}
            )

    trainer.callbacks.append(Watch(lambda t: None, every=0))
    trainer.run()
    cosine = Cosine(0.0, 0)
    for step, rates in enumerate(seen):
        for name, rate in rates.items():
            assert rate == pytest.approx(base[name] * cosine.factor(step, 20))
    assert seen[-1]["opt_ebm"] < 0.01 * base["opt_ebm"]


def test_constant_schedule_leaves_the_optimizers_alone():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    Constant().apply([opt], 5, 10)
    assert "base_lr" not in opt.param_groups[0] and opt.param_groups[0]["lr"] == 0.1


# --- the moving average ---------------------------------------------------------------------


def test_weight_average_follows_its_recursion():
    model = torch.nn.Linear(2, 1)
    average = WeightAverage(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    for n in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update()
        d = min(0.9, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
    for e, a in zip(expected, average.model.parameters(), strict=True):
        torch.testing.assert_close(a, e)
        assert not a.requires_grad


def test_evaluation_scores_the_average_not_the_weights():
    trainer = trainer_of("train.ema_decay=0.9", "train.max_steps=30")
    trainer.run()
    assert trainer.evaluated_ebm is trainer.average.model
    assert trainer.average.updates == 30 - trainer.estimator.flow_steps
    ours = trainer.evaluator(trainer.average.model, trainer.flow)["kl_data_ebm"]
    live = trainer.evaluator(trainer.ebm, trainer.flow)["kl_data_ebm"]
    assert trainer.last_metrics["kl_data_ebm"] == ours != live


def test_without_ema_evaluation_scores_the_weights():
    trainer = trainer_of("train.max_steps=10")
    trainer.run()
    assert trainer.average is None and trainer.evaluated_ebm is trainer.ebm


@pytest.mark.parametrize(
    "recipe",
    [
        ("schedule=cosine", "schedule.warmup=5", "train.ema_decay=0.95", "ebm=silu"),
        ("schedule=step", "estimator=nce", "train.ema_decay=0.9"),
    ],
)
def test_resume_with_a_schedule_and_an_average_is_bit_identical(recipe):
    full = trainer_of(*recipe)
    full_metrics = full.run()
    saved, checkpoints = helpers.checkpoints_in_memory(every=15)
    trainer_of(*recipe, callbacks=[checkpoints]).run()
    resumed = trainer_of(*recipe)
    resumed.load_state_dict(torch.load(io.BytesIO(saved[30]), weights_only=False))
    assert resumed.run() == full_metrics
    assert resumed.history.history == full.history.history
    for a, b in zip(resumed.average.model.parameters(), full.average.model.parameters()):
        assert torch.equal(a, b)


def test_resume_refuses_a_new_length_under_a_decaying_schedule(tmp_path):
    from fce.resume import check_same_run

    saved = compose([*SMALL, "schedule=cosine"])
    longer = compose([*SMALL, "schedule=cosine", "train.max_steps=80", "train.resume=x"])
    with pytest.raises(ConfigError, match=r"would take 80 steps, the saved run 40, .*cosine"):
        check_same_run(longer, saved, "the checkpoint")
    # Another way to the same length is no change of schedule.
    same = compose([*SMALL, "schedule=cosine", "train.epochs=1000", "train.resume=x"])
    assert check_same_run(same, saved, "the checkpoint") == {"train.epochs": (10, 1000)}
    constant = compose([*SMALL, "train.max_steps=80", "train.resume=x"])
    assert check_same_run(constant, compose(SMALL), "the checkpoint") == {
        "train.max_steps": (40, 80)
    }


# --- experiment=truth -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "dataset", ["8gaussians", "spiral", "2spirals", "checkerboard", "rings", "pinwheel"]
)
def test_truth_experiment_composes_for_every_dataset_with_its_recipe(dataset):
    from omegaconf import OmegaConf

    from tests.helpers import ROOT

    cfg = compose(["experiment=truth", f"dataset={dataset}"])
    validate(cfg)
    assert (cfg.ebm.activation, cfg.flow.name, cfg.schedule.name) == ("silu", "spline", "cosine")
    assert cfg.train.ema_decay > 0 and cfg.estimator.name == "fce"
    recipe = ROOT / "conf" / "recipe" / f"truth_{dataset}.yaml"
    if recipe.exists():  # the dataset's own changes win over the experiment's
        for key, value in _leaves(OmegaConf.to_container(OmegaConf.load(recipe))):
            assert OmegaConf.select(cfg, key) == value, key
    # A recipe belongs to its experiment: without it, the dataset runs the defaults.
    plain = compose([f"dataset={dataset}"])
    assert (plain.ebm.activation, plain.flow.name, plain.schedule.name) == (
        "leaky_relu",
        "glow",
        "constant",
    )


def test_command_line_overrides_win_over_a_recipe():
    recipe = compose(["experiment=truth", "dataset=checkerboard"])
    assert recipe.ebm.fourier_features == 64  # set by conf/recipe/truth_checkerboard.yaml
    cfg = compose(["experiment=truth", "dataset=checkerboard", "ebm.fourier_features=0"])
    assert cfg.ebm.fourier_features == 0


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_mle_sets_the_normaliser_of_the_model_it_evaluates():
    # With the weight average, c is the average's own log Z, not an average of past c's.
    trainer = trainer_of("estimator=mle", "estimator.grid_cells=32", "train.ema_decay=0.9")
    trainer.run()
    average = trainer.average.model
    own = trainer.estimator.log_z_hat(trainer.estimator.steps, average)
    assert average.log_z.item() == pytest.approx(own.item(), abs=1e-6)
    assert abs(trainer.last_metrics["logz_gap"]) < 0.05
