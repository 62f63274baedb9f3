"""Layer adapters: patches reproduce the convolution itself, gradient matrix views."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from singd_rkfac.layers import Conv2dLayer, LinearLayer, layer_class


@settings(max_examples=40, deadline=None)
@given(
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.one_of(st.just("valid"), st.tuples(st.integers(0, 2), st.integers(0, 2))),
    padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    bias=st.booleans(),
)
def test_conv_patches_times_weight_reproduce_the_convolution(kernel, stride, dilation, padding, padding_mode, bias):
    """The oracle is the convolution itself: rows(x) @ [W | b]ᵀ = conv(x)."""
    conv = nn.Conv2d(2, 3, kernel, stride=stride, dilation=dilation, padding=padding, padding_mode=padding_mode, bias=bias).double()
    x = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    try:
        output = conv(x)
    except RuntimeError:
        return  # configuration torch itself rejects (e.g. reflect padding wider than the input)
    layer = Conv2dLayer(conv)
    rows = layer.input_rows(x, "expand", torch.float64)
    weight = conv.weight.reshape(3, -1)
    if bias:
        weight = torch.cat([weight, conv.bias[:, None]], 1)
    torch.testing.assert_close(rows @ weight.T, rearrange(output, "n c h w -> (n h w) c"))


@pytest.mark.parametrize("kernel,dilation", [(2, 1), (4, 2), (3, 3)])
def test_same_padding_with_even_total_padding_matches_torch(kernel, dilation):
    conv = nn.Conv2d(2, 3, kernel, dilation=dilation, padding="same").double()
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    rows = Conv2dLayer(conv).input_rows(x, "expand", torch.float64)
    weight = torch.cat([conv.weight.reshape(3, -1), conv.bias[:, None]], 1)
    torch.testing.assert_close(rows @ weight.T, rearrange(conv(x), "n c h w -> (n h w) c"))


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
    conv = nn.Conv2d(2, 3, 2).double()
    conv.weight.grad = torch.randn_like(conv.weight)
    conv.bias.grad = torch.randn_like(conv.bias)
    layer = Conv2dLayer(conv)
    mat = layer.grad_matrix()
    assert mat.shape == (3, 2 * 2 * 2 + 1)
    layer.write_grad(2 * mat)
    torch.testing.assert_close(layer.grad_matrix(), 2 * mat)
    conv.bias.requires_grad_(False)
    frozen = Conv2dLayer(conv)
    assert frozen.dims.d_a == 8 and not frozen.dims.has_bias and frozen.params == [conv.weight]


def test_unsupported_modules_are_refused_with_a_reason():
    assert layer_class(nn.Embedding(3, 2)) is None
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    assert "groups=2" in Conv2dLayer.unsupported_reason(grouped)
    with pytest.raises(ValueError, match="grouped convolution"):
        Conv2dLayer(grouped)
    frozen = nn.Linear(2, 2)
    frozen.weight.requires_grad_(False)
    assert LinearLayer.unsupported_reason(frozen) == "its weight is frozen"
