"""Normalizing flows behind one interface: ``log_prob`` and ``sample_and_log_prob``."""

from fce.flows.base import Flow, FrozenFlow, Transform, standard_normal_log_prob
from fce.flows.gaussian import Gaussian
from fce.flows.glow import Glow
from fce.flows.maf import MAF

FLOWS: dict[str, type[Flow]] = {"glow": Glow, "maf": MAF}

__all__ = [
    "FLOWS",
    "MAF",
    "Flow",
    "FrozenFlow",
    "Gaussian",
    "Glow",
    "Transform",
    "standard_normal_log_prob",
]
