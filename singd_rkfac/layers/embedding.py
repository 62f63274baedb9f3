"""``nn.Embedding``: a Linear on one-hot token vectors, whose input factor is diagonal.

``y = onehot(x) W`` with ``W`` of shape ``(num_embeddings, dim)``: the layer
is the bias-free Linear ``dim × num_embeddings`` with weight ``Wᵀ``. Its
input rows are one-hot, so ``A = aᵀa / rows = diag(token counts) / rows``
exactly; the rows are never formed — `input_rows` hands over
``diag(aᵀa)`` (the counts, ``(num_embeddings,)``) and the curvature keeps
``A`` as that vector (`LayerDims.diagonal_a`). ``G`` is the dense
``dim × dim`` factor of the output gradients. Only K-FAC-expand: pooling
one-hot rows per sample (reduce) or keeping them per sample (SENG) makes
``A`` dense, ``num_embeddings²``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Layer, LayerDims


class EmbeddingLayer(Layer):
    """Weight ``(num_embeddings, dim)`` viewed as the ``dim × num_embeddings`` gradient matrix."""

    module_types = (nn.Embedding,)
    layouts = ("expand",)
    transposed = True

    def __init__(self, module: nn.Embedding) -> None:
        super().__init__(module)
        self.dims = LayerDims(d_a=module.num_embeddings, d_g=module.embedding_dim, has_bias=False, diagonal_a=True)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if module.sparse:
            return "sparse=True gives sparse gradients, and the preconditioned gradient is dense (use sparse=False)"
        if module.scale_grad_by_freq:
            return ("scale_grad_by_freq=True rescales each row's gradient by its batch frequency, "
                    "so it is not the loss gradient the factors model")
        return super().unsupported_reason(module)

    def input_features(self, x: Tensor) -> Tensor:
        """The one-hot rows ``(batch, *positions, num_embeddings)`` of the equivalent Linear (never formed by `input_rows`)."""
        return F.one_hot(x if x.ndim else x.unsqueeze(0), self.dims.d_a)

    def input_rows(self, x: Tensor, layout: str, dtype: torch.dtype) -> Tensor:
        """``diag(aᵀa)`` of the one-hot rows: how often each token occurs, ``(num_embeddings,)``.

        In ``dtype``, but fp32 at least: fp16 holds counts only up to 65504.
        Without `LayerDims.diagonal_a` (a weight tied to a layer whose factor
        on this side is dense) the one-hot rows themselves, ``(rows, num_embeddings)``.
        """
        if not self.dims.diagonal_a:
            return self.share(self.input_features(x).to(dtype), layout, "mean")
        counts = torch.bincount(x.reshape(-1), minlength=self.dims.d_a)
        return counts.to(torch.promote_types(dtype, torch.float32))

    def output_features(self, grad_output: Tensor) -> Tensor:
        return grad_output if grad_output.ndim > 1 else grad_output.unsqueeze(0)

    def batch_size(self, x: Tensor) -> int:
        return x.shape[0] if x.ndim else 1

    @property
    def shape_text(self) -> str:
        return f"{self.dims.d_a} tokens→{self.dims.d_g}"
