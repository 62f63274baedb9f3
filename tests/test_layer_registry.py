"""The public adapter registry and HF ``Conv1D`` (a Linear with a transposed weight).

The HF oracle is curvlinops' K-FAC of the equivalent ``nn.Linear`` (weight
``Wᵀ``), float64. A stand-in with HF's class path and semantics runs where
transformers is absent; the real class runs where it is installed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import singd_rkfac as sr
from singd_rkfac import layers
from singd_rkfac.layers import HFConv1DLayer, Layer, LinearLayer, layer_class

curvlinops = pytest.importorskip("curvlinops")
pytestmark = pytest.mark.usefixtures("one_thread")


class Conv1D(nn.Module):
    """HF's ``Conv1D`` semantics under its class path: ``y = x W + b``, ``W`` of shape ``(nx, nf)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


Conv1D.__module__ = "transformers.pytorch_utils"


def _conv1d_classes():
    yield pytest.param(Conv1D, id="stand-in")
    try:
        from transformers.pytorch_utils import Conv1D as HFConv1D
    except ImportError:
        yield pytest.param(None, id="transformers", marks=pytest.mark.skip(reason="transformers is not installed"))
    else:
        yield pytest.param(HFConv1D, id="transformers")


def _nets(conv1d_cls):
    """A Conv1D net on ``(batch, positions, 4)`` inputs and its twin with an ``nn.Linear`` (weight ``Wᵀ``)."""
    net = nn.Sequential(conv1d_cls(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(5 * 3, 3)).double()
    twin = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(5 * 3, 3)).double()
    with torch.no_grad():
        twin[0].weight.copy_(net[0].weight.T)
        twin[0].bias.copy_(net[0].bias)
        twin[3].load_state_dict(net[3].state_dict())
    return net, twin


def _gradients(model, batch) -> None:
    model.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("mode", ["exact", "pi"])
@pytest.mark.parametrize("conv1d_cls", list(_conv1d_classes()))
def test_conv1d_equals_curvlinops_on_the_equivalent_linear(conv1d_cls, mode, approx):
    damping = 1e-2
    net, twin = _nets(conv1d_cls)
    batch = (torch.randn(7, 3, 4, dtype=torch.float64), torch.randint(0, 3, (7,)))
    params = list(twin.parameters())
    oracle = curvlinops.KFACLinearOperator(
        twin, nn.CrossEntropyLoss(), params, [batch], fisher_type="empirical", kfac_approx=approx,
        separate_weight_and_bias=False, check_deterministic=False,
    )
    inverse = curvlinops.KFACInverseLinearOperator(
        oracle, damping=damping, use_exact_damping=mode == "exact", use_heuristic_damping=mode == "pi", min_damping=1e-30,
    )
    _gradients(twin, batch)
    expected = inverse @ [p.grad.clone() for p in params]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # managed: no fallback warning
        pre = sr.Preconditioner(net, sr.Policy(sr.KFAC(damping=damping, damping_mode=mode, kfac_approx=approx)))
    assert type(pre.layers["0"].layer) is HFConv1DLayer
    _gradients(net, batch)
    pre.step()
    curvature = pre.layers["0"].curvature
    torch.testing.assert_close(curvature.a_factor.value, oracle._input_covariances["0"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(curvature.g_factor.value, oracle._gradient_covariances["0"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(net[0].weight.grad, expected[0].T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(net[0].bias.grad, expected[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(net[3].weight.grad, expected[2], rtol=1e-9, atol=1e-12)


def test_conv1d_is_recognised_by_class_path_without_importing_transformers():
    assert layer_class(Conv1D(3, 2)) is HFConv1DLayer
    subclass = type("MyConv1D", (Conv1D,), {})  # subclasses match through their bases
    assert layer_class(subclass(3, 2)) is HFConv1DLayer
    lookalike = type("Conv1D", (nn.Module,), {})  # same name, another package: not HF's
    assert layer_class(lookalike()) is None


class Scaled(nn.Module):
    """A third-party layer: ``y = s · (x Wᵀ + b)`` with a fixed scalar ``s``."""

    def __init__(self, d_in: int, d_out: int, scale: float) -> None:
        super().__init__()
        self.inner = nn.Linear(d_in, d_out)
        self.weight, self.bias, self.scale = self.inner.weight, self.inner.bias, scale
        del self.inner

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * nn.functional.linear(x, self.weight, self.bias)


class ScaledLayer(Layer):
    """Its adapter: the Linear rows, with the output gradient of the affine part (``s·∂ℓ/∂y``)."""

    module_types = (Scaled,)

    def input_features(self, x: Tensor) -> Tensor:
        return x

    def output_features(self, grad_output: Tensor) -> Tensor:
        return self.module.scale * grad_output


@pytest.fixture
def scaled_registered():
    layers.register(ScaledLayer)
    yield
    layers.unregister(ScaledLayer)


def test_a_registered_adapter_manages_a_custom_module_like_its_linear_twin(scaled_registered):
    torch.manual_seed(0)
    net = nn.Sequential(Scaled(4, 5, 3.0), nn.Tanh(), nn.Linear(5, 2)).double()
    twin = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    with torch.no_grad():  # 3·(x Wᵀ + b) = x (3W)ᵀ + 3b
        twin[0].weight.copy_(3 * net[0].weight)
        twin[0].bias.copy_(3 * net[0].bias)
        twin[2].load_state_dict(net[2].state_dict())
    batch = (torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 2, (9,)))
    pres = [sr.Preconditioner(m, sr.Policy(sr.KFAC())) for m in (net, twin)]
    for model, pre in zip((net, twin), pres):
        _gradients(model, batch)
        pre.step()
    assert "ScaledLayer" in pres[0].describe()
    mine, reference = pres[0].layers["0"].curvature, pres[1].layers["0"].curvature
    torch.testing.assert_close(mine.a_factor.value, reference.a_factor.value)
    # ∂ℓ/∂W = s·∂ℓ/∂(3W): the module's own weight has s² times the twin's output-side factor
    torch.testing.assert_close(mine.g_factor.value, 9 * reference.g_factor.value)


def test_registered_adapters_take_precedence_and_unregister_restores_the_builtin():
    class PlainLinear(LinearLayer):
        """A different treatment of nn.Linear (registered ahead of the built-in)."""

    assert layer_class(nn.Linear(2, 2)) is LinearLayer
    layers.register(PlainLinear)
    try:
        assert layer_class(nn.Linear(2, 2)) is PlainLinear
        assert layers.registered()[0] is PlainLinear
    finally:
        layers.unregister(PlainLinear)
    assert layer_class(nn.Linear(2, 2)) is LinearLayer
    layers.unregister(HFConv1DLayer)  # built-ins can be switched off ...
    try:
        assert layer_class(Conv1D(3, 2)) is None
        with pytest.raises(ValueError, match="not a registered or built-in adapter in use"):
            layers.unregister(HFConv1DLayer)
    finally:
        layers.register(HFConv1DLayer)  # ... and back on
    assert layer_class(Conv1D(3, 2)) is HFConv1DLayer


@pytest.mark.parametrize("bad", [nn.Linear, object, type("NoTypes", (LinearLayer,), {"module_types": ()})])
def test_register_refuses_what_is_not_an_adapter(bad):
    with pytest.raises(ValueError, match="register needs|must name the modules"):
        layers.register(bad)
