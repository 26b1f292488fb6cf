from __future__ import annotations

import copy
import io

import pytest
import torch

from fce.callbacks import Figures
from fce.data import get_dataset, make_generator
from fce.ebm import EBM
from fce.metrics import Evaluator, Grid
from fce.objective import fce_value
from fce.threshold import EMAThreshold, FixedThreshold
from fce.tracking import MemoryTracker
from fce.trainer import DivergenceError, LoopSettings, Trainer
from tests import helpers

FLOWS = helpers.flow_classes()

SMALL = {
    "glow": dict(n_steps=2, width=16),
    "maf": dict(n_blocks=2, hidden=16),
    "spline": dict(n_layers=2, hidden=16),
}


def make_trainer(
    flow_name: str = "glow",
    seed: int = 0,
    steps: int = 40,
    n: int = 2000,
    batch: int = 100,
    rule=None,
    tracker=None,
    lr: float = 1e-3,
    callbacks=None,
) -> Trainer:
    torch.manual_seed(seed)
    ds = get_dataset("8gaussians")
    data = ds.sample(n, make_generator(seed, "train"))
    evaluator = Evaluator(ds, ds.sample(500, make_generator(0, "eval")), Grid.make(cells=32))
    ebm = EBM(hidden=(32, 32))
    flow = FLOWS[flow_name](**SMALL[flow_name])
    settings = LoopSettings(
        batch_size=batch, epochs=100, max_steps=steps, eval_every=10, seed=seed
    )
    return helpers.make_trainer(
        "fce",
        ebm,
        flow,
        data,
        evaluator,
        settings,
        lr_ebm=lr,
        lr_flow=lr,
        rule=rule,
        tracker=tracker,
        callbacks=[Figures(plot_every=0), *(callbacks or [])],
    )


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@torch.no_grad()
def value(trainer: Trainer, x: torch.Tensor, z: torch.Tensor) -> float:
    """V of the current models on data ``x`` and noise ``z``, no step taken."""
    x_noise, log_q_noise = trainer.flow.transform_noise(z)
    args = (trainer.ebm(x), trainer.flow.log_prob(x), trainer.ebm(x_noise), log_q_noise)
    return fce_value(*args).item()


