"""K-FAC factors and preconditioned gradients against curvlinops (DESIGN §8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import singd_rkfac as sr
from conftest import classification_batch, cnn, mlp

curvlinops = pytest.importorskip("curvlinops")

CONV_VARIANTS = {
    "stride2-pad1": {"stride": 2, "padding": 1},
    "dilation2-same": {"dilation": 2, "padding": "same"},
    "stride-dilation-valid": {"stride": (2, 1), "dilation": (1, 2), "padding": "valid"},
    "kernel2-pad-no-bias": {"kernel_size": 2, "padding": (1, 0), "bias": False},
}


def _oracle(model: nn.Module, batch, approx: str):
    loss = nn.CrossEntropyLoss()
    params = [p for p in model.parameters()]
    kfac = curvlinops.KFACLinearOperator(
        model, loss, params, [batch], fisher_type="empirical", kfac_approx=approx,
        separate_weight_and_bias=False, check_deterministic=False,
    )
    kfac.compute_kronecker_factors()
    return kfac, params


def _gradients(model: nn.Module, batch) -> None:
    model.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()


def _models():
    yield "mlp", mlp(), classification_batch(9, (6,), 3)
    for name, kwargs in CONV_VARIANTS.items():
        yield f"cnn-{name}", cnn(**kwargs), classification_batch(5, (2, 8, 8), 4)


MODELS = list(_models())


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name,model,batch", MODELS, ids=[m[0] for m in MODELS])
def test_factors_equal_curvlinops(name, model, batch, approx):
    kfac, _ = _oracle(model, batch, approx)
    pre = sr.Preconditioner(model, sr.Policy(sr.KFAC(kfac_approx=approx)))
    _gradients(model, batch)
    pre.step()
    assert set(pre.layers) == set(kfac._input_covariances)
    for layer, managed in pre.layers.items():
        curvature = managed.curvature
        torch.testing.assert_close(curvature.a_factor.value, kfac._input_covariances[layer], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(curvature.g_factor.value, kfac._gradient_covariances[layer], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name,model,batch", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_preconditioned_gradient_equals_curvlinops_inverse(name, model, batch, approx, mode):
    damping = 1e-2
    kfac, params = _oracle(model, batch, approx)
    inverse = curvlinops.KFACInverseLinearOperator(
        kfac, damping=damping, use_exact_damping=mode == "exact",
        use_heuristic_damping=mode == "pi", min_damping=1e-30,
    )
    _gradients(model, batch)
    expected = inverse @ [p.grad.clone() for p in params]
    pre = sr.Preconditioner(model, sr.Policy(sr.KFAC(kfac_approx=approx, damping=damping, damping_mode=mode)))
    _gradients(model, batch)
    pre.step()
    for param, reference in zip(params, expected):
        torch.testing.assert_close(param.grad, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("overrides", [{"inverse": "cholesky"}, {"a": "cholesky"}, {"g": "cholesky"}])
def test_cholesky_gives_the_eigh_pi_damped_direction(overrides):
    batch = classification_batch(9, (6,), 3)
    model = mlp()
    directions = []
    for method in (sr.KFAC(damping=1e-3), sr.KFAC(damping=1e-3, **overrides)):
        net = mlp()
        net.load_state_dict(model.state_dict())
        pre = sr.Preconditioner(net, sr.Policy(method))
        _gradients(net, batch)
        pre.step()
        directions.append([p.grad.clone() for p in net.parameters()])
    for got, want in zip(*directions):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
