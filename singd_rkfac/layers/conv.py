"""``nn.Conv2d``: patches (im2col) with stride, dilation and every padding mode."""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .base import Layer


def explicit_padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` padding of a conv, string modes resolved.

    ``"same"`` puts the odd extra element on the right/bottom, as torch does.
    """
    if module.padding == "valid":
        return (0, 0, 0, 0)
    if module.padding == "same":
        pads: list[int] = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = module.padding
    return (pw, pw, ph, ph)


class Conv2dLayer(Layer):
    """Weight ``(c_out, c_in, kh, kw)`` viewed as ``c_out × (c_in·kh·kw)``."""

    module_types = (nn.Conv2d,)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}) is not supported yet"
        return super().unsupported_reason(module)

    def input_features(self, x: Tensor) -> Tensor:
        m = self.module
        pads = explicit_padding(m)
        padding: int | tuple[int, int] = 0
        if m.padding_mode != "zeros":
            x = F.pad(x, pads, mode=m.padding_mode)
        elif pads[0] == pads[1] and pads[2] == pads[3]:
            padding = (pads[2], pads[0])  # symmetric: let unfold pad
        else:
            x = F.pad(x, pads)
        patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
        return rearrange(patches, "n k positions -> n positions k")

    def output_features(self, grad_output: Tensor) -> Tensor:
        return rearrange(grad_output, "n c h w -> n (h w) c")