def fixed_batch(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    x = trainer.data[:100]
    return x, torch.randn(100, 2, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("flow_name", sorted(FLOWS))
def test_ebm_step_raises_value_and_touches_only_the_ebm(flow_name):
    trainer = make_trainer(flow_name)
    trainer.flow.data_init(trainer.data[:100])
    x, z = fixed_batch(trainer)
    before, flow_before = value(trainer, x, z), params(trainer.flow)
    trainer.estimator.ebm_step(x, z)
    assert value(trainer, x, z) > before
    assert all(torch.equal(a, b) for a, b in zip(flow_before, params(trainer.flow)))
    assert all(p.grad is None for p in trainer.flow.parameters())


@pytest.mark.parametrize("flow_name", sorted(FLOWS))
def test_flow_step_lowers_value_and_touches_only_the_flow(flow_name):
    trainer = make_trainer(flow_name)
    trainer.flow.data_init(trainer.data[:100])
    x, z = fixed_batch(trainer)
    before, ebm_before = value(trainer, x, z), params(trainer.ebm)
    trainer.estimator.flow_step(x, z)
    assert value(trainer, x, z) < before
    assert all(torch.equal(a, b) for a, b in zip(ebm_before, params(trainer.ebm)))
    assert all(p.grad is None for p in trainer.ebm.parameters())
    assert all(p.requires_grad for p in trainer.ebm.parameters())


@pytest.mark.parametrize("flow_name", sorted(FLOWS))
def test_ebm_steps_see_the_flow_as_it_was_last_stepped(flow_name):
    # The EBM's step reuses one frozen snapshot of the flow: it must be rebuilt whenever the
    # flow changes (its step, its data init, a loaded state), or the EBM plays a stale flow.
    trainer = make_trainer(flow_name)
    x, z = fixed_batch(trainer)

    def assert_current() -> None:
        with torch.no_grad():
            expected = trainer.flow.log_prob(x)
        torch.testing.assert_close(trainer.estimator.frozen_flow().log_prob(x), expected)

    trainer.estimator.ebm_step(x, z)  # a snapshot of the flow before its data init
    trainer.total_steps = 0
    trainer.run()  # runs the data init and the step-0 evaluation, takes no step
    assert_current()
    saved = copy.deepcopy(trainer.state_dict())
    trainer.estimator.flow_step(x, z)
    assert_current()
    trainer.load_state_dict(saved)
    assert_current()
    trainer.estimator.opt_flow.zero_grad()
    trainer.estimator.flow_step(x, z)
    trainer.estimator.ebm_step(x, z)
    assert_current()


def test_game_starts_with_the_ebm_and_follows_the_threshold():
    tracker = MemoryTracker()
    # At 0.45 the flow takes nearly every step and drives V past the divergence bound: at 0.5
    # both players move and the game stays sound.
    trainer = make_trainer(rule=FixedThreshold(value=0.5), tracker=tracker, steps=60, lr=1e-2)
    trainer.run()
    acc = tracker.history["acc"][1]
    trained_ebm = tracker.history["trained_ebm"][1]
    assert len(acc) == len(trained_ebm) == 60
    assert trained_ebm[0] == 1.0
    for t in range(59):
        assert trained_ebm[t + 1] == float(acc[t] <= 0.5)
    assert 0 < sum(trained_ebm) < 60  # both players moved
    share = trainer.estimator.play(trainer.step)["flow_step_share"]
    assert share == pytest.approx(1 - sum(trained_ebm) / 60)


def test_evaluations_are_logged_at_their_steps():
    tracker = MemoryTracker()
    make_trainer(tracker=tracker, steps=35).run()
    assert tracker.history["nll_ebm"][0] == [0, 10, 20, 30, 35]
    assert tracker.history["mse_logp"][0] == [0, 10, 20, 30, 35]
    assert tracker.history["value"][0] == list(range(1, 36))
    assert "curves.png" in tracker.figures
    assert "densities/step_0000035.png" in tracker.figures


@pytest.mark.parametrize("flow_name", sorted(FLOWS))
def test_same_seed_same_run(flow_name):
    a, b = make_trainer(flow_name), make_trainer(flow_name)
    out_a, out_b = a.run(), b.run()
    assert out_a == out_b
    assert a.history.history["value"] == b.history.history["value"]
    assert all(torch.equal(p, q) for p, q in zip(params(a.flow), params(b.flow)))
    c = make_trainer(flow_name, seed=1)
    assert c.run() != out_a


@pytest.mark.parametrize("rule", [FixedThreshold, EMAThreshold])
def test_resume_from_a_checkpoint_is_bit_identical(rule):
    def make_rule():
        return rule(value=0.6) if rule is FixedThreshold else rule(value=0.6, decay=0.9)

    full = make_trainer(rule=make_rule(), steps=50)
    full_metrics = full.run()

    saved, checkpoints = helpers.checkpoints_in_memory(every=17)
    make_trainer(rule=make_rule(), steps=50, callbacks=[checkpoints]).run()
    assert sorted(saved) == [17, 34, 50]

    resumed = make_trainer(seed=0, rule=make_rule(), steps=50)
    torch.manual_seed(999)  # a different global RNG must not matter
    resumed.load_state_dict(torch.load(io.BytesIO(saved[34])))
    assert resumed.run() == full_metrics
    assert resumed.history.history["value"] == full.history.history["value"]
    assert all(torch.equal(p, q) for p, q in zip(params(resumed.ebm), params(full.ebm)))


def test_total_steps_counts_whole_batches_per_epoch():
    trainer = make_trainer(n=1050, batch=100, steps=None)
    assert trainer.batches_per_epoch == 10
    assert trainer.total_steps == 100 * 10


def test_epoch_reshuffles_and_covers_the_data():
    trainer = make_trainer(n=1000, batch=100)
    epoch0 = torch.cat([trainer.batch(s) for s in range(10)])
    epoch1 = torch.cat([trainer.batch(s) for s in range(10, 20)])
    assert torch.equal(epoch0.sort(0).values, trainer.data.sort(0).values)
    assert not torch.equal(epoch0, epoch1)


def test_divergence_is_caught_at_the_step_it_happens():
    trainer = make_trainer(steps=30)
    trainer.run()
    trainer.total_steps = 40
    with torch.no_grad():
        next(trainer.ebm.parameters()).fill_(float("nan"))
    with pytest.raises(DivergenceError, match="diverged at step 31: the FCE value"):
        trainer.run()


@pytest.mark.parametrize("model", ["ebm", "flow"])
def test_a_non_finite_parameter_is_caught_at_the_step_that_made_it(model):
    # An infinite gradient leaves the loss of its step finite but turns Adam's update into
    # NaN: the check must name that step and the parameter, not wait for the next loss.
    trainer = make_trainer(
        steps=30, rule=FixedThreshold(value=0.001 if model == "flow" else 0.999)
    )
    trainer.run()
    trainer.total_steps = 40
    name, parameter = next(iter(getattr(trainer, model).named_parameters()))
    parameter.register_hook(lambda grad: grad * float("inf"))
    label = "EBM" if model == "ebm" else "flow"
    with pytest.raises(DivergenceError, match=f"at step 31: the {label} parameter {name}"):
        trainer.run()
    assert trainer.step == 31


class Alternate(FixedThreshold):
    """The EBM and the flow in turns, whatever the accuracy: both move at every other step."""

    def train_flow_next(self, accuracy: float) -> bool:
        self.flow_next = not getattr(self, "flow_next", False)
        return self.flow_next


def same(a, b) -> bool:
    """Deep equality of states: tensors by value, containers item by item."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_state_dict_is_a_deep_snapshot():
    # A state taken at step 10 stays step 10's while training goes on: no tensor in it is a
    # view of a live parameter or optimizer moment, no list the trainer's own.
    trainer = make_trainer(steps=10, rule=Alternate(value=0.6))
    trainer.run()
    state = trainer.state_dict()
    then = copy.deepcopy(state)
    assert state["step"] == 10
    assert set(state) >= {"ebm", "flow", "opt_ebm", "opt_flow", "rule", "train_ebm_next"}
    flow_steps = trainer.estimator.flow_steps
    trainer.total_steps = 40
    trainer.run()
    now = trainer.state_dict()
    # Both models moved since step 10.
    assert trainer.estimator.flow_steps > flow_steps and now["flow_steps"] > flow_steps
    for key in ("ebm", "flow", "opt_ebm", "opt_flow", "history"):
        assert not same(now[key], then[key]), key  # what training changed since step 10
    assert same(state, then)
