from __future__ import annotations

import pytest

from fce.compose import compose
from fce.config import ConfigError, validate
from fce.threshold import EMAThreshold, FixedThreshold


def test_fixed_rule_is_the_reference_rule():
    rule = FixedThreshold(value=0.6)
    assert rule.train_flow_next(0.61)
    assert not rule.train_flow_next(0.6)
    assert not rule.train_flow_next(0.3)


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5])
def test_threshold_outside_unit_interval_is_rejected(value):
    # Ranges are checked in one layer, the config's, before anything is built.
    with pytest.raises(ConfigError, match=r"threshold.value=.*: must be in \(0, 1\)"):
        validate(compose([f"threshold.value={value}"]))


def test_ema_rule_smooths_single_outliers():
    rule = EMAThreshold(value=0.6, decay=0.9)
    assert not rule.train_flow_next(0.55)
    # One noisy batch above the threshold does not hand the turn to the flow...
    assert not rule.train_flow_next(0.65)
    # ...a sustained rise does.
    decisions = [rule.train_flow_next(0.7) for _ in range(10)]
    assert decisions[-1] and not decisions[0]


def test_ema_state_round_trip():
    rule = EMAThreshold(value=0.6, decay=0.5)
    rule.train_flow_next(0.7)
    other = EMAThreshold(value=0.6, decay=0.5)
    other.load_state_dict(rule.state_dict())
    assert other.train_flow_next(0.5) == rule.train_flow_next(0.5)


def test_ema_decay_is_checked():
    with pytest.raises(ConfigError, match=r"threshold.decay=1.0: must be in \[0, 1\)"):
        validate(compose(["threshold=ema", "threshold.decay=1.0"]))
