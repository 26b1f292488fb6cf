"""Estimators of an EBM (and its flow) behind one interface, chosen by ``estimator=<name>``.

The option's ``_target_`` (conf/estimator/<name>.yaml) names the class; the loop only ever
sees an ``Estimator``.
"""

from fce.estimators.base import Estimator, Players, StepOutput
from fce.estimators.fce_estimator import FCE
from fce.estimators.flow_mle import FlowMLE
from fce.estimators.mle import MLE
from fce.estimators.nce import NCE

__all__ = [
    "FCE",
    "MLE",
    "NCE",
    "Estimator",
    "FlowMLE",
    "Players",
    "StepOutput",
]
