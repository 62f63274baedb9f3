"""Half-precision training (DESIGN §4): bf16 parameters, bf16/fp16 autocast, fp16 + GradScaler,
dtype-preserving checkpoints. Inverse methods keep fp32 state whatever the activation dtype;
SINGD keeps its state in the dtype it is given (the parameters' dtype by default)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import warnings

import pytest
import torch
from torch import nn

import singd_rkfac as sr
from conftest import backward_and_step
from singd_rkfac.curvature import KFACCurvature, SINGDCurvature
from singd_rkfac.curvature.brand import BrandFactor
from singd_rkfac.curvature.factors import SketchedFactor
from singd_rkfac.data import load_digits

from ._common import assert_same_state, curvature_tensors, flat_state, params_of, wide_mlp

#: Damping for the K-FAC family on these small nets (the default 1e-3 is too small for the CNN).
DAMPING = 0.1


@functools.lru_cache(maxsize=None)
def _digits(dtype: torch.dtype, images: bool):
    return load_digits(dtype=dtype, images=images)


def small_mlp() -> nn.Sequential:
    """Digits MLP 64 → 32 → 10."""
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def small_cnn() -> nn.Sequential:
    """Digits CNN: two 3×3 convs (4, 8 channels), 2×2 max-pool, linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )


MODELS = {"mlp": (small_mlp, False), "cnn": (small_cnn, True)}


def _full_loss(model: nn.Module, data) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(data.x_train).float(), data.y_train))


