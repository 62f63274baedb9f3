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
from dataclasses import dataclass, replace

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
        diagonal_g: whether ``G`` is diagonal by construction (depthwise
            convolutions: each output channel is its own group); the rows
            ``g`` are handed over as usual, and the curvature keeps ``G`` as
            ``d_g`` numbers.
    """

    d_a: int
    d_g: int
    has_bias: bool
    diagonal_a: bool = False
    diagonal_g: bool = False


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


def class_path(cls: type) -> str:
    """``module.QualName`` of a class, e.g. ``"transformers.pytorch_utils.Conv1D"``."""
    return f"{cls.__module__}.{cls.__qualname__}"


class Layer(ABC):
    """Adapter between one module and the curvature methods: the public base of every adapter.

    A subclass names the modules it handles (`module_types`, or
    `module_type_names` for classes of optional packages that must not be
    imported to be recognised) and implements `input_features` /
    `output_features`; bias columns, weight sharing and the gradient-matrix
    views come from this base. Register it with `singd_rkfac.layers.register`.
    """

    #: Module classes (and their subclasses) this adapter handles.
    module_types: tuple[type[nn.Module], ...] = ()
    #: The same by dotted class path (`class_path`), matched against the module's class and its
    #: bases without importing anything: for classes of optional packages (HF ``Conv1D``).
    module_type_names: tuple[str, ...] = ()
    #: Row layouts (`share_weights`) this adapter can produce.
    layouts: tuple[str, ...] = ("expand", "reduce", "sample")
    #: Whether the gradient matrix is the transposed 2-D weight: ``(d_in, d_out)`` weights
    #: (``y = x W``: HF ``Conv1D``, ``nn.Embedding``) instead of torch's ``(d_out, d_in, ...)``.
    transposed: bool = False

    def __init__(self, module: nn.Module) -> None:
        reason = self.unsupported_reason(module)
        if reason is not None:
            raise ValueError(f"{type(module).__name__} cannot be managed: {reason}")
        self.module = module
        self.weight: nn.Parameter = module.weight
        bias = getattr(module, "bias", None)
        self.bias: nn.Parameter | None = bias if bias is not None and bias.requires_grad else None
        d_g = self.weight.shape[1] if self.transposed else self.weight.shape[0]
        d_in = self.weight.numel() // d_g
        self.dims = LayerDims(d_a=d_in + (self.bias is not None), d_g=d_g, has_bias=self.bias is not None)

    @classmethod
    def handles(cls, module: nn.Module) -> bool:
        """Whether ``module`` is of a type this adapter is for (`module_types`, `module_type_names`)."""
        if cls.module_types and isinstance(module, cls.module_types):
            return True
        return bool(cls.module_type_names) and any(class_path(c) in cls.module_type_names for c in type(module).__mro__)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why this module cannot be managed, or ``None`` if it can."""
        if not module.weight.requires_grad:
            return "its weight is frozen"
        return None

    def without_bias(self) -> "Layer":
        """This adapter with the bias left out of the rows and the gradient matrix (a tied use's own bias)."""
        if self.bias is not None:
            self.bias = None
            self.dims = replace(self.dims, d_a=self.dims.d_a - 1, has_bias=False)
        return self

    @property
    def adapter_text(self) -> str:
        """The adapter's name for ``describe()``."""
        return type(self).__name__

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

    def weight_matrix(self, tensor: Tensor) -> Tensor:
        """A weight-shaped tensor (the weight, its gradient) as the ``(d_g, d_a − has_bias)`` matrix (a view when contiguous)."""
        return tensor.T if self.transposed else tensor.reshape(self.dims.d_g, -1)

    def grad_matrix(self) -> Tensor | None:
        """``[∇W | ∇b]`` as a ``(d_g, d_a)`` matrix, or ``None`` without a gradient."""
        grad = self.weight.grad
        if grad is None:
            return None
        mat = self.weight_matrix(grad)
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
        if grad is None or not (self.transposed or grad.is_contiguous()):
            return None
        bias = None
        if self.bias is not None:
            if self.bias.grad is None:
                self.bias.grad = torch.zeros_like(self.bias)
            bias = self.bias.grad
        return self.weight_matrix(grad), bias

    def write_grad(self, mat: Tensor) -> None:
        """Overwrite ``.grad`` of weight (and bias) with a ``(d_g, d_a)`` matrix."""
        d_in = self.dims.d_a - self.dims.has_bias
        weight = mat[:, :d_in]
        self.weight.grad.copy_(weight.T if self.transposed else weight.reshape(self.weight.shape))
        if self.bias is not None:
            if self.bias.grad is None:
                self.bias.grad = torch.zeros_like(self.bias)
            self.bias.grad.copy_(mat[:, d_in])
