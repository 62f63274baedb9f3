"""How a module family turns (input, grad_output) into Kronecker-factor rows.

A `Layer` wraps one module and knows three things: the factor rows
``a`` (m × d_a, with a trailing ones column when the layer has a trainable
bias) and ``g`` (m × d_g) of one call, and how to view the gradient
``[∇W | ∇b]`` as a ``d_g × d_a`` matrix and write a preconditioned one back.
Weight sharing (sequence positions, conv patches) follows curvlinops'
definition of K-FAC-expand and K-FAC-reduce.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from einops import rearrange, reduce
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerDims:
    """Shapes of one layer's Kronecker factors.

    Attributes:
        d_a: input-side dimension (fan-in, +1 for a trainable bias).
        d_g: output-side dimension (fan-out).
        has_bias: whether the last column of ``a`` is the constant 1.
        diagonal_a: whether ``A`` is diagonal by construction (one-hot inputs,
            `EmbeddingLayer`): ``a`` is then handed over as ``diag(aᵀa)``, a
            ``(d_a,)`` vector, and the curvature keeps ``A`` as ``d_a`` numbers.
    """

    d_a: int
    d_g: int
    has_bias: bool
    diagonal_a: bool = False


def share_weights(features: Tensor, layout: str, pool: str) -> Tensor:
    """Rows of a ``(batch, *positions, d)`` tensor under weight sharing.

    ``expand`` makes every (sample, position) a row; ``reduce`` pools the
    positions of each sample with ``pool`` (``"mean"`` for inputs, ``"sum"``
    for output gradients). Both return ``(rows, d)``. ``sample`` keeps the
    samples apart for per-sample gradients (SENG, two-level K-FAC):
    ``(batch, positions, d)``, one position without sharing.
    """
    if layout == "expand":
        return rearrange(features, "n ... d -> (n ...) d")
    if layout == "sample":
        return rearrange(features, "n ... d -> n (...) d")
    return reduce(features, "n ... d -> n d", pool)


class Layer(ABC):
    """Adapter between one module and the curvature methods."""

    #: Module classes (and their subclasses) this adapter handles.
    module_types: tuple[type[nn.Module], ...] = ()
    #: Row layouts (`share_weights`) this adapter can produce.
    layouts: tuple[str, ...] = ("expand", "reduce", "sample")

    def __init__(self, module: nn.Module) -> None:
        reason = self.unsupported_reason(module)
        if reason is not None:
            raise ValueError(f"{type(module).__name__} cannot be managed: {reason}")
        self.module = module
        self.weight: nn.Parameter = module.weight
        bias = getattr(module, "bias", None)
        self.bias: nn.Parameter | None = bias if bias is not None and bias.requires_grad else None
        d_g = self.weight.shape[0]
        d_a = self.weight[0].numel() + (self.bias is not None)
        self.dims = LayerDims(d_a=d_a, d_g=d_g, has_bias=self.bias is not None)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why this module cannot be managed, or ``None`` if it can."""
        if not module.weight.requires_grad:
            return "its weight is frozen"
        return None

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters this layer preconditions: weight, then bias if trainable."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @property
    def shape_text(self) -> str:
        """Short shape description for tables, e.g. ``"784→512"``."""
        return f"{self.dims.d_a - self.dims.has_bias}→{self.dims.d_g}"

    @abstractmethod
    def input_features(self, x: Tensor) -> Tensor:
        """The input as ``(batch, *positions, d_in)`` in the weight's column order."""

    @abstractmethod
    def output_features(self, grad_output: Tensor) -> Tensor:
        """The output gradient as ``(batch, *positions, d_out)``."""

    def batch_size(self, x: Tensor) -> int:
        """Number of samples in one call's input (its leading dimension)."""
        return x.shape[0]

    def share(self, features: Tensor, layout: str, pool: str) -> Tensor:
        """Rows of this layer's features under ``layout`` (`share_weights`; conv groups pool differently)."""
        return share_weights(features, layout, pool)

    def input_rows(self, x: Tensor, layout: str, dtype: torch.dtype) -> Tensor:
        """Factor rows ``a`` of one call: ``(rows, d_a)`` in ``dtype`` (``(batch, positions, d_a)`` for ``"sample"``)."""
        rows = self.share(self.input_features(x.to(dtype)), layout, "mean")
        if self.bias is not None:
            rows = torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
        return rows

    def output_rows(self, grad_output: Tensor, layout: str, dtype: torch.dtype) -> Tensor:
        """Factor rows ``g`` of one call: ``(rows, d_g)`` in ``dtype`` (not yet scaled; 3-D for ``"sample"``)."""
        return self.share(self.output_features(grad_output.to(dtype)), layout, "sum")

    def grad_matrix(self) -> Tensor | None:
        """``[∇W | ∇b]`` as a ``(d_g, d_a)`` matrix, or ``None`` without a gradient."""
        if self.weight.grad is None:
            return None
        mat = self.weight.grad.reshape(self.dims.d_g, -1)
        if self.bias is not None:
            bias_grad = self.bias.grad
            if bias_grad is None:
                bias_grad = torch.zeros_like(self.bias)
            mat = torch.cat([mat, bias_grad.unsqueeze(1)], dim=1)
        return mat

    def grad_parts(self) -> tuple[Tensor, Tensor | None] | None:
        """``[∇W | ∇b]`` as views that in-place ops write through: ``(d_g, d_a − has_bias)`` and ``(d_g,)``.

        ``None`` without a weight gradient, or when the weight gradient's
        memory cannot be viewed as a matrix (then `grad_matrix` copies).
        """
        grad = self.weight.grad
        if grad is None or not grad.is_contiguous():
            return None
        bias = None
        if self.bias is not None:
            if self.bias.grad is None:
                self.bias.grad = torch.zeros_like(self.bias)
            bias = self.bias.grad
        return grad.view(self.dims.d_g, -1), bias

    def write_grad(self, mat: Tensor) -> None:
        """Overwrite ``.grad`` of weight (and bias) with a ``(d_g, d_a)`` matrix."""
        d_in = self.dims.d_a - self.dims.has_bias
        self.weight.grad.copy_(mat[:, :d_in].reshape(self.weight.shape))
        if self.bias is not None:
            if self.bias.grad is None:
                self.bias.grad = torch.zeros_like(self.bias)
            self.bias.grad.copy_(mat[:, d_in])
