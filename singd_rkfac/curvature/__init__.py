"""Curvature methods, one module per family, behind the ``Curvature`` protocol."""

from __future__ import annotations

from ..methods import CurvatureMethod
from .base import BatchCounts, Curvature
from .kfac import KFACCurvature
from .singd import SINGDCurvature

__all__ = ["BatchCounts", "Curvature", "KFACCurvature", "SINGDCurvature", "curvature_class"]

#: Implementations; a method config is served by the first whose types it is an instance of.
CURVATURE_CLASSES: tuple[type[Curvature], ...] = (KFACCurvature, SINGDCurvature)


def curvature_class(method: CurvatureMethod) -> type[Curvature]:
    """The implementation serving ``method``."""
    for cls in CURVATURE_CLASSES:
        if isinstance(method, cls.method_types):
            return cls
    raise TypeError(f"no curvature implementation for {type(method).__name__}")
