"""Curvature methods, one module per family, behind the ``Curvature`` protocol."""

from __future__ import annotations

from ..methods import CurvatureMethod
from .base import BatchCounts, Curvature
from .kfac import KFACCurvature
from .seng import SENGCurvature
from .singd import SINGDCurvature

__all__ = ["BatchCounts", "Curvature", "KFACCurvature", "SENGCurvature", "SINGDCurvature", "curvature_class", "register"]

#: Implementations; a method config is served by the first whose types it is an instance of.
CURVATURE_CLASSES: list[type[Curvature]] = [KFACCurvature, SINGDCurvature, SENGCurvature]


def register(cls: type[Curvature]) -> type[Curvature]:
    """Serve ``cls.method_types`` with ``cls`` ahead of the built-in implementations.

    The seam for a new method (or a deliberately different variant, such as a
    benchmark's negative control): a config dataclass plus a `Curvature`
    subclass. Usable as a class decorator.
    """
    if not (isinstance(cls, type) and issubclass(cls, Curvature) and cls.method_types):
        raise ValueError(f"register needs a Curvature subclass with method_types (got {cls!r})")
    CURVATURE_CLASSES.insert(0, cls)
    return cls


def curvature_class(method: CurvatureMethod) -> type[Curvature]:
    """The implementation serving ``method``."""
    for cls in CURVATURE_CLASSES:
        if isinstance(method, cls.method_types):
            return cls
    raise TypeError(f"no curvature implementation for {type(method).__name__}")
