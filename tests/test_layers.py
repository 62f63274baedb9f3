"""Layer adapters: rows and gradient matrix views (convolutions: test_conv_layers.py)."""

from __future__ import annotations

import torch
from torch import nn

from singd_rkfac.layers import ConvLayer, LinearLayer, layer_class


def test_linear_rows_for_sequences_expand_and_reduce():
    linear = nn.Linear(4, 3).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    layer = LinearLayer(linear)
    expand = layer.input_rows(x, "expand", torch.float64)
    reduce = layer.input_rows(x, "reduce", torch.float64)
    assert expand.shape == (10, 5) and reduce.shape == (2, 5)
    torch.testing.assert_close(reduce[:, :4], x.mean(1))
    grads = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(layer.output_rows(grads, "reduce", torch.float64), grads.sum(1))


def test_gradient_matrix_round_trip_and_frozen_bias():
    conv = nn.Conv2d(4, 6, 2, groups=2).double()
    conv.weight.grad = torch.randn_like(conv.weight)
    conv.bias.grad = torch.randn_like(conv.bias)
    layer = ConvLayer(conv)
    mat = layer.grad_matrix()
    assert mat.shape == (6, 2 * 2 * 2 + 1)  # c_out × (c_in/groups·kh·kw + 1)
    layer.write_grad(2 * mat)
    torch.testing.assert_close(layer.grad_matrix(), 2 * mat)
    conv.bias.requires_grad_(False)
    frozen = ConvLayer(conv)
    assert frozen.dims.d_a == 8 and not frozen.dims.has_bias and frozen.params == [conv.weight]


def test_unsupported_modules_are_refused_with_a_reason():
    assert layer_class(nn.Bilinear(3, 3, 2)) is None
    frozen = nn.Linear(2, 2)
    frozen.weight.requires_grad_(False)
    assert LinearLayer.unsupported_reason(frozen) == "its weight is frozen"
