"""Module families the curvature methods can manage, one file each, and the adapter registry.

`layer_class` finds a module's adapter: adapters added with `register` are
tried first (the latest first), then the built-ins (`BUILTIN_LAYERS`). A
third-party module — or a built-in one to be treated differently — plugs in
with a `Layer` subclass and one `register` call, without editing the package.
"""

from __future__ import annotations

from torch import nn

from .base import Layer, LayerDims, class_path, share_weights
from .conv import ConvLayer
from .embedding import EmbeddingLayer
from .hf_conv1d import HFConv1DLayer
from .linear import LinearLayer

__all__ = [
    "Layer", "LayerDims", "LinearLayer", "ConvLayer", "EmbeddingLayer", "HFConv1DLayer", "BUILTIN_LAYERS",
    "class_path", "layer_class", "register", "registered", "share_weights", "unregister",
]

#: The built-in adapters, in the order they are tried after the registered ones.
BUILTIN_LAYERS: tuple[type[Layer], ...] = (LinearLayer, ConvLayer, EmbeddingLayer, HFConv1DLayer)

_registered: list[type[Layer]] = []
_removed_builtins: set[type[Layer]] = set()


def register(layer_cls: type[Layer]) -> type[Layer]:
    """Try ``layer_cls`` before every built-in adapter (and before those registered earlier).

    ``layer_cls`` must subclass `Layer` and name its modules in
    ``module_types`` or ``module_type_names``. Registering an adapter again
    moves it to the front; registering a built-in that was `unregister`-ed
    brings it back. Usable as a class decorator. Takes effect for optimizers
    and policy resolutions made afterwards.
    """
    if not (isinstance(layer_cls, type) and issubclass(layer_cls, Layer)):
        raise ValueError(f"register needs a subclass of singd_rkfac.layers.Layer (got {layer_cls!r})")
    types_ok = isinstance(layer_cls.module_types, tuple) and all(
        isinstance(t, type) and issubclass(t, nn.Module) for t in layer_cls.module_types
    )
    names_ok = isinstance(layer_cls.module_type_names, tuple) and all(isinstance(n, str) for n in layer_cls.module_type_names)
    if not (types_ok and names_ok) or not (layer_cls.module_types or layer_cls.module_type_names):
        raise ValueError(
            f"{layer_cls.__name__} must name the modules it handles: module_types (a tuple of nn.Module "
            "classes) or module_type_names (a tuple of dotted class paths)"
        )
    if layer_cls in BUILTIN_LAYERS:
        _removed_builtins.discard(layer_cls)
        return layer_cls
    if layer_cls in _registered:
        _registered.remove(layer_cls)
    _registered.insert(0, layer_cls)
    return layer_cls


def unregister(layer_cls: type[Layer]) -> None:
    """Stop using ``layer_cls`` (a registered adapter, or a built-in one); ``ValueError`` if it is not in use."""
    if layer_cls in _registered:
        _registered.remove(layer_cls)
    elif layer_cls in BUILTIN_LAYERS and layer_cls not in _removed_builtins:
        _removed_builtins.add(layer_cls)
    else:
        raise ValueError(f"{getattr(layer_cls, '__name__', layer_cls)!r} is not a registered or built-in adapter in use")


def registered() -> tuple[type[Layer], ...]:
    """Every adapter in use, in the order `layer_class` tries them."""
    return (*_registered, *(cls for cls in BUILTIN_LAYERS if cls not in _removed_builtins))


def layer_class(module: nn.Module) -> type[Layer] | None:
    """The adapter class for ``module``, or ``None`` if no adapter in use handles its type."""
    for cls in registered():
        if cls.handles(module):
            return cls
    return None
