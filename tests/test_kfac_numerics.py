"""K-FAC running averages, π-damping and the decomposition fallback chain (DESIGN §3.1, §5)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import singd_rkfac as sr
from singd_rkfac.linalg import robust_cholesky, robust_eigh
from conftest import classification_batch, mlp


def _step(model, pre, batch):
    model.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    pre.step()


def test_running_average_equals_explicit_ema_of_batch_factors():
    """First statistics step sets F = F_batch; then F ← ρF + (1−ρ)F_batch."""
    rho = 0.7
    model = mlp()
    pre = sr.Preconditioner(model, sr.Policy(sr.KFAC(ema=rho)))
    expected_a = expected_g = None
    for step in range(4):
        batch = classification_batch(10, (6,), 3)
        rows = {}

        def keep(module, args, output):
            rows["a"] = torch.cat([args[0], torch.ones(10, 1, dtype=torch.float64)], 1).detach()
            output.register_hook(lambda grad: rows.__setitem__("g", grad.detach()))

        handle = model[2].register_forward_hook(keep)
        _step(model, pre, batch)
        handle.remove()
        batch_a = rows["a"].T @ rows["a"] / 10
        batch_g = 10 * rows["g"].T @ rows["g"]
        expected_a = batch_a if step == 0 else rho * expected_a + (1 - rho) * batch_a
        expected_g = batch_g if step == 0 else rho * expected_g + (1 - rho) * batch_g
        curvature = pre.layers["2"].curvature
        torch.testing.assert_close(curvature.a_factor.value, expected_a, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(curvature.g_factor.value, expected_g, rtol=1e-12, atol=1e-15)


def test_pi_damping_matches_the_explicit_formula():
    model = mlp()
    damping = 3e-3
    pre = sr.Preconditioner(model, sr.Policy(sr.KFAC(damping=damping)))
    _step(model, pre, classification_batch(10, (6,), 3))
    curvature = pre.layers["0"].curvature
    A, G = curvature.a_factor.value, curvature.g_factor.value
    pi = torch.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
    eye_a, eye_g = torch.eye(A.shape[0], dtype=A.dtype), torch.eye(G.shape[0], dtype=G.dtype)
    torch.testing.assert_close(curvature.a_factor.inverse.matrix, torch.linalg.inv(A + pi * damping**0.5 * eye_a))
    torch.testing.assert_close(curvature.g_factor.inverse.matrix, torch.linalg.inv(G + damping**0.5 / pi * eye_g))


def test_loss_average_none_uses_the_sum_reduced_gradients_as_per_sample():
    x, y = classification_batch(10, (6,), 3)
    mean_model = mlp()
    sum_model = mlp()
    sum_model.load_state_dict(mean_model.state_dict())
    mean_pre = sr.Preconditioner(mean_model, sr.Policy(sr.KFAC()))
    sum_pre = sr.Preconditioner(sum_model, sr.Policy(sr.KFAC(loss_average=None)))
    nn.functional.cross_entropy(mean_model(x), y).backward()
    nn.functional.cross_entropy(sum_model(x), y, reduction="sum").backward()
    mean_pre.step()
    sum_pre.step()
    for name in mean_pre.layers:
        torch.testing.assert_close(
            sum_pre.layers[name].curvature.g_factor.value, mean_pre.layers[name].curvature.g_factor.value
        )


def test_non_finite_statistics_never_enter_the_running_average():
    model = mlp()
    pre = sr.Preconditioner(model, sr.Policy(sr.KFAC(inverse_every=1)))
    _step(model, pre, classification_batch(10, (6,), 3))
    before = {n: m.curvature.state_dict()["A"].clone() for n, m in pre.layers.items()}
    x, y = classification_batch(10, (6,), 3)
    x[0, 0] = float("inf")
    _step(model, pre, (x, y))
    for name, m in pre.layers.items():
        state = m.curvature.state_dict()
        assert torch.isfinite(state["A"]).all() and torch.isfinite(state["G"]).all()
    assert torch.equal(pre.layers["0"].curvature.state_dict()["A"], before["0"])


def test_first_batch_non_finite_leaves_the_factor_uninitialised():
    model = mlp()
    pre = sr.Preconditioner(model, sr.Policy(sr.KFAC(ema=0.5, inverse_every=1)))
    x, y = classification_batch(10, (6,), 3)
    x[0, 0] = float("nan")
    _step(model, pre, (x, y))
    good = classification_batch(10, (6,), 3)
    _step(model, pre, good)
    # the first finite batch replaces the zero initial value exactly
    reference = sr.Preconditioner(twin := mlp(), sr.Policy(sr.KFAC(ema=0.5)))
    twin.load_state_dict(model.state_dict())
    _step(twin, reference, good)
    torch.testing.assert_close(pre.layers["0"].curvature.a_factor.value, reference.layers["0"].curvature.a_factor.value)


def _psd(d: int, rank: int, dtype=torch.float32) -> torch.Tensor:
    basis = torch.randn(d, rank, dtype=dtype)
    return basis @ basis.T


def test_robust_eigh_retries_in_float64(monkeypatch):
    matrix = _psd(6, 6)
    original = torch.linalg.eigh
    calls = []

    def fails_in_float32(m):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("forced failure")
        return original(m)

    monkeypatch.setattr(torch.linalg, "eigh", fails_in_float32)
    eigenvalues, eigenvectors = robust_eigh(matrix)
    assert calls == [torch.float32, torch.float64]
    assert eigenvalues.dtype == torch.float32
    torch.testing.assert_close(eigenvectors @ torch.diag(eigenvalues) @ eigenvectors.T, matrix, rtol=1e-4, atol=1e-4)


def test_robust_cholesky_adds_jitter_to_a_singular_matrix():
    matrix = _psd(5, 2, torch.float64)  # rank 2: Cholesky fails without jitter
    assert torch.linalg.cholesky_ex(matrix)[1] != 0
    factor = robust_cholesky(matrix)
    assert factor is not None and torch.isfinite(factor).all()
    torch.testing.assert_close(factor @ factor.T, matrix, rtol=0, atol=1e-5 * matrix.diagonal().abs().mean().item())


def test_robust_decompositions_refuse_non_finite_input():
    matrix = _psd(4, 4)
    matrix[1, 2] = float("nan")
    assert robust_eigh(matrix) is None and robust_cholesky(matrix) is None


def test_failed_decompositions_keep_the_previous_warn_once_then_raise(monkeypatch):
    model = mlp()
    pre = sr.Preconditioner(model, sr.Policy(sr.KFAC(inverse_every=1)), max_decomposition_failures=3)
    _step(model, pre, classification_batch(10, (6,), 3))
    kept = pre.layers["0"].curvature.a_factor.inverse.matrix.clone()

    def always_fails(m):
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(torch.linalg, "eigh", always_fails)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            _step(model, pre, classification_batch(10, (6,), 3))
    per_layer = [w for w in caught if "curvature decomposition failed" in str(w.message)]
    assert len(per_layer) == len(pre.layers)  # once per layer, not once per step
    assert torch.equal(pre.layers["0"].curvature.a_factor.inverse.matrix, kept)
    with pytest.raises(sr.DecompositionError, match="layer '0'.*3 times in a row"):
        _step(model, pre, classification_batch(10, (6,), 3))
