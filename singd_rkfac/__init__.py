"""singd_rkfac: Kronecker-factored natural-gradient optimizers, one method per layer.

>>> import singd_rkfac as sr
>>> policy = sr.Policy(default=sr.KFAC(), rules=[("head", sr.Skip())])
>>> # opt = sr.Optimizer(model, policy, lr=0.05, momentum=0.9)
"""

from __future__ import annotations

from . import structures
from .linalg import DecompositionError
from .methods import (
    BKFAC,
    BKFACC,
    BRKFAC,
    KFAC,
    RKFAC,
    SENG,
    SINGD,
    SREKFAC,
    CurvatureMethod,
    DiagonalKFAC,
    Method,
    NystromKFAC,
    Skip,
    TwoLevel,
)
from .optimizer import Optimizer
from .policy import Policy, Rule
from .preconditioner import Preconditioner

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "BKFAC",
    "BKFACC",
    "BRKFAC",
    "CurvatureMethod",
    "DecompositionError",
    "DiagonalKFAC",
    "KFAC",
    "Method",
    "NystromKFAC",
    "Optimizer",
    "Policy",
    "Preconditioner",
    "RKFAC",
    "Rule",
    "SENG",
    "SINGD",
    "SREKFAC",
    "Skip",
    "TwoLevel",
    "structures",
]
