"""Estimators of an EBM (and its flow) behind one interface, chosen by ``estimator=<name>``.

The registry below is the one place that maps names to classes; the config's ``_target_``
builds them, and the loop only ever sees an ``Estimator``.
"""

from fce.estimators.base import Estimator, Players, StepOutput
from fce.estimators.fce_estimator import FCE
from fce.estimators.flow_mle import FlowMLE
from fce.estimators.mle import MLE
from fce.estimators.nce import NCE

ESTIMATORS: dict[str, type[Estimator]] = {e.name: e for e in (FCE, NCE, FlowMLE, MLE)}

__all__ = [
    "ESTIMATORS",
    "FCE",
    "MLE",
    "NCE",
    "Estimator",
    "FlowMLE",
    "Players",
    "StepOutput",
]
