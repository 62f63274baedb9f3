"""Decomposition failures and non-finite updates outside dense K-FAC (DESIGN §5).

`tests/test_kfac_numerics.py` covers `robust_eigh` / `robust_cholesky` in
isolation and the dense K-FAC chain (keep previous, warn once, raise). Here:
the sketched low-rank path (R-KFAC, SRE-KFAC, Nyström through `SketchedFactor`),
a layer whose two sides fail differently, Brand's online update, and SINGD
updates that overflow their half-precision state.
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from torch import nn

import singd_rkfac as sr
import singd_rkfac.curvature.brand as brand_module
import singd_rkfac.curvature.factors as factors_module
from singd_rkfac.curvature import BatchCounts
from singd_rkfac.curvature.brand import BrandFactor
from singd_rkfac.curvature.factors import SketchedFactor
from singd_rkfac.linalg.robust import JITTERS
from conftest import classification_batch, mlp

from ._common import HostSyncCounter, assert_same_state, flat_state, wide_mlp

SKETCHED = [sr.RKFAC, sr.SREKFAC, sr.NystromKFAC]
FAILED = "curvature decomposition failed"


def _batch(n: int = 6, width: int = 24, dtype=torch.float32):
    return classification_batch(n, (width,), 3, dtype=dtype)


def _step(model, pre, batch) -> bool:
    model.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    return pre.step()


def _failure_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and FAILED in str(w.message)]


INVERSE_PARTS = ("inverse", "eigenvalues", "eigenvectors", "complement", "damping")


def _inverse_tensors(pre: sr.Preconditioner) -> dict[str, torch.Tensor]:
    """Every tensor of every factor's inverse representation, cloned, keyed ``layer.side.part``."""
    out = {}
    for name, m in pre.layers.items():
        for side, factor in m.curvature.factors.items():
            for key, value in factor.state("F").items():
                part = key[len("F_"):]
                if part in INVERSE_PARTS:
                    out[f"{name}.{side}.{part}"] = value.clone()
    return out


# -- the sketched path ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method_cls", SKETCHED, ids=lambda c: c.__name__)
def test_sketched_factor_retries_in_fp64_then_with_growing_jitter(monkeypatch, method_cls):
    """fp32 sketch fails, fp64 fails, fp64 + 1e-6·mean|diag|·I fails, fp64 + 1e-4·mean|diag|·I
    succeeds: the committed eigenpairs are exactly that sketch (same generator state) cast to
    fp32, and nothing is reported as a failure."""
    model = wide_mlp(torch.float32)
    method = method_cls(rank=3, oversample=4, inverse_every=1)
    pre = sr.Preconditioner(model, sr.Policy(method), max_decomposition_failures=1)
    factor = pre.layers["0"].curvature.factors["a"]
    assert isinstance(factor, SketchedFactor) and factor.dim == 25
    generator_state = factor.generator.get_state()
    real = factors_module.sketch_eigen
    attempts: list[torch.Tensor] = []

    def flaky(matrix, *args):
        if matrix.shape[0] == factor.dim:
            attempts.append(matrix.clone())
            if len(attempts) <= 3:
                raise torch.linalg.LinAlgError("forced failure")
        return real(matrix, *args)

    monkeypatch.setattr(factors_module, "sketch_eigen", flaky)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a success inside the chain warns about nothing
        assert _step(model, pre, _batch())
    value = factor.value
    assert [a.dtype for a in attempts] == [torch.float32, torch.float64, torch.float64, torch.float64]
    assert torch.equal(attempts[0], value) and torch.equal(attempts[1], value.double())
    mean = value.double().diagonal().abs().mean()
    eye = torch.eye(factor.dim, dtype=torch.float64)
    for attempt, shift in zip(attempts[2:], JITTERS[:2]):  # growing: 1e-6, then 1e-4 (relative)
        torch.testing.assert_close(attempt - attempts[1], shift * mean * eye, rtol=1e-8, atol=0)
    generator = torch.Generator().manual_seed(0)
    generator.set_state(generator_state)
    values, vectors = real(attempts[3], method.representation, 3, 4, method.power_iters, generator)
    eigen = factor.inverse.eigen
    assert eigen.values.dtype == eigen.vectors.dtype == torch.float32
    assert torch.equal(eigen.values, values.float()) and torch.equal(eigen.vectors, vectors.float())
    assert pre.layers["0"].curvature.failures.total == 0


