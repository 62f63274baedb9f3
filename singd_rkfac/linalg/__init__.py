"""Numerics shared by the curvature methods: robust decompositions, sketches, damped inverses."""

from .kron import COMPLEMENTS, Eigen, damped_inverse_apply, exact_damped_solve, inverse_from_eigh, with_complement
from .lowrank import SKETCHES, brand_update, corrected, range_finder, sketch_eigen, top
from .robust import DecompositionError, FailureTracker, robust_cholesky, robust_decompose, robust_eigh

__all__ = [
    "COMPLEMENTS",
    "DecompositionError",
    "Eigen",
    "FailureTracker",
    "SKETCHES",
    "brand_update",
    "corrected",
    "damped_inverse_apply",
    "exact_damped_solve",
    "inverse_from_eigh",
    "range_finder",
    "robust_cholesky",
    "robust_decompose",
    "robust_eigh",
    "sketch_eigen",
    "top",
    "with_complement",
]