def _train(model, opt, data, *, steps, batch=16, autocast=None, device_type="cpu", scaler=None, after_step=None):
    """Minibatch training; returns the per-step losses (as floats)."""
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        index = torch.randint(0, data.x_train.shape[0], (batch,), generator=generator).to(data.x_train.device)
        opt.zero_grad()
        with torch.autocast(device_type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            output = model(data.x_train[index])
            if autocast is not None:
                assert output.dtype == autocast  # autocast really ran the layers in half precision
            loss = nn.functional.cross_entropy(output, data.y_train[index])
        backward_and_step(loss, opt, scaler)
        losses.append(float(loss.detach()))
        if after_step is not None:
            after_step(step)
    return losses


def _assert_finite_state(opt: sr.Optimizer) -> None:
    for key, value in curvature_tensors(opt.preconditioner).items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key


def _floating_state_dtypes(opt: sr.Optimizer, kind: type) -> set[torch.dtype]:
    return {
        value.dtype
        for name, m in opt.preconditioner.layers.items()
        if isinstance(m.curvature, kind)
        for value in m.curvature.state_dict().values()
        if isinstance(value, torch.Tensor) and value.is_floating_point()
    }


# -- bf16 parameters ------------------------------------------------------------------------------------------
BF16_PARAM_METHODS = {
    "kfac": sr.KFAC(inverse_every=5, damping=DAMPING),
    "bkfac": sr.BKFAC(rank=8, damping=DAMPING),
    "singd": sr.SINGD(update_every=2, lr_cov=0.05),
    "singd-diagonal": sr.SINGD(structure="diagonal", update_every=2, lr_cov=0.05),
    "singd-block": sr.SINGD(structure="block", block_size=4, update_every=2, lr_cov=0.05),
}


@pytest.mark.parametrize("name", BF16_PARAM_METHODS)
def test_bf16_parameters_train_with_fp32_inverse_state_and_bf16_singd_state(name):
    """``model.to(bfloat16)``: K-FAC / B-KFAC keep fp32 factors and decompositions, SINGD
    (``dtype=None``) keeps bf16 state; parameters and momenta stay bf16; the loss falls."""
    data = _digits(torch.bfloat16, False)
    torch.manual_seed(0)
    model = small_mlp().to(torch.bfloat16)
    opt = sr.Optimizer(model, sr.Policy(BF16_PARAM_METHODS[name]), lr=0.05, momentum=0.9)
    initial = _full_loss(model, data)
    losses = _train(model, opt, data, steps=30)
    final = _full_loss(model, data)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert final < 0.6 * initial, (initial, final)
    _assert_finite_state(opt)
    if name.startswith("singd"):
        assert _floating_state_dtypes(opt, SINGDCurvature) == {torch.bfloat16}
    else:
        assert _floating_state_dtypes(opt, KFACCurvature) == {torch.float32}
    if name == "bkfac":
        assert any(isinstance(f, BrandFactor) for m in opt.preconditioner.layers.values() for f in m.curvature.factors.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(s["momentum_buffer"].dtype == torch.bfloat16 for s in opt.state.values())


# -- bf16 autocast on CPU ----------------------------------------------------------------------------------------
AUTOCAST_METHODS = {
    "kfac": sr.KFAC(inverse_every=5, damping=DAMPING),
    "kfac-exact": sr.KFAC(inverse_every=5, damping=DAMPING, damping_mode="exact"),
    "rkfac": sr.RKFAC(rank=8, inverse_every=5, damping=DAMPING),
    "srekfac": sr.SREKFAC(rank=8, inverse_every=5, damping=DAMPING),
    "nystromkfac": sr.NystromKFAC(rank=8, inverse_every=5, damping=DAMPING),
    "bkfac": sr.BKFAC(rank=8, damping=DAMPING),
    "brkfac": sr.BRKFAC(rank=8, refresh_every=5, damping=DAMPING),
    "bkfacc": sr.BKFACC(rank=8, correct_every=5, damping=DAMPING),
    "singd-dense-bf16": sr.SINGD(update_every=2, lr_cov=0.05, dtype=torch.bfloat16),
    "singd-diagonal-fp32": sr.SINGD(structure="diagonal", update_every=2, lr_cov=0.05),
}


def _for_model(method, model_name: str):
    """Brand on the CNN with K-FAC-reduce (rows = samples), so rank + rows < dim and Brand really runs."""
    if model_name == "cnn" and isinstance(method, sr.BKFAC):
        return dataclasses.replace(method, kfac_approx="reduce")
    return method


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("name", AUTOCAST_METHODS)
def test_bf16_autocast_trains_every_method_family(name, model_name):
    """fp32 parameters under ``torch.autocast("cpu", bfloat16)``: bf16 activations feed the
    statistics, yet K-FAC-family factors and decompositions are fp32; training is finite and
    the loss falls."""
    build, images = MODELS[model_name]
    data = _digits(torch.float32, images)
    torch.manual_seed(0)
    model = build()
    method = _for_model(AUTOCAST_METHODS[name], model_name)
    opt = sr.Optimizer(model, sr.Policy(method), lr=0.05, momentum=0.9)
    initial = _full_loss(model, data)
    losses = _train(model, opt, data, steps=20, autocast=torch.bfloat16)
    final = _full_loss(model, data)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert final < 0.8 * initial, (initial, final)
    _assert_finite_state(opt)
    if isinstance(method, sr.KFAC):
        assert _floating_state_dtypes(opt, KFACCurvature) == {torch.float32}
        factors = [f for m in opt.preconditioner.layers.values() for f in m.curvature.factors.values()]
        expected = {sr.BKFAC: BrandFactor, sr.RKFAC: SketchedFactor, sr.SREKFAC: SketchedFactor, sr.NystromKFAC: SketchedFactor}
        for config, factor_type in expected.items():
            if isinstance(method, config):  # the low-rank representation is really used on some factor
                assert any(isinstance(f, factor_type) for f in factors)
    else:
        assert _floating_state_dtypes(opt, SINGDCurvature) == {method.dtype or torch.float32}


# -- fp16 autocast + GradScaler on CPU --------------------------------------------------------------------------
def _fp16_autocast_supported() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return nn.Linear(2, 2)(torch.randn(1, 2)).dtype == torch.float16
    except (RuntimeError, ValueError):
        return False


needs_cpu_fp16 = pytest.mark.skipif(not _fp16_autocast_supported(), reason="torch.autocast('cpu', float16) is not supported by this torch")

FP16_METHODS = {
    "singd-dense-fp16": sr.SINGD(update_every=1, lr_cov=0.05, dtype=torch.float16),
    "singd-diagonal-fp16": sr.SINGD(structure="diagonal", update_every=1, lr_cov=0.05, dtype=torch.float16),
    "kfac": sr.KFAC(inverse_every=5, damping=DAMPING),
}


@needs_cpu_fp16
@pytest.mark.parametrize("name", FP16_METHODS)
def test_fp16_autocast_with_grad_scaler_skips_nothing_on_a_benign_problem(name):
    data = _digits(torch.float32, False)
    torch.manual_seed(0)
    model = small_mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = sr.Optimizer(model, sr.Policy(FP16_METHODS[name]), lr=0.05, momentum=0.9)
    initial = _full_loss(model, data)
    losses = _train(model, opt, data, steps=20, autocast=torch.float16, scaler=scaler)
    assert opt.preconditioner.skipped_steps == 0
    assert scaler.get_scale() == 2.0**8  # never backed off
    assert all(torch.isfinite(torch.tensor(losses)))
    _assert_finite_state(opt)
    assert _full_loss(model, data) < 0.8 * initial
    if name.startswith("singd"):
        assert _floating_state_dtypes(opt, SINGDCurvature) == {torch.float16}
    else:
        assert _floating_state_dtypes(opt, KFACCurvature) == {torch.float32}


@needs_cpu_fp16
@pytest.mark.parametrize("name", FP16_METHODS)
def test_fp16_huge_initial_scale_skips_overflowing_steps_and_recovers(name):
    """``init_scale=2**40`` overflows fp16 activation gradients: the first steps are skipped
    (``skipped_steps``), the curvature is untouched while they are (SINGD still at K = C = I,
    K-FAC without a decomposition), every state tensor stays finite, and training recovers."""
    data = _digits(torch.float32, False)
    torch.manual_seed(0)
    model = small_mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=0.125)
    method = FP16_METHODS[name]
    opt = sr.Optimizer(model, sr.Policy(method), lr=0.05, momentum=0.9)
    pre = opt.preconditioner
    initial = _full_loss(model, data)
    fresh = {key: value.clone() for key, value in curvature_tensors(pre).items()}
    skipped_at = []

    def check(step):
        if pre.skipped_steps > len(skipped_at):
            skipped_at.append(step)
        _assert_finite_state(opt)
        if pre.steps == 0:  # nothing has been applied yet: the state is the fresh one
            got = curvature_tensors(pre)
            assert got.keys() == fresh.keys() and all(torch.equal(got[k], v) for k, v in fresh.items())
            if isinstance(method, sr.KFAC):
                assert not any(m.curvature.ready for m in pre.layers.values())

    steps = 30
    _train(model, opt, data, steps=steps, autocast=torch.float16, scaler=scaler, after_step=check)
    assert skipped_at and skipped_at[0] == 0, skipped_at
    assert skipped_at == list(range(len(skipped_at)))  # the overflowing steps are the first ones
    assert pre.skipped_steps + pre.steps == steps and pre.steps >= 15
    assert scaler.get_scale() < 2.0**20
    assert _full_loss(model, data) < 0.8 * initial


# -- checkpoints keep dtypes -------------------------------------------------------------------------------------
CHECKPOINT_CASES = {
    "kfac-exact-bf16-params": (sr.KFAC(damping_mode="exact", inverse_every=2), torch.bfloat16, torch.float32),
    "kfac-cholesky-bf16-params": (sr.KFAC(inverse="cholesky", inverse_every=2), torch.bfloat16, torch.float32),
    "srekfac-bf16-params": (sr.SREKFAC(rank=3, oversample=2, inverse_every=2), torch.bfloat16, torch.float32),
    "bkfac-bf16-params": (sr.BKFAC(rank=4), torch.bfloat16, torch.float32),
    "brkfac-bf16-params": (sr.BRKFAC(rank=4, refresh_every=2), torch.bfloat16, torch.float32),
    "singd-bf16-params": (sr.SINGD(update_every=1, lr_cov=0.05), torch.bfloat16, torch.bfloat16),
    "singd-fp16-state": (sr.SINGD(structure="block", block_size=4, update_every=1, dtype=torch.float16), torch.float32, torch.float16),
}


def _steps(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()


@pytest.mark.parametrize("name", CHECKPOINT_CASES)
def test_load_state_dict_keeps_every_dtype_and_resumes_exactly(name):
    """Save after 3 steps, ``torch.load(weights_only=True)`` into a fresh model and optimizer:
    every state tensor has the saved dtype and value (fp32 factors and low-rank eigenpairs next
    to bf16 parameters; bf16/fp16 SINGD state), and both runs continue bit for bit."""
    method, param_dtype, state_dtype = CHECKPOINT_CASES[name]
    torch.manual_seed(0)
    model = wide_mlp(param_dtype)
    initial = copy.deepcopy(model.state_dict())
    batches = [(torch.randn(6, 24, dtype=param_dtype), torch.randint(0, 3, (6,))) for _ in range(5)]
    options = {"lr": 0.05, "momentum": 0.9}
    opt = sr.Optimizer(model, sr.Policy(method), **options)
    _steps(model, opt, batches[:3])
    assert _floating_state_dtypes(opt, (KFACCurvature, SINGDCurvature)) == {state_dtype}
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    fresh = wide_mlp(param_dtype)
    fresh.load_state_dict(initial)  # loading the checkpoint must overwrite these
    fresh.load_state_dict(checkpoint["model"])
    fresh_opt = sr.Optimizer(fresh, sr.Policy(method), **options)
    fresh_opt.load_state_dict(checkpoint["optimizer"])
    assert_same_state(flat_state(fresh_opt.state_dict()), flat_state(opt.state_dict()))
    assert all(s["momentum_buffer"].dtype == param_dtype for s in fresh_opt.state.values())
    if isinstance(method, sr.BKFAC):  # the Brand eigenpairs (not only the dense fallbacks) round-trip
        assert any(isinstance(f, BrandFactor) for m in fresh_opt.preconditioner.layers.values() for f in m.curvature.factors.values())
    _steps(model, opt, batches[3:])
    _steps(fresh, fresh_opt, batches[3:])
    for got, want in zip(params_of(fresh), params_of(model)):
        assert got.dtype == param_dtype and torch.equal(got, want)


# -- GPU -------------------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", ["kfac", "srekfac", "bkfac", "singd-dense-bf16", "singd-diagonal-fp32"])
def test_cuda_bf16_autocast_trains(name):
    data = load_digits(device="cuda")
    torch.manual_seed(0)
    model = small_mlp().cuda()
    method = AUTOCAST_METHODS[name]
    opt = sr.Optimizer(model, sr.Policy(method), lr=0.05, momentum=0.9)
    initial = _full_loss(model, data)
    losses = _train(model, opt, data, steps=20, autocast=torch.bfloat16, device_type="cuda")
    assert all(torch.isfinite(torch.tensor(losses)))
    _assert_finite_state(opt)
    assert _full_loss(model, data) < 0.8 * initial
    if isinstance(method, sr.KFAC):
        assert _floating_state_dtypes(opt, KFACCurvature) == {torch.float32}
    assert all(v.device.type == "cuda" for v in curvature_tensors(opt.preconditioner).values() if v.is_floating_point())


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", FP16_METHODS)
def test_cuda_fp16_autocast_with_grad_scaler(name):
    data = load_digits(device="cuda")
    torch.manual_seed(0)
    model = small_mlp().cuda()
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40, backoff_factor=0.125)
    opt = sr.Optimizer(model, sr.Policy(FP16_METHODS[name]), lr=0.05, momentum=0.9)
    initial = _full_loss(model, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # skipped steps under a scaler do not warn
        _train(model, opt, data, steps=30, autocast=torch.float16, device_type="cuda", scaler=scaler)
    assert opt.preconditioner.skipped_steps >= 1
    _assert_finite_state(opt)
    assert _full_loss(model, data) < 0.8 * initial


# -- fp16 SINGD: the preconditioned gradient itself can overflow -------------------------------------------------
def _ikfac_digits(dtype: torch.dtype, steps: int = 260):
    """IKFAC (kfac_like, lr_cov 0.05, default damping) on the digits MLP, fp32 parameters, state in ``dtype``.

    Yields after every step: ``(step, curvature state finite, gradients finite, parameters finite)``.
    """
    data = _digits(torch.float32, False)
    torch.manual_seed(0)
    model = small_mlp()
    method = sr.SINGD(update_every=1, kfac_like=True, lr_cov=0.05, dtype=dtype)
    opt = sr.Optimizer(model, sr.Policy(method), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        index = torch.randint(0, data.x_train.shape[0], (32,), generator=generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index]).backward()
        state_finite = all(torch.isfinite(t).all() for t in curvature_tensors(opt.preconditioner).values() if t.is_floating_point())
        grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        yield step, state_finite, grads_finite, all(torch.isfinite(p).all() for p in model.parameters())
    yield -1, _full_loss(model, data), None, None


def test_ikfac_with_fp32_state_stays_finite_control():
    """Control for the fp16 case below: the same run with fp32 state stays finite and trains."""
    *steps, (_, final, _, _) = list(_ikfac_digits(torch.float32))
    assert all(state and grads and params for _, state, grads, params in steps)
    assert final < 0.6 * 2.3


def test_ikfac_with_fp16_state_keeps_parameters_finite():
    """fp16 state, everything else as in the control: the parameters must stay finite while the
    curvature state and the incoming gradients are finite (skip or compute the direction wider)."""
    for step, state_finite, grads_finite, params_finite in _ikfac_digits(torch.float16):
        if step < 0:
            break
        assert state_finite and grads_finite
        assert params_finite, f"non-finite parameters after step {step} from finite state and gradients"
