"""``nn.Linear`` with any number of leading dimensions (positions share the weight)."""

from __future__ import annotations

from torch import Tensor, nn

from .base import Layer


class LinearLayer(Layer):
    """``y = x Wᵀ + b`` on ``(batch, *positions, d_in)`` inputs."""

    module_types = (nn.Linear,)

    def input_features(self, x: Tensor) -> Tensor:
        return x if x.ndim > 1 else x.unsqueeze(0)

    def output_features(self, grad_output: Tensor) -> Tensor:
        return grad_output if grad_output.ndim > 1 else grad_output.unsqueeze(0)

    def batch_size(self, x: Tensor) -> int:
        return x.shape[0] if x.ndim > 1 else 1
