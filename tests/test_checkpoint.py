"""Save / load with ``weights_only=True`` resumes bit-for-bit (float64, CPU)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import singd_rkfac as sr
from conftest import classification_batch, cnn


def _batches(count: int):
    return [classification_batch(6, (2, 8, 8), 4) for _ in range(count)]


def _run(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


METHODS = {
    "pi-eigh": sr.KFAC(stats_every=2, inverse_every=3, ema=0.9),
    "exact": sr.KFAC(damping_mode="exact", inverse_every=2),
    "cholesky-reduce": sr.KFAC(inverse="cholesky", kfac_approx="reduce", inverse_every=4),
    "singd-block-T2": sr.SINGD(structure="block", block_size=4, update_every=2),
    "ikfac-hierarchical": sr.SINGD(structure="hierarchical", k1=2, k2=3, kfac_like=True, update_every=1),
}


@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
@pytest.mark.parametrize("fallback", ["sgd", "adamw"])
def test_resume_is_bit_for_bit(method, fallback):
    batches = _batches(9)
    policy = sr.Policy(method, rules=[("3", sr.Skip())])
    options = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, "fallback": fallback}

    model = cnn(padding=1)
    initial = copy.deepcopy(model.state_dict())
    opt = sr.Optimizer(model, policy, **options)
    _run(model, opt, batches)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model = cnn(padding=1)
    model.load_state_dict(initial)
    opt = sr.Optimizer(model, policy, **options)
    _run(model, opt, batches[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    fresh = cnn(padding=1)
    fresh.load_state_dict(checkpoint["model"])
    fresh_opt = sr.Optimizer(fresh, policy, **options)
    fresh_opt.load_state_dict(checkpoint["optimizer"])
    _run(fresh, fresh_opt, batches[5:])
    for got, want in zip(fresh.parameters(), uninterrupted):
        assert torch.equal(got.detach(), want)


def test_factors_keep_their_dtype_across_save_and_load():
    model = nn.Sequential(nn.Linear(4, 3)).to(torch.bfloat16)
    opt = sr.Optimizer(model, lr=0.1)
    x = torch.randn(8, 4, dtype=torch.bfloat16)
    model(x).float().square().mean().backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh_opt = sr.Optimizer(model, lr=0.1)
    fresh_opt.load_state_dict(torch.load(buffer, weights_only=True))
    curvature = fresh_opt.preconditioner.layers["0"].curvature
    assert curvature.a_factor.value.dtype == torch.float32
    assert curvature.a_factor.inverse.matrix.dtype == torch.float32
    torch.testing.assert_close(curvature.a_factor.value, opt.preconditioner.layers["0"].curvature.a_factor.value, rtol=0, atol=0)


def test_singd_state_keeps_bf16_across_save_and_load():
    model = nn.Sequential(nn.Linear(4, 3))
    policy = sr.Policy(sr.SINGD(structure="toeplitz", dtype=torch.bfloat16, update_every=1))
    opt = sr.Optimizer(model, policy, lr=0.1)
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = sr.Optimizer(model, policy, lr=0.1)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    saved, loaded = opt.preconditioner.layers["0"].curvature, fresh.preconditioner.layers["0"].curvature
    for name in ("K", "C", "m_K", "m_C"):
        want, got = getattr(saved, name).coeffs, getattr(loaded, name).coeffs
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_loading_into_a_different_policy_is_a_clear_error():
    model = cnn()
    opt = sr.Optimizer(model, sr.Policy(sr.KFAC()))
    state = opt.state_dict()
    with pytest.raises(ValueError, match="checkpoint was made with kfac"):
        sr.Optimizer(model, sr.Policy(sr.KFAC(damping=0.1))).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        sr.Optimizer(model, sr.Policy(sr.KFAC(), rules=[("3", sr.Skip())])).load_state_dict(state)
