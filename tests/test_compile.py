"""``train.compile``: the flow's no-grad passes under torch.compile, when, how close to eager,
what happens where it cannot compile, and resume within the compiled mode."""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch

from fce.compose import compose
from fce.config import ConfigError, validate
from fce.factory import build
from fce.flows import Glow, Spline
from fce.flows.fused import AUTO_MIN_STEPS, FusedPasses, should_compile
from fce.flows.widened import WidenedFlow
from tests import helpers

# The spline of experiment=truth (so the compiled graphs are the ones real runs reuse), on a
# small problem: 40 steps of 500 points.
SPLINE = (
    "experiment=smoke",
    "flow=spline",
    "tracking=none",
    "dataset.n_samples=20000",
    "train.batch_size=500",
    "train.max_steps=40",
    "train.eval_every=20",
    "eval.n_points=1000",
    "eval.flow_samples=1000",
    "eval.grid_cells=32",
)
# How far a compiled run's history may stray from eager's: the fused kernels round
# differently (about 1e-6 per pass); over these 40 steps the largest relative difference
# measured was 2e-7.
TOLERANCE = 1e-5


def trainer_of(*overrides: str, callbacks=None):
    torch.set_num_threads(1)
    return build(compose([*SPLINE, *overrides]), torch.device("cpu")).trainer(callbacks=callbacks)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("maybe", "train.compile='maybe': unknown; choose one of: true, false, auto"),
        ("1", "train.compile=1: unknown; choose one of: true, false, auto"),
    ],
)
def test_a_bad_switch_is_a_one_line_error(value, message):
    with pytest.raises(ConfigError) as error:
        validate(compose([f"train.compile={value}"]))
    assert str(error.value) == message


def test_auto_compiles_only_a_long_run_of_a_flow_where_it_pays():
    spline, glow = Spline(n_layers=1, hidden=4), Glow(n_steps=1, width=4)
    long, short = AUTO_MIN_STEPS, AUTO_MIN_STEPS - 1
    assert should_compile("auto", spline, long, makes_passes=True)
    assert should_compile("auto", WidenedFlow(spline, 2.0), long, makes_passes=True)
    assert not should_compile("auto", spline, short, makes_passes=True)
    assert not should_compile("auto", glow, long, makes_passes=True)
    assert not should_compile("auto", spline, long, makes_passes=False)  # flow-MLE, MLE
    assert should_compile(True, glow, 10, makes_passes=True)
    assert not should_compile(True, spline, long, makes_passes=False)
    assert not should_compile(False, spline, long, makes_passes=True)


def test_the_factory_fuses_the_passes_of_the_estimators_that_make_them():
    fused = {
        (estimator, switch): trainer_of(
            f"estimator={estimator}", f"train.compile={switch}"
        ).estimator.frozen_flow()
        for estimator in ("fce", "nce")
        for switch in ("true", "false", "auto")  # auto: 40 steps are too few
    }
    assert isinstance(fused["fce", "true"], FusedPasses)
    assert isinstance(fused["nce", "true"], FusedPasses)  # its Gaussian: true means true
    assert not any(isinstance(fused[e, s], FusedPasses) for e in ("fce", "nce") for s in
                   ("false", "auto"))  # fmt: skip


def failing_backend(graph, example_inputs):
    raise RuntimeError("no C++ compiler here\nsecond line of the compiler's story")


def test_where_it_cannot_compile_it_says_so_once_and_runs_eager(caplog):
    torch.manual_seed(0)
    flow = Spline(n_layers=2, hidden=8)
    for p in flow.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, z = torch.randn(64, 2), torch.randn(64, 2)
    passes = FusedPasses(flow, backend=failing_backend)
    with caplog.at_level(logging.WARNING, logger="fce.flows.fused"):
        log_q = passes.log_prob(x)
        sample, log_q_sample = passes.transform_noise(z)
        passes.log_prob(x)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fce.flows.fused"]
    assert len(warnings) == 1
    assert "spline flow's passes could not be compiled" in warnings[0]
    assert "no C++ compiler here" in warnings[0] and "second line" not in warnings[0]
    with torch.no_grad():
        assert torch.equal(log_q, flow.log_prob(x))
        expected = flow.transform_noise(z)
    assert torch.equal(sample, expected[0]) and torch.equal(log_q_sample, expected[1])
    assert not log_q.requires_grad


def test_an_error_of_the_flow_itself_still_raises():
    passes = FusedPasses(Spline(n_layers=1, hidden=4), backend=failing_backend)
    with pytest.raises(RuntimeError, match=r"size|shape"):
        passes.log_prob(torch.randn(5, 3))  # three coordinates into a 2-D flow


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["fce", "nce"])
def test_a_compiled_run_stays_within_the_tolerance_of_eager(estimator):
    overrides = [f"estimator={estimator}"]
    if estimator == "nce":  # NCE against the (untrained) spline: the passes it makes
        overrides.append("estimator.noise=flow")
    eager, fused = trainer_of(*overrides), trainer_of(*overrides, "train.compile=true")
    assert isinstance(fused.estimator.frozen_flow(), FusedPasses)
    eager_final, fused_final = eager.run(), fused.run()
    assert fused.estimator.frozen_flow().fallback is None  # it did compile
    history, compiled = eager.history.history, fused.history.history
    assert history.keys() == compiled.keys()
    for name, (steps, values) in history.items():
        assert compiled[name][0] == steps, name
        for a, b in zip(values, compiled[name][1], strict=True):
            if math.isinf(a):
                assert a == b, name
            else:
                assert abs(a - b) <= TOLERANCE * max(1.0, abs(a)), (name, a, b)
    assert eager_final.keys() == fused_final.keys()


@pytest.mark.slow
def test_a_compiled_run_resumes_bit_identically():
    full = trainer_of("train.compile=true")
    full_metrics = full.run()
    saved, checkpoints = helpers.checkpoints_in_memory(every=15)
    trainer_of("train.compile=true", callbacks=[checkpoints]).run()
    resumed = trainer_of("train.compile=true")
    resumed.load_state_dict(torch.load(io.BytesIO(saved[30]), weights_only=False))
    assert resumed.run() == full_metrics
    assert resumed.history.history == full.history.history
    assert resumed.estimator.frozen_flow().fallback is None
