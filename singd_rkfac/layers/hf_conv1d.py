"""HF transformers' ``Conv1D`` (GPT-2, GPT-Neo-style checkpoints): a Linear with a transposed weight.

``transformers.pytorch_utils.Conv1D(nf, nx)`` computes ``y = x W + b`` with
``W`` of shape ``(nx, nf)`` on inputs ``(batch, *positions, nx)``; despite
its name it is no convolution. It is managed exactly as the ``nn.Linear``
with weight ``Wᵀ`` (``nf × nx``): same rows, same weight sharing over
positions, the gradient matrix ``[∇Wᵀ | ∇b]``. The class is recognised by
its dotted path, so transformers is never imported by this package.
"""

from __future__ import annotations

from .linear import LinearLayer

__all__ = ["HFConv1DLayer"]


class HFConv1DLayer(LinearLayer):
    """``transformers.pytorch_utils.Conv1D``: ``y = x W + b``, ``W`` ``(nx, nf)`` viewed as ``nf × nx``."""

    module_types = ()
    module_type_names = ("transformers.pytorch_utils.Conv1D",)
    transposed = True
