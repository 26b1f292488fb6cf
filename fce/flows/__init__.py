"""Normalizing flows behind one interface: ``log_prob`` and ``sample_and_log_prob``."""

from fce.flows.base import Flow, FrozenFlow, Transform, standard_normal_log_prob
from fce.flows.gaussian import Gaussian
from fce.flows.glow import Glow
from fce.flows.maf import MAF
from fce.flows.spline import Spline

__all__ = [
    "MAF",
    "Flow",
    "FrozenFlow",
    "Gaussian",
    "Glow",
    "Spline",
    "Transform",
    "standard_normal_log_prob",
]
