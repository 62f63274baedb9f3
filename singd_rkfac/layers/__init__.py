"""Module families the curvature methods can manage, one file each."""

from __future__ import annotations

from torch import nn

from .base import Layer, LayerDims, share_weights
from .conv import ConvLayer
from .embedding import EmbeddingLayer
from .linear import LinearLayer

__all__ = ["Layer", "LayerDims", "LinearLayer", "ConvLayer", "EmbeddingLayer", "layer_class", "share_weights"]

#: Supported module families; the first whose types match a module wins.
LAYER_CLASSES: tuple[type[Layer], ...] = (LinearLayer, ConvLayer, EmbeddingLayer)


def layer_class(module: nn.Module) -> type[Layer] | None:
    """The adapter class for ``module``, or ``None`` if its type is not supported."""
    for cls in LAYER_CLASSES:
        if isinstance(module, cls.module_types):
            return cls
    return None
