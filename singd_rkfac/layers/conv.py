"""``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: patches with stride, dilation, every padding, and groups.

One code path for every dimension: the input is padded explicitly (any
``padding_mode``, ``"same"`` / ``"valid"`` resolved), each spatial dimension
is cut into strided windows (`Tensor.unfold`, every ``dilation``-th element
kept) and einops puts each patch into the weight's column order
``(c_in/groups, *kernel)``.

Groups: the weight ``(c_out, c_in/groups, *kernel)`` is one
``c_out × (c_in/groups·∏kernel)`` matrix, and output channel ``o`` of group
``j`` only sees group ``j``'s patch. So every (sample, position, group) is a
row: ``a`` is group ``j``'s patch, ``g`` the output gradient with the other
groups' channels zeroed. Then ``Σ gᵀa = ∇W`` exactly, ``G`` is
block-diagonal with each group's own output-gradient covariance ``G_j``, and
``A`` (over ``groups`` times as many rows) is the **average of the groups'
patch covariances**. Group ``j``'s Kronecker block is ``A_avg ⊗ G_j`` where
per-group K-FAC has ``A_j ⊗ G_j``; cross-group blocks are zero, as if each
group were its own layer. With ``groups=1`` this is plain K-FAC.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, reduce
from torch import Tensor, nn

from .base import Layer, share_weights

Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d


def explicit_padding(module: Conv) -> tuple[int, ...]:
    """Padding in `F.pad` order: ``(before, after)`` per spatial dimension, last dimension first.

    ``"same"`` puts an odd extra element after, as torch does.
    """
    if module.padding == "valid":
        pairs = [(0, 0)] * len(module.kernel_size)
    elif module.padding == "same":
        totals = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
        pairs = [(total // 2, total - total // 2) for total in totals]
    else:
        pairs = [(p, p) for p in module.padding]
    return tuple(p for pair in reversed(pairs) for p in pair)


def _axes(prefix: str, count: int) -> str:
    """Space-separated einops axis names ``prefix0 prefix1 ...``."""
    return " ".join(f"{prefix}{i}" for i in range(count))


def extract_patches(x: Tensor, module: Conv) -> Tensor:
    """Patches of a batched input ``(n, c_in, *spatial)``: ``(n, positions, groups, c_in/groups·∏kernel)``."""
    pads = explicit_padding(module)
    if any(pads):
        x = F.pad(x, pads, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    for dim, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation), start=2):
        x = x.unfold(dim, d * (k - 1) + 1, s)[..., ::d]  # appends this dimension's kernel axis
    out, kernel = _axes("o", len(module.kernel_size)), _axes("k", len(module.kernel_size))
    return rearrange(x, f"n (j c) {out} {kernel} -> n ({out}) j (c {kernel})", j=module.groups)


class ConvLayer(Layer):
    """Weight ``(c_out, c_in/groups, *kernel)`` viewed as ``c_out × (c_in/groups·∏kernel)``.

    Features are ``(batch, positions, groups, d)``: under ``expand`` and
    ``sample`` the groups are further weight-sharing positions; under
    ``reduce`` each (sample, group) pools its own positions into one row.
    Unbatched inputs ``(c_in, *spatial)`` count as one sample.
    """

    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def __init__(self, module: Conv) -> None:
        super().__init__(module)
        if module.groups == module.out_channels > 1:  # depthwise: G is block-diagonal with 1×1 blocks
            self.dims = replace(self.dims, diagonal_g=True)

    def _batched(self, t: Tensor) -> Tensor:
        """``t`` with a batch dimension (unbatched ``(c, *spatial)`` becomes one sample)."""
        return t if t.ndim == len(self.module.kernel_size) + 2 else t.unsqueeze(0)

    def batch_size(self, x: Tensor) -> int:
        return self._batched(x).shape[0]

    def input_features(self, x: Tensor) -> Tensor:
        return extract_patches(self._batched(x), self.module)

    def output_features(self, grad_output: Tensor) -> Tensor:
        """``(batch, positions, groups, c_out)``: group ``j``'s row keeps only group ``j``'s channels."""
        groups = self.module.groups
        spatial = _axes("s", len(self.module.kernel_size))
        g = rearrange(self._batched(grad_output), f"n (j c) {spatial} -> n ({spatial}) j c", j=groups)
        eye = torch.eye(groups, dtype=g.dtype, device=g.device)
        return rearrange(einsum(g, eye, "n t j c, j k -> n t j k c"), "n t j k c -> n t j (k c)")

    def share(self, features: Tensor, layout: str, pool: str) -> Tensor:
        """Groups are rows, not positions, under ``reduce``: ``(batch·groups, d)``."""
        if layout == "reduce":
            return reduce(features, "n t j d -> (n j) d", pool)
        return share_weights(features, layout, pool)
