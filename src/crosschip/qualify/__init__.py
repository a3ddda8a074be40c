"""Qualification: op numerics, model parity, training stability and collectives -> a verdict."""

from crosschip.qualify.qualifier import Qualifier, qualify
from crosschip.qualify.verdict import SERVE_ONLY, TRAIN, UNFIT

__all__ = ["Qualifier", "qualify", "TRAIN", "SERVE_ONLY", "UNFIT"]
