"""The AMP contract (DESIGN §4): loss-scaled training is bit-identical to unscaled training.

Oracles: the same float64 run without a scaler (loss scales are powers of two,
so unscaling gradients and dividing G-side statistics by ``s²`` is exact),
snapshots taken before a step that must change nothing, and a count of host
synchronisations.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import singd_rkfac as sr
from singd_rkfac.curvature.brand import BrandFactor
from singd_rkfac.curvature.factors import SketchedFactor
from conftest import classification_batch, mlp

from ._common import (
    GradPoison,
    HostSyncCounter,
    assert_params_equal,
    assert_same_state,
    deep_mlp,
    flat_state,
    params_of,
    single_layer,
    snapshot,
    wide_mlp,
)

INIT_SCALE = 2.0**10
STEPS = 6
OPTIONS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}

#: (method, model builder); wide models where a low-rank representation needs rank + rows < dim.
METHODS = {
    "kfac-pi": (sr.KFAC(inverse_every=1), mlp),
    "kfac-exact": (sr.KFAC(inverse_every=1, damping_mode="exact"), mlp),
    "singd-dense": (sr.SINGD(structure="dense", update_every=1, kfac_like=False, lr_cov=0.05), mlp),
    "singd-dense-ikfac": (sr.SINGD(structure="dense", update_every=1, kfac_like=True, lr_cov=0.05), mlp),
    "singd-diagonal": (sr.SINGD(structure="diagonal", update_every=1, kfac_like=False, lr_cov=0.05), mlp),
    "singd-diagonal-ikfac": (sr.SINGD(structure="diagonal", update_every=1, kfac_like=True, lr_cov=0.05), mlp),
    "kfac-periodic": (sr.KFAC(stats_every=2, inverse_every=3, ema=0.9), mlp),
    "bkfac": (sr.BKFAC(rank=4), wide_mlp),
    "brkfac": (sr.BRKFAC(rank=4, refresh_every=2), wide_mlp),
    "srekfac": (sr.SREKFAC(rank=3, oversample=2, inverse_every=1), wide_mlp),
    "seng": (sr.SENG(update_every=2), mlp),
    "seng-sketch": (sr.SENG(sketch_size=3), mlp),
    "kfac+two-level-residual": (sr.KFAC(inverse_every=1), mlp),
    # a Skip layer: its parameters go to the AdamW fallback, which must see unscaled gradients too
    "kfac+adamw-fallback": (sr.Policy(sr.KFAC(inverse_every=1), rules=[("4", sr.Skip())]), mlp),
}
FALLBACK = {"kfac+adamw-fallback": "adamw"}
#: Optimizer options beyond `OPTIONS` for some entries.
EXTRA = {"kfac+two-level-residual": {"two_level": sr.TwoLevel(coarse="residual", update_every=2)}}


def _scaler(**overrides) -> torch.amp.GradScaler:
    options = {"init_scale": INIT_SCALE, "growth_factor": 2.0, "growth_interval": 1, **overrides}
    return torch.amp.GradScaler("cpu", **options)


def _batches(model: nn.Module, count: int, n: int = 6):
    width = next(model.parameters()).shape[1]
    return [classification_batch(n, (width,), 3) for _ in range(count)]


def _train_step(model, opt, batch, *, scaler=None, path="step", clip=False) -> None:
    """One iteration; ``path`` is ``"step"`` (``scaler.step(opt)``) or ``"unscale"`` (unscale_, clip, step)."""
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
    if scaler is None:
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), 1e30)
        opt.step()
        return
    scaler.scale(loss).backward()
    if path == "unscale":
        scaler.unscale_(opt)
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), 1e30)
    scaler.step(opt)
    scaler.update()


def _run(method, initial, batches, *, scaler=None, path="step", pass_scaler=True, clip=False, fallback="sgd", extra=None):
    """Train a copy of ``initial``; parameters after every step, the optimizer and the scales used."""
    model = copy.deepcopy(initial)
    policy = method if isinstance(method, sr.Policy) else sr.Policy(method)
    options = {**OPTIONS, **(extra or {})}
    opt = sr.Optimizer(model, policy, grad_scaler=scaler if pass_scaler else None, fallback=fallback, **options)
    trajectory, scales = [], []
    for batch in batches:
        if scaler is not None:
            scales.append(scaler.get_scale())
        _train_step(model, opt, batch, scaler=scaler, path=path, clip=clip)
        trajectory.append(params_of(model))
    return model, opt, trajectory, scales


def _user_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


# -- bit-identical trajectories -------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["step", "unscale"])
@pytest.mark.parametrize("name", METHODS)
def test_scaled_training_is_bit_identical_to_unscaled(name, path):
    """A scale that doubles every step changes nothing: every step's parameters and the final
    curvature state equal the run without a scaler bit for bit (``path="unscale"``: the
    clipping path ``scaler.unscale_(opt)``, ``clip_grad_norm_``, ``scaler.step(opt)`` with
    ``grad_scaler=scaler``)."""
    method, build = METHODS[name]
    initial = build()
    batches = _batches(initial, STEPS)
    clip = path == "unscale"
    fallback, extra = FALLBACK.get(name, "sgd"), EXTRA.get(name)
    _, ref_opt, reference, _ = _run(method, initial, batches, clip=clip, fallback=fallback, extra=extra)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, opt, trajectory, scales = _run(
            method, initial, batches, scaler=_scaler(), path=path, clip=clip, fallback=fallback, extra=extra
        )
    assert scales == [INIT_SCALE * 2.0**k for k in range(STEPS)]  # a different scale every step
    assert _user_warnings(caught) == []
    for step, (got, want) in enumerate(zip(trajectory, reference)):
        assert_params_equal(got, want, f"after step {step}")
    assert_same_state(flat_state(opt.state_dict()), flat_state(ref_opt.state_dict()))
    assert opt.preconditioner.skipped_steps == 0 and opt.preconditioner.steps == STEPS
    if fallback == "adamw":
        assert any(g["rule"] == "adamw" for g in opt.param_groups) and opt.state_dict()["state"]
    if name in ("bkfac", "brkfac"):  # the Brand path really ran (not its exact fallback)
        assert any(isinstance(f, BrandFactor) for m in opt.preconditioner.layers.values() for f in m.curvature.factors.values())
    if name == "srekfac":
        assert any(isinstance(f, SketchedFactor) for m in opt.preconditioner.layers.values() for f in m.curvature.factors.values())


@pytest.mark.parametrize("name", ["kfac-pi", "singd-dense"])
def test_unscale_path_without_grad_scaler_differs_and_warns_once(name):
    """Control: after ``scaler.unscale_(opt)`` the scaler hands over no scale; without
    ``grad_scaler=`` the statistics stay scaled by ``s²`` — the trajectory differs and one
    ``UserWarning`` (not one per step) names ``grad_scaler``."""
    method, build = METHODS[name]
    initial = build()
    batches = _batches(initial, STEPS)
    _, ref_opt, reference, _ = _run(method, initial, batches, clip=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, opt, trajectory, _ = _run(method, initial, batches, scaler=_scaler(), path="unscale", pass_scaler=False, clip=True)
    messages = _user_warnings(caught)
    assert len(messages) == 1 and "grad_scaler" in messages[0], messages
    assert any(not torch.equal(a, b) for a, b in zip(trajectory[-1], reference[-1]))


def test_unscale_path_without_grad_scaler_leaves_g_statistics_scaled_by_s_squared():
    """What the control measures, exactly: K-FAC's first G factor is ``s²·G`` (A untouched)."""
    initial = mlp()
    batch = _batches(initial, 1)
    _, ref_opt, _, _ = _run(sr.KFAC(inverse_every=1), initial, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, opt, _, _ = _run(sr.KFAC(inverse_every=1), initial, batch, scaler=_scaler(), path="unscale", pass_scaler=False)
    for name, m in opt.preconditioner.layers.items():
        ref = ref_opt.preconditioner.layers[name].curvature
        assert torch.equal(m.curvature.a_factor.value, ref.a_factor.value)
        assert torch.equal(m.curvature.g_factor.value, INIT_SCALE**2 * ref.g_factor.value)


# -- found_inf -----------------------------------------------------------------------------------------------
FOUND_INF_METHODS = ["kfac-pi", "kfac-periodic", "singd-dense", "bkfac", "srekfac"]


@pytest.mark.parametrize("path", ["step", "unscale"])
@pytest.mark.parametrize("injection", ["input", "grad"])
@pytest.mark.parametrize("name", FOUND_INF_METHODS)
def test_found_inf_changes_nothing_and_the_next_step_is_normal(name, injection, path):
    """An overflowing batch under the scaler: parameters, momentum buffers, every curvature
    tensor (factors, decompositions, SINGD K/C and momenta, sketch RNG) are unchanged, the scale
    backs off, nothing warns, and the run continues exactly like one that never saw the batch.

    ``injection="input"`` makes the statistics non-finite too; ``"grad"`` poisons only one
    gradient, so finite statistics must be dropped as well.
    """
    method, build = METHODS[name]
    initial = build()
    good = _batches(initial, 4)
    x_bad, y_bad = _batches(initial, 1)[0]
    if injection == "input":
        x_bad = x_bad.clone()
        x_bad[0, 0] = float("inf")
    _, ref_opt, reference, _ = _run(method, initial, good)

    model = copy.deepcopy(initial)
    scaler = _scaler()
    opt = sr.Optimizer(model, sr.Policy(method), grad_scaler=scaler, **OPTIONS)
    poison = GradPoison(model[2].weight, float("inf"))
    trajectory = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in good[:2]:
            _train_step(model, opt, batch, scaler=scaler, path=path)
            trajectory.append(params_of(model))
        before, scale_before = snapshot(model, opt), scaler.get_scale()
        poison.armed = injection == "grad"
        _train_step(model, opt, (x_bad, y_bad), scaler=scaler, path=path)
        poison.armed = False
        assert_same_state(snapshot(model, opt), before, what="after the overflowing step")
        assert scaler.get_scale() == scale_before * 0.5
        assert opt.preconditioner.skipped_steps == 1
        for batch in good[2:]:
            _train_step(model, opt, batch, scaler=scaler, path=path)
            trajectory.append(params_of(model))
    assert _user_warnings(caught) == []
    for step, (got, want) in enumerate(zip(trajectory, reference)):
        assert_params_equal(got, want, f"after good step {step}")
    assert_same_state(flat_state(opt.state_dict()), flat_state(ref_opt.state_dict()))


@pytest.mark.parametrize("name", ["kfac-pi", "singd-dense"])
def test_nan_without_scaler_skips_with_one_warning_per_occurrence(name):
    """No scaler, 3-layer model, two bad steps (a NaN input, then one NaN gradient entry):
    exactly two ``UserWarning``s (one per occurrence, not per layer), nothing changes on those
    steps, and the good steps equal a run that never saw the bad batches."""
    method, build = METHODS[name]
    initial = build()
    assert sum(isinstance(m, nn.Linear) for m in initial.modules()) == 3
    good = _batches(initial, 3)
    _, ref_opt, reference, _ = _run(method, initial, good)

    model = copy.deepcopy(initial)
    opt = sr.Optimizer(model, sr.Policy(method), **OPTIONS)
    poison = GradPoison(model[2].weight, float("nan"))
    x_nan, y_nan = _batches(initial, 1)[0]
    x_nan = x_nan.clone()
    x_nan[1, 2] = float("nan")
    trajectory = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train_step(model, opt, good[0])
        trajectory.append(params_of(model))
        for bad, arm in (((x_nan, y_nan), False), (good[1], True)):
            before = snapshot(model, opt)
            poison.armed = arm
            _train_step(model, opt, bad)
            poison.armed = False
            assert_same_state(snapshot(model, opt), before, what="after a NaN step")
        for batch in good[1:]:
            _train_step(model, opt, batch)
            trajectory.append(params_of(model))
    messages = _user_warnings(caught)
    assert len(messages) == 2, messages
    assert all("non-finite gradient" in text for text in messages)
    assert opt.preconditioner.skipped_steps == 2
    for step, (got, want) in enumerate(zip(trajectory, reference)):
        assert_params_equal(got, want, f"after good step {step}")
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- standalone Preconditioner + torch.optim ------------------------------------------------------------------
def _standalone_run(method, initial, batches, *, scaler=None, path="step"):
    model = copy.deepcopy(initial)
    pre = sr.Preconditioner(model, sr.Policy(method), grad_scaler=scaler)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trajectory = []
    for x, y in batches:
        sgd.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            assert pre.step()
            sgd.step()
        else:
            scaler.scale(loss).backward()
            if path == "unscale":
                scaler.unscale_(sgd)
            assert pre.step()
            scaler.step(sgd)
            scaler.update()
        trajectory.append(params_of(model))
    return pre, sgd, trajectory


@pytest.mark.parametrize("path", ["step", "unscale"])
@pytest.mark.parametrize("name", ["kfac-pi", "kfac-exact", "singd-dense"])
def test_standalone_preconditioner_with_sgd_under_scaler_is_bit_identical(name, path):
    """``sr.Preconditioner(model, policy, grad_scaler=scaler)`` + ``torch.optim.SGD``: the
    preconditioner may see scaled gradients (``path="step"``) or unscaled ones
    (``scaler.unscale_(sgd)`` first); either way parameters and curvature equal the unscaled run."""
    method, build = METHODS[name]
    initial = build()
    batches = _batches(initial, STEPS)
    ref_pre, _, reference = _standalone_run(method, initial, batches)
    pre, _, trajectory = _standalone_run(method, initial, batches, scaler=_scaler(), path=path)
    for step, (got, want) in enumerate(zip(trajectory, reference)):
        assert_params_equal(got, want, f"after step {step}")
    assert_same_state(flat_state(pre.state_dict()), flat_state(ref_pre.state_dict()))


def test_standalone_preconditioner_found_inf_is_left_to_the_scaler():
    """An overflowing batch: ``step()`` returns False without a warning (the scaler reports it),
    the curvature is unchanged and ``scaler.step(sgd)`` skips the update."""
    model = mlp()
    scaler = _scaler()
    pre = sr.Preconditioner(model, sr.Policy(sr.KFAC(inverse_every=1)), grad_scaler=scaler)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    good, (x, y) = _batches(model, 2)
    x = x.clone()
    x[0, 0] = float("inf")
    for batch, expect in ((good, True), ((x, y), False)):
        before = flat_state(pre.state_dict())
        params = params_of(model)
        sgd.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(batch[0]), batch[1])).backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert pre.step() is expect
        scaler.step(sgd)
        scaler.update()
        assert _user_warnings(caught) == []
    assert_same_state(flat_state(pre.state_dict()), before)
    assert_params_equal(params_of(model), params)
    assert pre.skipped_steps == 1 and pre.steps == 1


