"""A weight shared by several managed modules (tied weights), seen as one layer.

Each use is a module with its own adapter (an ``nn.Embedding`` and the
``nn.Linear`` LM head sharing its matrix, the same Linear weight in two
places, ...). The gradient of the shared weight is the sum of the uses'
gradients, so it is preconditioned once, as one ``d_g × d_a`` matrix laid out
as the **first** use lays it out (model order). A use whose layout is the
transpose of that (an embedding's ``Wᵀ`` against a head's ``W``) is
``flipped``: its output-gradient rows live on the shared matrix's input side
and its input rows on the output side. How the uses' factors combine into
one Kronecker pair is the curvature's business (`singd_rkfac.curvature.tied`).

Only the shared weight is preconditioned here; a use's own bias is not shared
and goes to the fallback rule.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor, nn

from .base import Layer, LayerDims

__all__ = ["TiedLayer", "TiedUse"]


@dataclass
class TiedUse:
    """One module using the shared weight.

    Attributes:
        name: the module's qualified name.
        layer: its adapter, bias left out (`Layer.without_bias`).
        flipped: whether its gradient matrix is the transpose of the shared layout.
    """

    name: str
    layer: Layer
    flipped: bool


class TiedLayer:
    """The shared weight of several uses as one layer (the `Layer` interface the preconditioner needs).

    Args:
        uses: ``(name, adapter)`` per module, in model order; every adapter's
            ``weight`` is the same 2-D parameter.
    """

    layouts: tuple[str, ...]

    def __init__(self, uses: list[tuple[str, Layer]]) -> None:
        first = uses[0][1]
        self.weight: nn.Parameter = first.weight
        self.bias = None
        self.module = first.module
        self.uses = [TiedUse(name, layer.without_bias(), layer.transposed != first.transposed) for name, layer in uses]
        self.layouts = tuple(lay for lay in first.layouts if all(lay in u.layer.layouts for u in self.uses) and lay != "sample")
        base = self.uses[0].layer.dims
        # A stays diagonal only when every use's input side is diagonal (one-hot) and on the shared input side;
        # otherwise the uses that hand over diag(aᵀa) hand over their one-hot rows instead
        diagonal_a = all(u.layer.dims.diagonal_a and not u.flipped for u in self.uses)
        if not diagonal_a:
            for use in self.uses:
                use.layer.dims = replace(use.layer.dims, diagonal_a=False)
        self.dims = LayerDims(d_a=base.d_a, d_g=base.d_g, has_bias=False, diagonal_a=diagonal_a)

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight]

    @property
    def shape_text(self) -> str:
        return " + ".join(f"{u.name}: {u.layer.shape_text}" for u in self.uses)

    @property
    def adapter_text(self) -> str:
        return "tied(" + ", ".join(type(u.layer).__name__ for u in self.uses) + ")"

    def grad_matrix(self) -> Tensor | None:
        return self.uses[0].layer.grad_matrix()

    def grad_parts(self) -> tuple[Tensor, Tensor | None] | None:
        return self.uses[0].layer.grad_parts()

    def write_grad(self, mat: Tensor) -> None:
        self.uses[0].layer.write_grad(mat)