@pytest.mark.parametrize("method_cls", SKETCHED, ids=lambda c: c.__name__)
def test_sketched_failures_keep_previous_warn_once_per_layer_then_raise(monkeypatch, method_cls):
    """Every attempt fails: five per decomposition (fp32, fp64, three jitters), the previous
    eigenpairs stay (while the EA factor keeps folding), one ``RuntimeWarning`` per layer
    (not per step), and the third consecutive failure raises `sr.DecompositionError` naming
    the layer."""
    model = wide_mlp(torch.float32)
    pre = sr.Preconditioner(model, sr.Policy(method_cls(rank=3, inverse_every=1)), max_decomposition_failures=3)
    assert _step(model, pre, _batch())
    kept = _inverse_tensors(pre)
    assert kept
    factor = pre.layers["0"].curvature.factors["a"]
    value_before = factor.value.clone()
    attempts: Counter[tuple[int, torch.dtype]] = Counter()

    def fails(matrix, *args):
        attempts[(matrix.shape[0], matrix.dtype)] += 1
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(factors_module, "sketch_eigen", fails)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert _step(model, pre, _batch())
            assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    messages = _failure_warnings(caught)
    assert len(messages) == len(pre.layers) == 3, messages
    assert {name for name in pre.layers if any(f"layer {name!r}" in text for text in messages)} == set(pre.layers)
    assert attempts[(25, torch.float32)] == 2 and attempts[(25, torch.float64)] == 2 * (1 + len(JITTERS))
    assert_same_state(_inverse_tensors(pre), kept, what="inverse representations")
    assert not torch.equal(factor.value, value_before)  # statistics are still folded
    with pytest.raises(sr.DecompositionError, match="layer '0'.*3 times in a row"):
        _step(model, pre, _batch())