# -- host synchronisations --------------------------------------------------------------------------------------
SYNC_METHODS = {
    "kfac": sr.KFAC(inverse_every=1000),
    "kfac-exact": sr.KFAC(inverse_every=1000, damping_mode="exact"),
    "srekfac": sr.SREKFAC(rank=2, inverse_every=1000),
    "singd-dense-T2": sr.SINGD(structure="dense", update_every=2),
    "singd-diagonal-T1": sr.SINGD(structure="diagonal", update_every=1, kfac_like=True),
    "singd-block-bf16": sr.SINGD(structure="block", block_size=3, update_every=1, dtype=torch.bfloat16),
    "seng": sr.SENG(update_every=1000),
    "seng-sketch": sr.SENG(update_every=1000, sketch_size=2),
}


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaler"])
@pytest.mark.parametrize("depth", [1, 4])
@pytest.mark.parametrize("name", SYNC_METHODS)
def test_exactly_one_host_sync_per_step_whatever_the_depth(name, depth, scaled):
    """No per-layer host synchronisation on the hot path (DESIGN §4).

    Verified by counting ``aten._local_scalar_dense`` calls with a ``TorchDispatchMode``
    while the optimizer steps: on CPU that op is what ``.item()``, ``bool(tensor)`` and
    ``float(tensor)`` run, i.e. every device→host read (on CUDA, a synchronisation). A step
    without decompositions — K-FAC after its first decomposition (``inverse_every`` large),
    SINGD on update and non-update steps — must read exactly once (the fused inf/NaN flag),
    for a 1-layer and a 4-layer model alike. With ``scaler``, the whole ``scaler.step(opt)``
    is counted.
    """
    model = single_layer() if depth == 1 else deep_mlp()
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == depth
    method = SYNC_METHODS[name]
    scaler = _scaler() if scaled else None
    opt = sr.Optimizer(model, sr.Policy(method), grad_scaler=scaler, **OPTIONS)
    counts = []
    for x, y in _batches(model, 5, n=8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaled else loss).backward()
        with HostSyncCounter() as counter:
            if scaled:
                scaler.step(opt)
            else:
                opt.step()
        if scaled:
            scaler.update()
        counts.append(counter.count)
    measured = counts[1:] if name.startswith(("kfac", "srekfac", "seng")) else counts  # step 0 decomposes
    assert measured == [1] * len(measured), counts
    assert opt.preconditioner.steps == 5


