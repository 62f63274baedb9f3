"""Numerics shared by the curvature methods: robust decompositions, damped inverses."""

from .kron import exact_damped_solve, inverse_from_eigh
from .robust import DecompositionError, FailureTracker, robust_cholesky, robust_eigh

__all__ = [
    "DecompositionError",
    "FailureTracker",
    "exact_damped_solve",
    "inverse_from_eigh",
    "robust_cholesky",
    "robust_eigh",
]