def test_sketched_factor_with_a_non_finite_value_is_refused_before_any_attempt(monkeypatch):
    model = wide_mlp(torch.float32)
    pre = sr.Preconditioner(model, sr.Policy(sr.SREKFAC(rank=3, inverse_every=1)))
    assert _step(model, pre, _batch())
    kept = _inverse_tensors(pre)
    curvature = pre.layers["2"].curvature
    curvature.factors["a"].value[0, 0] = float("nan")
    calls = []
    monkeypatch.setattr(factors_module, "sketch_eigen", lambda *args: calls.append(args) or None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        curvature.update(pre.steps, None)
    assert calls == []
    assert len(_failure_warnings(caught)) == 1 and "layer '2'" in _failure_warnings(caught)[0]
    assert curvature.failures.consecutive == 1
    assert_same_state(_inverse_tensors(pre), kept)


def test_a_layer_takes_new_inverses_only_when_both_sides_succeed(monkeypatch):
    """Layer 0's G decomposition (20 × 20) fails, its A decomposition succeeds: neither side's
    inverse changes (a fresh A with a stale G would be an inconsistent preconditioner); the
    other layers refresh normally and only layer 0 warns."""
    model = wide_mlp(torch.float64)
    pre = sr.Preconditioner(model, sr.Policy(sr.KFAC(inverse_every=1)))
    assert _step(model, pre, _batch(dtype=torch.float64))
    before = _inverse_tensors(pre)
    a_value = pre.layers["0"].curvature.a_factor.value.clone()
    original = torch.linalg.eigh

    def fails_for_width_20(matrix):
        if matrix.shape[0] == 20:
            raise torch.linalg.LinAlgError("forced failure")
        return original(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", fails_for_width_20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _step(model, pre, _batch(dtype=torch.float64))
    assert [("layer '0'" in text) for text in _failure_warnings(caught)] == [True]
    after = _inverse_tensors(pre)
    assert not torch.equal(pre.layers["0"].curvature.a_factor.value, a_value)
    for key in before:
        unchanged = torch.equal(after[key], before[key])
        assert unchanged == key.startswith("0."), key


def _factor_state(curvature) -> dict:
    """The curvature state without its bookkeeping counters (``folds``, ``decompositions``, ``updates``)."""
    return {k: v for k, v in flat_state(curvature.state_dict()).items() if k not in ("folds", "decompositions", "updates")}


# -- Brand -------------------------------------------------------------------------------------------------------
def _brand_preconditioner(dtype=torch.float64, **kwargs):
    model = wide_mlp(dtype)
    pre = sr.Preconditioner(model, sr.Policy(sr.BKFAC(rank=4)), **kwargs)
    brand_layers = {name for name, m in pre.layers.items() if any(isinstance(f, BrandFactor) for f in m.curvature.factors.values())}
    assert brand_layers == {"0", "2", "4"}
    return model, pre


@pytest.mark.parametrize("poisoned", ["a", "g"])
def test_brand_non_finite_rows_leave_that_factor_untouched(poisoned):
    """Rows with an inf folded straight into a Brand factor (no gradient check in between):
    that factor's eigenpairs, trace and inverse are unchanged and nothing warns; the other
    side folds its finite rows as usual (as dense factors do, side by side)."""
    model, pre = _brand_preconditioner()
    assert _step(model, pre, _batch(dtype=torch.float64))
    assert _step(model, pre, _batch(dtype=torch.float64))
    curvature = pre.layers["0"].curvature
    assert isinstance(curvature.factors["a"], BrandFactor) and isinstance(curvature.factors["g"], BrandFactor)
    before = _factor_state(curvature)
    rows = {"a": torch.randn(6, 25, dtype=torch.float64), "g": torch.randn(6, 20, dtype=torch.float64)}
    rows[poisoned][2, 3] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        curvature.accumulate(rows["a"], rows["g"])
        curvature.update(pre.steps, BatchCounts(rows=6, samples=6))
    after = _factor_state(curvature)
    prefix, other = ("A_", "G_") if poisoned == "a" else ("G_", "A_")
    mine = lambda state: {k: v for k, v in state.items() if k.startswith(prefix) and k != f"{prefix}damping"}
    assert_same_state(mine(after), mine(before), what=f"{poisoned} factor")  # π-damping depends on both traces
    assert not torch.equal(after[f"{other}brand_values"], before[f"{other}brand_values"])
    assert curvature.failures.total == 0
    direction = curvature.precondition(torch.randn(20, 25, dtype=torch.float64))
    assert torch.isfinite(direction).all()


def test_brand_update_failing_in_fp32_is_retried_in_fp64(monkeypatch):
    model, pre = _brand_preconditioner(torch.float32)
    twin, reference = _brand_preconditioner(torch.float32)
    twin.load_state_dict(model.state_dict())
    real = brand_module.brand_update
    dtypes = []

    def fp64_only(values, vectors, rows, decay):
        dtypes.append(rows.dtype)
        if rows.dtype != torch.float64:
            raise torch.linalg.LinAlgError("forced failure")
        return real(values, vectors, rows, decay)

    monkeypatch.setattr(brand_module, "brand_update", fp64_only)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            batch = _batch()
            assert _step(model, pre, batch)
            monkeypatch.setattr(brand_module, "brand_update", real)
            assert _step(twin, reference, batch)
            monkeypatch.setattr(brand_module, "brand_update", fp64_only)
    assert set(dtypes) == {torch.float32, torch.float64} and dtypes.count(torch.float32) == dtypes.count(torch.float64)
    for name, m in pre.layers.items():
        for side, factor in m.curvature.factors.items():
            if isinstance(factor, BrandFactor):
                want = reference.layers[name].curvature.factors[side]
                assert factor.values.dtype == factor.vectors.dtype == torch.float32
                torch.testing.assert_close(factor.values, want.values, rtol=1e-4, atol=1e-6)
                # eigenvectors up to sign: compare the projectors
                torch.testing.assert_close(factor.vectors @ factor.vectors.T, want.vectors @ want.vectors.T, rtol=1e-3, atol=1e-4)


def test_failing_brand_update_keeps_previous_warns_once_recovers_then_raises(monkeypatch):
    """Brand's update raises in fp32 and fp64: the eigenpairs, trace and inverse stay, one
    warning per layer for the whole run, a good update resets the count, and
    ``max_decomposition_failures`` consecutive failures raise naming the layer."""
    model, pre = _brand_preconditioner(max_decomposition_failures=3)
    assert _step(model, pre, _batch(dtype=torch.float64))
    real = brand_module.brand_update

    def fails(*args):
        raise torch.linalg.LinAlgError("forced failure")

    def brand_state():
        return {f"{name}.{key}": value for name, m in pre.layers.items() for key, value in flat_state(m.curvature.state_dict()).items()
                if "brand" in key or "trace" in key}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monkeypatch.setattr(brand_module, "brand_update", fails)
        kept, inverses = brand_state(), _inverse_tensors(pre)
        for _ in range(2):
            assert _step(model, pre, _batch(dtype=torch.float64))
        assert_same_state(brand_state(), kept, what="Brand eigenpairs")
        assert_same_state(_inverse_tensors(pre), inverses, what="inverses")
        assert len(_failure_warnings(caught)) == 3  # one per Brand layer

        monkeypatch.setattr(brand_module, "brand_update", real)
        assert _step(model, pre, _batch(dtype=torch.float64))
        assert all(m.curvature.failures.consecutive == 0 for m in pre.layers.values())
        assert any(not torch.equal(brand_state()[k], v) for k, v in kept.items() if v.is_floating_point())

        monkeypatch.setattr(brand_module, "brand_update", fails)
        for _ in range(2):
            assert _step(model, pre, _batch(dtype=torch.float64))
        assert len(_failure_warnings(caught)) == 3  # warned once per layer, ever
        with pytest.raises(sr.DecompositionError, match="layer '0'.*3 times in a row"):
            _step(model, pre, _batch(dtype=torch.float64))


# -- SINGD --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["dense", "diagonal", "block"])
def test_singd_update_overflowing_fp16_state_is_dropped_without_a_host_sync(structure):
    """Inputs of size ~300: ``H_K = Kᵀ A K`` (~1e5) overflows fp16 although every gradient is
    finite (fp32 parameters). The update is dropped — K, C and their momenta unchanged and
    finite — by ``torch.where``, with the step's single host sync; the parameters still move.
    A following step with ordinary inputs updates K and C."""
    extra = {"block_size": 3} if structure == "block" else {}
    model = mlp(torch.float32)
    opt = sr.Optimizer(model, sr.Policy(sr.SINGD(structure=structure, update_every=1, dtype=torch.float16, **extra)), lr=1e-3)
    x, y = classification_batch(8, (6,), 3, dtype=torch.float32)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # one ordinary update: K, C and momenta are no longer the identity / zero
    before = {name: _factor_state(m.curvature) for name, m in opt.preconditioner.layers.items()}
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    nn.functional.cross_entropy(model(300.0 * x), y).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with HostSyncCounter() as counter:
        opt.step()
    assert counter.count == 1
    assert opt.preconditioner.skipped_steps == 0
    first = opt.preconditioner.layers["0"].curvature
    assert_same_state(_factor_state(first), before["0"], what="layer 0 after an overflowing update")
    assert all(torch.isfinite(t).all() for t in _factor_state(first).values() if isinstance(t, torch.Tensor) and t.is_floating_point())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), params))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    after = _factor_state(first)
    assert any(not torch.equal(after[k], v) for k, v in before["0"].items() if k.startswith(("K.", "C.")))