# -- large loss scales -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exponent", [40, 70])
@pytest.mark.parametrize("name", ["kfac-pi", "singd-dense"])
def test_fp32_statistics_are_unscaled_exactly_at_large_loss_scales(name, exponent):
    """fp32 model under ``init_scale=2**exponent`` with ``grad_scaler=``: the gradients are finite, the
    steps are taken, and parameters and curvature equal the unscaled run bit for bit (powers of two).
    At 2**70, ``s²·Σgᵀg`` would overflow fp32: the capture unscales the output gradients first."""
    method, _ = METHODS[name]
    initial = mlp(torch.float32)
    batches = [classification_batch(6, (6,), 3, dtype=torch.float32) for _ in range(2)]
    _, ref_opt, reference, _ = _run(method, initial, batches)
    scaler = _scaler(init_scale=2.0**exponent, growth_interval=10**9)
    _, opt, trajectory, _ = _run(method, initial, batches, scaler=scaler)
    assert opt.preconditioner.skipped_steps == 0 and scaler.get_scale() == 2.0**exponent
    for name_, m in opt.preconditioner.layers.items():
        got = flat_state(m.curvature.state_dict())
        want = flat_state(ref_opt.preconditioner.layers[name_].curvature.state_dict())
        assert_same_state(got, want, what=f"layer {name_}")
    for step, (got, want) in enumerate(zip(trajectory, reference)):
        assert_params_equal(got, want, f"after step {step}")


@pytest.mark.parametrize("name", ["kfac-pi", "singd-dense"])
def test_a_growing_scale_never_overflows_fp32_statistics_without_grad_scaler(name):
    """No ``grad_scaler=``: the scale doubles every step from 2**60 to 2**71. The capture divides the
    output gradients by the previous step's scale, so ``s²·Σgᵀg`` (up to 2**142 — past fp32's range)
    never forms, and every step equals the unscaled run bit for bit."""
    method, _ = METHODS[name]
    initial = mlp(torch.float32)
    batches = [classification_batch(6, (6,), 3, dtype=torch.float32) for _ in range(12)]
    _, ref_opt, reference, _ = _run(method, initial, batches)
    scaler = _scaler(init_scale=2.0**60)
    _, opt, trajectory, scales = _run(method, initial, batches, scaler=scaler, pass_scaler=False)
    assert scales[-1] == 2.0**71 and opt.preconditioner.skipped_steps == 0
    for step, (got, want) in enumerate(zip(trajectory, reference)):
        assert_params_equal(got, want, f"after step {step}")
