"""The low-rank K-FAC family through the optimizer (DESIGN §3.2, §5; API.md "Methods").

R-KFAC, SRE-KFAC, Nyström, B-KFAC, B-R-KFAC and B-KFAC-c, and per-factor
choices ``sr.KFAC(a=..., g=...)``, checked end to end on small float64 nets
against independent oracles:

* dense ``sr.KFAC`` with the same fields, wherever the low-rank representation
  is exact: a sketch whose rank is at least the rank of the factor, Brand
  before any truncation, a rank at or above the dimension, a Brand factor
  handed over to dense (rank + rows >= dim);
* the explicit running average of the batch factors, rebuilt from forward /
  backward hooks (as in ``test_kfac_numerics.py``), and the same recursion with
  a dense ``torch.linalg.eigh`` truncation to the top ``rank`` eigenpairs;
* an uninterrupted run (checkpoints, ``torch.equal``);
* the shapes of every tensor the dispatcher produces (B-KFAC on a 2049-wide
  input never forms ``d × d``).
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import singd_rkfac as sr
from singd_rkfac._table import format_bytes
from singd_rkfac.curvature.brand import BrandFactor
from singd_rkfac.curvature.factors import DenseFactor, SketchedFactor
from singd_rkfac.curvature.kfac import KFACCurvature
from conftest import classification_batch, train_steps

F64 = torch.float64
SKETCHED = (sr.RKFAC, sr.SREKFAC, sr.NystromKFAC)
BRAND = (sr.BKFAC, sr.BRKFAC, sr.BKFACC)
LOW_RANK = SKETCHED + BRAND
KFAC_FIELDS = tuple(f.name for f in dataclasses.fields(sr.KFAC))


pytestmark = pytest.mark.usefixtures("one_thread")


# -- helpers ----------------------------------------------------------------------------
def _kfac_like(method: sr.KFAC, **overrides) -> sr.KFAC:
    """Plain ``sr.KFAC`` with every shared field of ``method`` (dense on both sides)."""
    values = {name: getattr(method, name) for name in KFAC_FIELDS if name not in ("a", "g")}
    return sr.KFAC(**{**values, **overrides})


def _seeded(build, seed: int = 1):
    """``build()`` under its own seed, leaving the global RNG stream untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def _square_mlp(dtype=F64) -> nn.Sequential:
    """Three bias-free 12 → 12 layers: every factor of every layer is 12 × 12."""
    return _seeded(lambda: nn.Sequential(
        nn.Linear(12, 12, bias=False), nn.Tanh(), nn.Linear(12, 12, bias=False), nn.Tanh(),
        nn.Linear(12, 12, bias=False),
    ).to(dtype))


def _square_cnn(dtype=F64) -> nn.Sequential:
    """Conv2d(3→12, k=2) and Conv2d(12→12, k=1), bias-free, pooled into Linear(12→12): all factors 12 × 12."""
    return _seeded(lambda: nn.Sequential(
        nn.Conv2d(3, 12, 2, bias=False), nn.Tanh(), nn.Conv2d(12, 12, 1, bias=False),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 12, bias=False),
    ).to(dtype))


def _wide_mlp(dtype=F64) -> nn.Sequential:
    """Linear(64→48), Tanh, Linear(48→3): factors of 65, 48, 49 and 3."""
    return _seeded(lambda: nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 3)).to(dtype))


def _small_mlp(dtype=F64) -> nn.Sequential:
    """Linear(6→7), ReLU, Linear(7→5), Tanh, Linear(5→3) (conftest's ``mlp``, seeded)."""
    return _seeded(lambda: nn.Sequential(
        nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(dtype))


OPTIONS = {"lr": 0.3, "momentum": 0.9, "clip": None}


def _run(build, method, batches, **options):
    """Train a fresh ``build()`` with ``method`` everywhere; returns (model, optimizer, initial parameters)."""
    model = build()
    start = [p.detach().clone() for p in model.parameters()]
    opt = sr.Optimizer(model, sr.Policy(method), **{**OPTIONS, **options})
    train_steps(model, opt, batches)
    return model, opt, start


def _assert_same_training(got: nn.Module, want: nn.Module, start, rtol: float) -> None:
    """Parameters agree to ``rtol`` relative to how far the reference moved them."""
    for (name, p), q, p0 in zip(got.named_parameters(), want.parameters(), start):
        moved = (q.detach() - p0).norm()
        assert moved > 1e-3 * p0.norm(), f"{name} hardly moved: the comparison would be vacuous"
        error = (p.detach() - q.detach()).norm()
        assert error <= rtol * moved, f"{name}: |got - want| = {error:.3e}, reference moved {moved:.3e}"


def _kinds(opt) -> dict[str, dict[str, str]]:
    return {
        name: {side: type(f).__name__ for side, f in m.curvature.factors.items()}
        for name, m in opt.preconditioner.layers.items()
    }


class _RowRecorder:
    """Forward/backward hooks that keep one Linear layer's factor rows ``[x, 1]`` and ``N·g`` of the last call."""

    def __init__(self, module: nn.Linear) -> None:
        self.a = self.g = None
        self.handle = module.register_forward_hook(self._forward)

    def _forward(self, module, args, output) -> None:
        x = args[0].detach()
        self.a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1) if module.bias is not None else x
        n = x.shape[0]
        output.register_hook(lambda grad: setattr(self, "g", grad.detach() * n))

    def batch_factors(self) -> dict[str, torch.Tensor]:
        """``A = aᵀa / N`` and ``G = (N g)ᵀ(N g) / N`` of the last call (batch-mean loss)."""
        n = self.a.shape[0]
        return {"a": self.a.T @ self.a / n, "g": self.g.T @ self.g / n}


def _brand_matrix(factor: BrandFactor) -> torch.Tensor:
    return (factor.vectors * factor.values) @ factor.vectors.T


# -- 1. exact whenever the low-rank representation is exact ------------------------------------
def _nets():
    yield "mlp", _square_mlp, [classification_batch(3, (12,), 12) for _ in range(3)], "expand"
    yield "cnn-reduce", _square_cnn, [classification_batch(3, (3, 4, 4), 12) for _ in range(3)], "reduce"


@pytest.mark.parametrize("net", ["mlp", "cnn-reduce"])
@pytest.mark.parametrize("mode", ["pi", "exact"])
@pytest.mark.parametrize("cls", SKETCHED, ids=lambda c: c.__name__)
def test_sketch_just_below_full_rank_equals_kfac(cls, mode, net):
    """rank = dim − 1 with the sketch width reaching dim keeps the whole range of a factor of rank ≤ dim − 2.

    Every factor is 12 × 12 and sees 3 steps × 3 rows, so its rank is at most
    9 (checked on the dense reference); the top-11 eigenpairs then are the
    whole factor and the discarded mode's eigenvalue is 0 (so either
    complement gives the exact inverse). Over 3 steps (inverse every 2 steps,
    momentum) the parameters equal dense K-FAC with the same fields.
    """
    _, build, batches, approx = next(n for n in _nets() if n[0] == net)
    method = cls(rank=11, damping_mode=mode, inverse_every=2, ema=0.8, damping=1e-2, kfac_approx=approx)
    model, opt, start = _run(build, method, batches)
    reference, reference_opt, _ = _run(build, _kfac_like(method), batches)
    assert all(isinstance(f, SketchedFactor) for m in opt.preconditioner.layers.values() for f in m.curvature.factors.values())
    for m in reference_opt.preconditioner.layers.values():
        for factor in m.curvature.factors.values():
            values = torch.linalg.eigvalsh(factor.value)
            assert values[1] <= 1e-12 * values[-1]  # at least two zero eigenvalues: the precondition holds
    _assert_same_training(model, reference, start, rtol=1e-9)


@pytest.mark.parametrize("cls", LOW_RANK, ids=lambda c: c.__name__)
def test_rank_at_or_above_dim_is_the_exact_dense_factor(cls):
    """``rank >= dim`` gives a `DenseFactor` on that side, ``describe()`` says "exact", training equals K-FAC.

    Factors 7 × 7 and 7 × 7, 8 × 8 and 5 × 5, 6 × 6 and 3 × 3 with rank 8 (equal
    to the widest): every side is dense, before training (``Policy.describe``)
    and after, and 4 steps equal ``sr.KFAC`` with the same fields.
    """
    batches = [classification_batch(10, (6,), 3) for _ in range(4)]
    method = cls(rank=8, inverse_every=2, ema=0.9, damping=1e-2)
    policy = sr.Policy(method)
    planned = policy.describe(_small_mlp())
    for text in ("A: rank 8 >= dim 7: exact eigh", "G: rank 8 >= dim 7: exact eigh", "A: rank 8 >= dim 8: exact eigh",
                 "G: rank 8 >= dim 3: exact eigh"):
        assert text in planned
    model, opt, start = _run(_small_mlp, method, batches)
    assert set(k for kinds in _kinds(opt).values() for k in kinds.values()) == {"DenseFactor"}
    assert "A: rank 8 >= dim 7: exact eigh" in opt.describe()
    reference, _, _ = _run(_small_mlp, _kfac_like(method), batches)
    _assert_same_training(model, reference, start, rtol=1e-12)


# -- 2. Brand before truncation ---------------------------------------------------------------
def _brand_variants():
    """B-KFAC configs exact before truncation (complement zero), as the method or per factor."""
    yield "bkfac", lambda **kw: sr.BKFAC(rank=40, complement="zero", **kw)
    # a stale inverse between decompositions, statistics every other step
    yield "bkfac-every-2", lambda **kw: sr.BKFAC(rank=40, complement="zero", inverse_every=2, stats_every=2, **kw)
    # refreshes / corrections from the dense factor (steps 0 and 2) are exact too when rank >= rank(F)
    yield "brkfac", lambda **kw: sr.BRKFAC(rank=40, complement="zero", refresh_every=2, **kw)
    yield "bkfacc", lambda **kw: sr.BKFACC(rank=40, complement="zero", correct_every=2, correct_fraction=0.5, **kw)
    # only the representation fields of a per-factor config count: its ema / damping are ignored
    yield "kfac-a-bkfac-g-eigh", lambda **kw: sr.KFAC(
        a=sr.BKFAC(rank=40, complement="zero", ema=0.1, damping=5.0), g="eigh", inverse_every=1, **kw)
    yield "kfac-a-bkfac-g-srekfac", lambda **kw: sr.KFAC(
        a=sr.BKFAC(rank=40, complement="zero"), g=sr.SREKFAC(rank=30, complement="zero"), inverse_every=1, **kw)


BRAND_VARIANTS = dict(_brand_variants())


@pytest.mark.parametrize("mode", ["pi", "exact"])
@pytest.mark.parametrize("variant", BRAND_VARIANTS)
def test_brand_before_truncation_equals_kfac(variant, mode):
    """Linear(64→48)–Tanh–Linear(48→3), batch 6, 4 steps, rank 40: 24 rows ≤ 40 and 40 + 6 < 48 — no truncation.

    B-KFAC, B-R-KFAC, B-KFAC-c (and per-factor mixes of Brand, a sketch and
    dense eigh) then equal dense K-FAC with the same ema / damping / periods
    (B-KFAC's default inverse_every is 1), π and exact damping; layer 2's G
    (dim 3) is dense from the start.
    """
    batches = [classification_batch(6, (64,), 3) for _ in range(4)]
    method = BRAND_VARIANTS[variant](damping_mode=mode, ema=0.8, damping=1e-2)
    model, opt, start = _run(_wide_mlp, method, batches)
    kinds = _kinds(opt)
    assert kinds["0"]["a"] == kinds["2"]["a"] == "BrandFactor"
    assert kinds["0"]["g"] == {"kfac-a-bkfac-g-eigh": "DenseFactor", "kfac-a-bkfac-g-srekfac": "SketchedFactor"}.get(
        variant, "BrandFactor")
    assert kinds["2"]["g"] == "DenseFactor"
    assert _kfac_like(method) == sr.KFAC(inverse_every=method.inverse_every, stats_every=method.stats_every,
                                         ema=0.8, damping=1e-2, damping_mode=mode)
    reference, _, _ = _run(_wide_mlp, _kfac_like(method), batches)
    _assert_same_training(model, reference, start, rtol=1e-9)


def test_brand_state_is_the_explicit_running_average_before_truncation():
    """``U diag(s) Uᵀ`` equals ``F ← ρF + (1−ρ)F_batch`` rebuilt from hooks (first step F = F_batch), trace too.

    Both factors of layer 0 (65 and 48 wide) and layer 2's A (49), 4 steps of
    6 rows: ``s`` has one entry per row seen, ``U`` is orthonormal, and the
    tracked trace equals the running average's trace.
    """
    rho = 0.8
    model = _wide_mlp()
    opt = sr.Optimizer(model, sr.Policy(sr.BKFAC(rank=40, ema=rho, damping=1e-2)), lr=0.1)
    recorders = {"0": _RowRecorder(model[0]), "2": _RowRecorder(model[2])}
    expected: dict[tuple[str, str], torch.Tensor] = {}
    for step in range(4):
        train_steps(model, opt, [classification_batch(6, (64,), 3)])
        for layer, recorder in recorders.items():
            for side, batch in recorder.batch_factors().items():
                key = (layer, side)
                expected[key] = batch if step == 0 else rho * expected[key] + (1 - rho) * batch
        for layer, side in (("0", "a"), ("0", "g"), ("2", "a")):
            factor = opt.preconditioner.layers[layer].curvature.factors[side]
            assert isinstance(factor, BrandFactor)
            want = expected[(layer, side)]
            assert factor.values.shape == (6 * (step + 1),)
            eye = torch.eye(factor.values.numel(), dtype=F64)
            torch.testing.assert_close(factor.vectors.T @ factor.vectors, eye, rtol=0, atol=1e-12)
            torch.testing.assert_close(_brand_matrix(factor), want, rtol=0, atol=1e-12 * want.abs().max().item())
            torch.testing.assert_close(factor.trace, want.trace(), rtol=1e-12, atol=0)


# -- 3. truncation ----------------------------------------------------------------------------------
def test_brand_after_truncation_is_the_recursively_truncated_average():
    """With rank 8 < rows seen, ``(U, s)`` is ``F̃ ← top₈(ρF̃ + (1−ρ)F_batch)`` (dense eigh oracle).

    6 new rows a step, 6 steps on layer 0's A (65 wide). Also: ``U`` is
    orthonormal, ``s`` lies below the explicit (untruncated) running
    average's top eigenvalues (truncation only removes PSD parts, so
    ``F̃ ≼ F``), and the tracked trace is the untruncated average's.
    """
    rho, rank = 0.8, 8
    model = _wide_mlp()
    opt = sr.Optimizer(model, sr.Policy(sr.BKFAC(rank=rank, ema=rho, damping=1e-2)), lr=0.1)
    recorder = _RowRecorder(model[0])
    truncated = average = None
    for step in range(6):
        train_steps(model, opt, [classification_batch(6, (64,), 3)])
        batch = recorder.batch_factors()["a"]
        average = batch if step == 0 else rho * average + (1 - rho) * batch
        if step == 0:
            truncated = batch
        else:
            values, vectors = torch.linalg.eigh(rho * truncated + (1 - rho) * batch)
            assert values[-rank] - values[-rank - 1] > 1e-3 * values[-1]  # the top-8 space is well defined
            truncated = (vectors[:, -rank:] * values[-rank:]) @ vectors[:, -rank:].T
        factor = opt.preconditioner.layers["0"].curvature.a_factor
        kept = factor.values.numel()
        assert kept == min(rank, 6 * (step + 1))
        scale = average.abs().max().item()
        torch.testing.assert_close(_brand_matrix(factor), truncated, rtol=0, atol=1e-11 * scale)
        torch.testing.assert_close(factor.vectors.T @ factor.vectors, torch.eye(kept, dtype=F64), rtol=0, atol=1e-12)
        top = torch.linalg.eigvalsh(average).flip(0)[:kept]
        assert bool((factor.values.flip(0) <= top + 1e-12 * scale).all())
        torch.testing.assert_close(factor.trace, average.trace(), rtol=1e-12, atol=0)
    assert (factor.values.flip(0) - top).min() < -1e-6 * scale  # truncation really lost mass


def test_brand_folds_a_step_with_more_rows_than_dim_minus_rank():
    """6, then 40 and 100 rows on a 33-wide A with rank 8 (Brand valid at the first step, chunked later):
    ``U`` stays orthonormal, ``s`` stays below the explicit running average's top eigenvalues, trace exact."""
    rho = 0.5
    model = _seeded(lambda: nn.Sequential(nn.Linear(32, 3)).to(F64))
    opt = sr.Optimizer(model, sr.Policy(sr.KFAC(a=sr.BKFAC(rank=8), ema=rho)), lr=0.1)
    recorder = _RowRecorder(model[0])
    average = None
    for n in (6, 40, 100):
        train_steps(model, opt, [classification_batch(n, (32,), 3)])
        batch = recorder.batch_factors()["a"]
        average = batch if average is None else rho * average + (1 - rho) * batch
        factor = opt.preconditioner.layers["0"].curvature.a_factor
        assert isinstance(factor, BrandFactor) and factor.values.numel() == min(n, 8)
        kept, scale = factor.values.numel(), average.abs().max().item()
        torch.testing.assert_close(factor.vectors.T @ factor.vectors, torch.eye(kept, dtype=F64), rtol=0, atol=1e-12)
        top = torch.linalg.eigvalsh(average).flip(0)[:kept]
        assert bool((factor.values.flip(0) <= top + 1e-12 * scale).all())
        assert bool((factor.values >= 0).all())
        torch.testing.assert_close(factor.trace, average.trace(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("cls", BRAND, ids=lambda c: c.__name__)
def test_brand_truncating_every_step_trains_on_a_fixed_batch(cls):
    """Rank 4 with 16 rows a step (truncation at every fold): loss falls on a fixed batch, all state finite."""
    x, y = classification_batch(16, (64,), 3)
    model = _wide_mlp()
    opt = sr.Optimizer(model, sr.Policy(cls(rank=4)), lr=0.1, momentum=0.5)
    losses = train_steps(model, opt, [(x, y)] * 10)
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    factor = opt.preconditioner.layers["0"].curvature.a_factor
    assert isinstance(factor, BrandFactor) and factor.values.shape == (4,)
    for value in opt.state_dict()["preconditioner"]["layers"]["0"]["curvature"].values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.isfinite(value).all()


# -- 4. B-KFAC memory ------------------------------------------------------------------------------
class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes.extend((str(func), tuple(t.shape)) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out

    def square(self, width: int) -> list[tuple[str, tuple[int, ...]]]:
        """Outputs with at least two dimensions ``>= width``."""
        return [(op, shape) for op, shape in self.shapes if sum(d >= width for d in shape) >= 2]


def test_brand_wide_layer_memory_is_linear_in_width_and_never_forms_d_by_d():
    """Linear(2048→16), ``sr.BKFAC(rank=32)``, batch 64 (float32): A is 2049 wide, 32 + 64 < 2049.

    Construction and 3 steps (forward, backward, ``opt.step()``) create no
    tensor with two dimensions ≥ 2048 (the recorder does see the 64 × 2049
    rows and the 2049 × 32 basis, and does catch dense K-FAC's 2049 × 2049).
    The layer's state is 4·(2049·32 + 32 + 2·16² + …) ≈ 264 KB — about d·r
    floats, against d² = 4.2 M floats (16.8 MB) for one dense factor — and
    ``Policy.describe``'s estimate is within 5 % of it.
    """
    d, rank = 2049, 32
    model = _seeded(lambda: nn.Sequential(nn.Linear(2048, 16)))
    x, y = torch.randn(64, 2048), torch.randint(0, 16, (64,))
    policy = sr.Policy(sr.BKFAC(rank=rank))
    recorder = _Shapes()
    with recorder:
        opt = sr.Optimizer(model, policy, lr=0.1)
        train_steps(model, opt, [(x, y)] * 3)
    assert recorder.square(2048) == []
    assert (64, d) in {s for _, s in recorder.shapes} and (d, rank) in {s for _, s in recorder.shapes}
    assert isinstance(opt.preconditioner.layers["0"].curvature.a_factor, BrandFactor)

    used = opt.memory_bytes()["0"]
    assert 4 * d * rank <= used <= 4 * (d * (rank + 1) + 2 * 16 * 16 + 64)
    assert used * 50 < 4 * d * d
    curvature = opt.preconditioner.layers["0"].curvature
    estimated = KFACCurvature.estimate_bytes(curvature.method, curvature.dims, torch.float32)
    assert abs(estimated - used) <= 0.05 * used
    assert format_bytes(estimated) in policy.describe(model)
    assert format_bytes(used) in opt.describe()
    assert estimated * 100 < KFACCurvature.estimate_bytes(sr.KFAC(), curvature.dims, torch.float32)

    dense = _Shapes()  # positive control: the recorder catches a d × d factor
    with dense:
        sr.Optimizer(_seeded(lambda: nn.Sequential(nn.Linear(2048, 16))), sr.Policy(sr.KFAC()), lr=0.1)
    assert (d, d) in {s for _, s in dense.square(2048)}


# -- 5. Brand handover ------------------------------------------------------------------------------
HANDOVER = {
    # Brand valid by rank (4 < 7, 8, 6) but not with 10 rows: every A side hands over
    "a-bkfac-rank4": sr.KFAC(a=sr.BKFAC(rank=4)),
    # rank 64 >= every width: dense from the start
    "a-bkfac-default": sr.KFAC(a="bkfac"),
    # both sides; G widths 7, 5 hand over, 3 is dense from the start
    "bkfac-rank4": sr.BKFAC(rank=4),
}


@pytest.mark.parametrize("name", HANDOVER)
def test_brand_hands_over_to_dense_when_rank_plus_rows_reach_dim(name):
    """rank + rows ≥ dim at the first statistics step: the factor becomes a `DenseFactor` and equals K-FAC.

    ``describe()`` says "Brand needs rank + rows < dim" for each side that
    handed over, and over 4 steps (batch 10) the parameters equal ``sr.KFAC``
    with the same fields.
    """
    method = HANDOVER[name]
    batches = [classification_batch(10, (6,), 3) for _ in range(4)]
    model = _small_mlp()
    start = [p.detach().clone() for p in model.parameters()]
    opt = sr.Optimizer(model, sr.Policy(method), **OPTIONS)
    before = opt.describe()
    if name == "a-bkfac-default":
        assert "A: rank 64 >= dim 7: exact eigh" in before
        assert isinstance(opt.preconditioner.layers["0"].curvature.a_factor, DenseFactor)
    else:
        assert "A: brand rank 4 (exact if rank + rows >= 7)" in before
        assert isinstance(opt.preconditioner.layers["0"].curvature.a_factor, BrandFactor)
    train_steps(model, opt, batches)
    assert set(k for kinds in _kinds(opt).values() for k in kinds.values()) == {"DenseFactor"}
    after = opt.describe()
    if name != "a-bkfac-default":
        for text in ("A: Brand needs rank + rows < dim (4 + 10 >= 7): exact eigh",
                     "A: Brand needs rank + rows < dim (4 + 10 >= 8): exact eigh",
                     "A: Brand needs rank + rows < dim (4 + 10 >= 6): exact eigh"):
            assert text in after
    if name == "bkfac-rank4":
        assert "G: Brand needs rank + rows < dim (4 + 10 >= 7): exact eigh" in after
        assert "G: rank 4 >= dim 3: exact eigh" in after
    else:
        assert "G:" not in after
    reference, _, _ = _run(_small_mlp, _kfac_like(method), batches)
    _assert_same_training(model, reference, start, rtol=1e-12)


@pytest.mark.parametrize("rank, kind", [(26, BrandFactor), (27, DenseFactor)])
def test_brand_validity_boundary_is_rank_plus_rows_below_dim(rank, kind):
    """Linear(32→3) (A is 33 wide), 6 rows: rank 26 (26 + 6 = 32 < 33) stays Brand, rank 27 (= 33) hands over."""
    model = _seeded(lambda: nn.Sequential(nn.Linear(32, 3)).to(F64))
    opt = sr.Optimizer(model, sr.Policy(sr.KFAC(a=sr.BKFAC(rank=rank))), lr=0.1)
    train_steps(model, opt, [classification_batch(6, (32,), 3)])
    assert type(opt.preconditioner.layers["0"].curvature.a_factor) is kind
    handed_over = f"A: Brand needs rank + rows < dim ({rank} + 6 >= 33): exact eigh"
    assert (handed_over in opt.describe()) == (kind is DenseFactor)


# -- 6. per-factor choice -----------------------------------------------------------------------------
def test_per_factor_choice_uses_brand_on_a_and_dense_on_g():
    """``sr.KFAC(a=sr.BKFAC(rank=8), g="eigh")``: Brand on A (33 wide, 8 + 6 < 33), dense eigh on G; trains finitely."""
    method = sr.KFAC(a=sr.BKFAC(rank=8), g="eigh")
    assert method.factor("a") == sr.BKFAC(rank=8) and method.factor("g") == sr.KFAC(inverse="eigh")
    model = _seeded(lambda: nn.Sequential(nn.Linear(32, 5)).to(F64))
    batches = [classification_batch(6, (32,), 5) for _ in range(2)]  # 12 distinct rows: 8 are kept
    opt = sr.Optimizer(model, sr.Policy(method), lr=0.1)
    losses = train_steps(model, opt, batches * 4)
    curvature = opt.preconditioner.layers["0"].curvature
    assert isinstance(curvature.factors["a"], BrandFactor) and curvature.factors["a"].values.shape == (8,)
    assert type(curvature.factors["g"]) is DenseFactor
    assert curvature.a_factor is curvature.factors["a"] and curvature.g_factor is curvature.factors["g"]
    assert losses[-2] < losses[0] and losses[-1] < losses[1]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "A: brand rank 8 (exact if rank + rows >= 33)" in opt.describe()


def test_per_factor_config_from_dict_and_toml(tmp_path):
    """The dict / TOML form of a per-factor config builds the same frozen config (nested tables, lists → tuples)."""
    expected = sr.KFAC(a=sr.BKFAC(rank=8), g="eigh")
    policy = sr.Policy.from_dict({"default": {"method": "kfac", "a": {"method": "bkfac", "rank": 8}, "g": "eigh"}})
    assert policy.default == expected
    path = tmp_path / "policy.toml"
    path.write_text(
        '[default]\nmethod = "kfac"\ng = "eigh"\n\n[default.a]\nmethod = "bkfac"\nrank = 8\n\n'
        '[[rules]]\ntype = "Linear"\nmatch = "head"\nmethod = "rkfac"\nrank = 16\ng = "cholesky"\n'
        'a = { method = "bkfac", rank = 8, adaptive_rank = [2, 30] }\n'
    )
    loaded = sr.Policy.from_toml(path)
    assert loaded.default == expected
    assert loaded.rules[0].method == sr.RKFAC(rank=16, g="cholesky", a=sr.BKFAC(rank=8, adaptive_rank=(2, 30)))
    model = nn.Sequential()
    model.add_module("body", nn.Linear(40, 12))
    model.add_module("head", nn.Linear(12, 3))
    assert loaded.resolve(model) == {"body": expected, "head": loaded.rules[0].method}


@pytest.mark.parametrize("method", [
    sr.RKFAC(rank=5, oversample=3, power_iters=1, complement="zero", adaptive_rank=(2, 9)),
    sr.SREKFAC(rank=5, damping_mode="exact"), sr.NystromKFAC(rank=7, adaptive_rank=True, rank_target=0.1),
    sr.BKFAC(rank=3, inverse_every=4), sr.BRKFAC(rank=6, refresh_every=2, oversample=0),
    sr.BKFACC(rank=6, correct_every=5, correct_fraction=0.5),
    sr.KFAC(a=sr.BKFAC(rank=8), g="cholesky"), sr.KFAC(a="nystromkfac", g=sr.SREKFAC(rank=4)),
], ids=lambda m: m.summary())
def test_configs_round_trip_through_to_dict(method):
    """``Policy.from_dict`` of ``to_dict()`` rebuilds an equal config (nested a/g included)."""
    assert sr.Policy.from_dict({"default": method.to_dict()}).default == method


# -- 7. checkpoints ---------------------------------------------------------------------------------
def _checkpoint_mlp() -> nn.Sequential:
    """24 → 16 → 8 → 4 (float64): with rank 6 and 4 rows, factors 25, 16, 17 stay Brand; 8 and 9 hand over."""
    return _seeded(lambda: nn.Sequential(
        nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4)
    ).to(F64))


RESUME = {
    "rkfac": sr.RKFAC(rank=6, inverse_every=2, ema=0.9),
    "srekfac": sr.SREKFAC(rank=6, inverse_every=2, ema=0.9),
    "nystromkfac": sr.NystromKFAC(rank=6, inverse_every=2, ema=0.9),
    "srekfac-exact": sr.SREKFAC(rank=6, inverse_every=3, damping_mode="exact"),
    "bkfac": sr.BKFAC(rank=6),
    "bkfac-inverse-every-3": sr.BKFAC(rank=6, inverse_every=3, stats_every=2),
    "brkfac": sr.BRKFAC(rank=6, refresh_every=3),
    "bkfacc": sr.BKFACC(rank=6, correct_every=3, correct_fraction=0.5),
    "bkfac-adaptive": sr.BKFAC(rank=6, adaptive_rank=(2, 12)),
    "rkfac-adaptive": sr.RKFAC(rank=6, adaptive_rank=True, inverse_every=1),
    "per-factor": sr.KFAC(a=sr.NystromKFAC(rank=5), g=sr.BKFACC(rank=4, correct_every=2), inverse_every=2),
}


@pytest.mark.parametrize("name", RESUME)
def test_resume_is_bit_for_bit(name):
    """Save after 5 of 9 steps, ``torch.load(weights_only=True)`` into fresh objects, continue: ``torch.equal``.

    Sketches (inverse_every ≤ 3) and Brand refreshes / corrections (every 3
    steps: steps 0, 3, 6) happen after the resume, so the per-layer generators'
    states and the periodic counters must come from the checkpoint; Brand
    factors that handed over to dense (widths 8 and 9) resume as dense.
    """
    method = RESUME[name]
    batches = [classification_batch(4, (24,), 4) for _ in range(9)]
    options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
    policy = sr.Policy(method)

    model = _checkpoint_mlp()
    opt = sr.Optimizer(model, policy, **options)
    train_steps(model, opt, batches)
    uninterrupted = [p.detach().clone() for p in model.parameters()]
    kinds = _kinds(opt)
    notes = opt.describe()
    if isinstance(method.factor("a"), sr.BKFAC):
        assert kinds["0"]["a"] == "BrandFactor" and kinds["4"]["a"] == "DenseFactor"
        assert "A: Brand needs rank + rows < dim (6 + 4 >= 9)" in notes

    model = _checkpoint_mlp()
    opt = sr.Optimizer(model, policy, **options)
    train_steps(model, opt, batches[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    fresh = _checkpoint_mlp()
    fresh.load_state_dict(checkpoint["model"])
    fresh_opt = sr.Optimizer(fresh, policy, **options)
    fresh_opt.load_state_dict(checkpoint["optimizer"])
    assert _kinds(fresh_opt) == kinds  # handed-over factors come back dense
    train_steps(fresh, fresh_opt, batches[5:])
    for got, want in zip(fresh.parameters(), uninterrupted):
        assert torch.equal(got.detach(), want)
    assert fresh_opt.describe() == notes


def test_resumed_brand_state_holds_the_same_bytes():
    """Right after ``load_state_dict`` a B-KFAC layer holds what it held when saved (inverse_every=1: the
    inverse is the Brand state itself), not twice ``d·r``."""
    model = _seeded(lambda: nn.Sequential(nn.Linear(256, 16)))
    opt = sr.Optimizer(model, sr.Policy(sr.BKFAC(rank=32)), lr=0.1)
    train_steps(model, opt, [classification_batch(64, (256,), 16, dtype=torch.float32) for _ in range(2)])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = sr.Optimizer(model, sr.Policy(sr.BKFAC(rank=32)), lr=0.1)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.memory_bytes() == opt.memory_bytes()


# -- 8. adaptive rank -------------------------------------------------------------------------------
ADAPTIVE = {
    "bkfac-(2,30)": (sr.BKFAC(rank=8, adaptive_rank=(2, 30)), (2, 30)),
    "rkfac-True": (sr.RKFAC(rank=8, adaptive_rank=True, inverse_every=1), (2, 32)),
    "bkfac-(6,30)": (sr.BKFAC(rank=8, adaptive_rank=(6, 30)), (6, 30)),
}


def _adaptive_ranks(method, inputs) -> list[tuple[int, int]]:
    """(rank, kept eigenpairs) of Linear(64→3)'s A factor (65 wide) after each step."""
    model = _seeded(lambda: nn.Sequential(nn.Linear(64, 3)).to(F64))
    opt = sr.Optimizer(model, sr.Policy(method), lr=0.05)
    ranks = []
    for x in inputs:
        train_steps(model, opt, [(x, torch.randint(0, 3, (x.shape[0],)))])
        factor = opt.preconditioner.layers["0"].curvature.a_factor
        assert isinstance(factor, (BrandFactor, SketchedFactor))
        ranks.append((factor.rank, factor.inverse.eigen.values.numel()))
    return ranks


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_rank_grows_on_a_flat_spectrum(name):
    """Isotropic 64-dim inputs (16 rows a step): every kept mode is significant, the rank grows to its upper bound."""
    method, (low, high) = ADAPTIVE[name]
    assert method.rank_bounds == (low, high)
    ranks = _adaptive_ranks(method, [torch.randn(16, 64, dtype=F64) for _ in range(6)])
    assert all(low <= rank <= high and kept <= high for rank, kept in ranks), ranks
    assert ranks[-1][0] == high, ranks
    assert ranks[-1][1] > 8, ranks  # more eigenpairs are really kept than the initial rank


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_rank_shrinks_on_a_low_rank_factor(name):
    """Inputs in a 2-dim subspace (A has rank ≤ 3 with the bias): the rank falls to ⌈1.5·n⌉ ≤ 5, or the lower bound."""
    method, (low, high) = ADAPTIVE[name]
    basis = torch.randn(2, 64, dtype=F64)
    ranks = _adaptive_ranks(method, [torch.randn(16, 2, dtype=F64) @ basis for _ in range(4)])
    assert all(low <= rank <= high for rank, _ in ranks), ranks
    assert ranks[-1][0] <= max(low, 5), ranks  # with bounds (6, 30): exactly the lower bound


# -- 9. decomposition failures ----------------------------------------------------------------------
def _fail_always(calls):
    def fails(*args, **kwargs):
        calls.append(args[0].dtype)
        raise torch.linalg.LinAlgError("forced failure")

    return fails


def _failure_model():
    """32 → 16 → 3 (float64): with rank 4 and 4 rows, A (33, 17) and G (16) are low-rank, the last G (3) dense."""
    return _seeded(lambda: nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3)).to(F64))


@pytest.mark.parametrize("cls, target", [
    (sr.RKFAC, "singd_rkfac.curvature.factors.sketch_eigen"),
    (sr.NystromKFAC, "singd_rkfac.curvature.factors.sketch_eigen"),
    (sr.BKFAC, "singd_rkfac.curvature.brand.brand_update"),
    (sr.BRKFAC, "singd_rkfac.curvature.brand.brand_update"),
], ids=["rkfac", "nystromkfac", "bkfac", "brkfac"])
def test_failed_low_rank_decompositions_keep_the_previous_warn_once_then_raise(monkeypatch, cls, target):
    """Every attempt of the sketch / Brand update raising: the previous inverse stays, one warning per layer,
    `DecompositionError` at the 3rd consecutive failure; Brand's ``(U, s)`` and trace do not move meanwhile."""
    method = cls(rank=4, inverse_every=1)
    model = _failure_model()
    pre = sr.Preconditioner(model, sr.Policy(method), max_decomposition_failures=3)

    def step():
        model.zero_grad()
        x, y = classification_batch(4, (32,), 3)
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()

    step()
    curvature = pre.layers["0"].curvature
    assert type(curvature.a_factor) is (SketchedFactor if cls in SKETCHED else BrandFactor)
    kept = [t.clone() for t in curvature.a_factor.inverse.eigen if t is not None]
    brand = [t.clone() for t in (curvature.a_factor.values, curvature.a_factor.vectors, curvature.a_factor.trace)] \
        if cls in BRAND else []
    calls: list[torch.dtype] = []
    monkeypatch.setattr(target, _fail_always(calls))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
        step()
    assert calls  # the patched function really is the one in use
    per_layer = [w for w in caught if "curvature decomposition failed" in str(w.message)]
    assert sorted(str(w.message).split("'")[1] for w in per_layer) == sorted(pre.layers)
    assert all(torch.equal(a, b) for a, b in zip(curvature.a_factor.inverse.eigen, kept))
    if brand:
        now = (curvature.a_factor.values, curvature.a_factor.vectors, curvature.a_factor.trace)
        assert all(torch.equal(a, b) for a, b in zip(now, brand))
    assert curvature.failures.consecutive == 2
    with pytest.raises(sr.DecompositionError, match="layer '0'.*3 times in a row"):
        step()


@pytest.mark.parametrize("cls, target", [
    (sr.SREKFAC, "singd_rkfac.curvature.factors.sketch_eigen"),
    (sr.BKFAC, "singd_rkfac.curvature.brand.brand_update"),
], ids=["srekfac", "bkfac"])
def test_float32_low_rank_failure_is_recovered_by_the_float64_retry(monkeypatch, cls, target):
    """A sketch / Brand update failing only in float32 is retried in float64: no failure, float32 state, same result."""
    import importlib

    module_name, attribute = target.rsplit(".", 1)
    original = getattr(importlib.import_module(module_name), attribute)
    calls: list[torch.dtype] = []

    def fails_in_float32(matrix, *args, **kwargs):
        calls.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("forced failure")
        return original(matrix, *args, **kwargs)

    batches = [classification_batch(4, (32,), 3, dtype=torch.float32) for _ in range(3)]
    reference = _failure_model().float()
    reference_opt = sr.Optimizer(reference, sr.Policy(cls(rank=4, inverse_every=1)), lr=0.1)
    train_steps(reference, reference_opt, batches)
    model = _failure_model().float()
    opt = sr.Optimizer(model, sr.Policy(cls(rank=4, inverse_every=1)), lr=0.1)
    monkeypatch.setattr(target, fails_in_float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, opt, batches)
    assert calls[:2] == [torch.float32, torch.float64] and torch.float64 in calls
    for m in opt.preconditioner.layers.values():
        assert m.curvature.failures.total == 0
        assert m.curvature.a_factor.inverse.eigen.vectors.dtype == torch.float32
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _brand_snapshot(factor: BrandFactor):
    return factor.values.clone(), factor.vectors.clone(), factor.trace.clone(), factor.rank, factor.initialized


def _assert_brand_unchanged(factor: BrandFactor, snapshot) -> None:
    values, vectors, trace, rank, initialized = snapshot
    assert torch.equal(factor.values, values) and torch.equal(factor.vectors, vectors)
    assert torch.equal(factor.trace, trace) and factor.rank == rank and factor.initialized == initialized


def test_non_finite_batch_leaves_brand_state_unchanged():
    """An inf input after a good step: Brand's ``(U, s)``, trace, rank and flags stay exactly, no failure counted.

    Through the preconditioner (the step is skipped with a warning and
    ``step()`` returns False), and at the factor itself: rows with an inf
    folded straight into a `BrandFactor` are refused by its own check, and its
    next decomposition is the unchanged one.
    """
    model = _seeded(lambda: nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 3)).to(F64))
    pre = sr.Preconditioner(model, sr.Policy(sr.BKFAC(rank=4)))
    x, y = classification_batch(4, (32,), 3)
    nn.functional.cross_entropy(model(x), y).backward()
    assert pre.step() is not False
    factors = [pre.layers["0"].curvature.a_factor, pre.layers["0"].curvature.g_factor, pre.layers["1"].curvature.a_factor]
    assert all(isinstance(f, BrandFactor) for f in factors)
    before = [_brand_snapshot(f) for f in factors]
    x, y = classification_batch(4, (32,), 3)
    x[1, 3] = float("inf")
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.warns(UserWarning, match="non-finite gradient"):
        assert pre.step() is False
    for factor, snapshot in zip(factors, before):
        _assert_brand_unchanged(factor, snapshot)
    assert all(m.curvature.failures.total == 0 for m in pre.layers.values())

    factor = factors[0]
    rows = torch.randn(4, factor.dim, dtype=F64)
    rows[2, 5] = float("nan")
    factor.accumulate(rows)
    factor.fold(0.25, 0.95)
    _assert_brand_unchanged(factor, before[0])
    inverse = factor.decompose(torch.tensor(1e-2, dtype=F64), step=2)
    assert inverse is not None and torch.equal(inverse.eigen.values, before[0][0])


class _GatedBranch(nn.Module):
    """``head(x + gate · branch(x))`` with a zero-initialised gate (ReZero / zero-init layer scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Linear(32, 32)
        self.gate = nn.Parameter(torch.zeros(()))
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(x + self.gate * self.branch(x))


FIRST_ZERO = {
    # zeros into a bias-free layer: its A rows are all zero at the first step
    "zero-input": (lambda: nn.Sequential(nn.Linear(32, 16, bias=False), nn.Tanh(), nn.Linear(16, 3)), "0", "a"),
    # a zero gate: the branch's output gradients (G rows) are all zero at the first step
    "zero-gated-branch": (_GatedBranch, "branch", "g"),
}


@pytest.mark.parametrize("mode", ["pi", "exact"])
@pytest.mark.parametrize("case", FIRST_ZERO)
def test_brand_survives_an_all_zero_first_batch(case, mode):
    """A first statistics step whose rows on a Brand side are all zero is an ordinary (zero) batch, as for the
    dense factor: no crash, and after a second batch the factor is ``(1−ρ)·F_batch`` (hooks oracle)."""
    build, layer, side = FIRST_ZERO[case]
    model = _seeded(lambda: build().to(F64))
    method = sr.BKFAC(rank=4, damping_mode=mode)
    opt = sr.Optimizer(model, sr.Policy(method, rules=[("", sr.Skip())]), lr=0.1)  # the gate: fallback rule
    first, second = classification_batch(4, (32,), 3), classification_batch(4, (32,), 3)
    if case == "zero-input":
        first = (torch.zeros_like(first[0]), first[1])
    train_steps(model, opt, [first])
    recorder = _RowRecorder(dict(model.named_modules())[layer])
    train_steps(model, opt, [second])
    factor = opt.preconditioner.layers[layer].curvature.factors[side]
    assert isinstance(factor, BrandFactor)
    want = (1 - method.ema) * recorder.batch_factors()[side]
    torch.testing.assert_close(_brand_matrix(factor), want, rtol=0, atol=1e-12 * want.abs().max().item())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("cls", LOW_RANK, ids=lambda c: c.__name__)
def test_low_rank_under_a_grad_scaler_equals_the_unscaled_run(cls):
    """``scaler.step(opt)`` with a power-of-two loss scale (2¹²): statistics are unscaled exactly, so 6 steps in
    float32 are bit-for-bit the run without a scaler (sketches every 2 steps, refresh / correction every 2)."""
    method = cls(rank=4, inverse_every=2) if cls in SKETCHED else cls(rank=4)
    if cls in (sr.BRKFAC, sr.BKFACC):
        method = dataclasses.replace(method, **{"refresh_every" if cls is sr.BRKFAC else "correct_every": 2})
    build = lambda: _seeded(lambda: nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)))
    batches = [classification_batch(4, (32,), 3, dtype=torch.float32) for _ in range(6)]
    plain = build()
    train_steps(plain, sr.Optimizer(plain, sr.Policy(method), lr=0.1), batches)
    model = build()
    opt = sr.Optimizer(model, sr.Policy(method), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in batches:
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0**12  # no step was skipped
    assert any(isinstance(f, (SketchedFactor, BrandFactor))
               for m in opt.preconditioner.layers.values() for f in m.curvature.factors.values())
    for got, want in zip(model.parameters(), plain.parameters()):
        assert torch.equal(got, want)


# -- 10. bad configs --------------------------------------------------------------------------------
BAD_CONFIGS = [
    (lambda: sr.RKFAC(rank=0), "RKFAC.rank"),
    (lambda: sr.BKFAC(rank=True), "BKFAC.rank"),
    (lambda: sr.SREKFAC(complement="max"), "SREKFAC.complement"),
    (lambda: sr.BKFAC(rank=8, adaptive_rank=(10, 5)), "BKFAC.adaptive_rank"),
    (lambda: sr.BKFAC(rank=8, adaptive_rank=(2, 5)), "BKFAC.adaptive_rank"),
    (lambda: sr.RKFAC(rank=8, adaptive_rank=(9, 30)), "RKFAC.adaptive_rank"),
    (lambda: sr.RKFAC(rank=8, adaptive_rank=(0, 30)), "RKFAC.adaptive_rank"),
    (lambda: sr.RKFAC(rank=8, adaptive_rank=(2.0, 30)), "RKFAC.adaptive_rank"),
    (lambda: sr.RKFAC(rank=8, adaptive_rank="yes"), "RKFAC.adaptive_rank"),
    (lambda: sr.BKFAC(rank_target=0), "BKFAC.rank_target"),
    (lambda: sr.BKFAC(rank_target=1), "BKFAC.rank_target"),
    (lambda: sr.NystromKFAC(oversample=-1), "NystromKFAC.oversample"),
    (lambda: sr.RKFAC(power_iters=-1), "RKFAC.power_iters"),
    (lambda: sr.BRKFAC(refresh_every=0), "BRKFAC.refresh_every"),
    (lambda: sr.BRKFAC(oversample=-1), "BRKFAC.oversample"),
    (lambda: sr.BKFACC(correct_every=0), "BKFACC.correct_every"),
    (lambda: sr.BKFACC(correct_fraction=0), "BKFACC.correct_fraction"),
    (lambda: sr.BKFACC(correct_fraction=1.5), "BKFACC.correct_fraction"),
    (lambda: sr.KFAC(a="nonsense"), "KFAC.a"),
    (lambda: sr.KFAC(g=sr.SINGD()), "KFAC.g"),
    (lambda: sr.KFAC(a=sr.KFAC(a="eigh")), "KFAC.a"),
    (lambda: sr.BKFAC(g=sr.RKFAC(g="eigh")), "BKFAC.g"),
    (lambda: sr.KFAC(damping_mode="exact", g="cholesky"), "KFAC.g"),
    (lambda: sr.KFAC(damping_mode="exact", a=sr.KFAC(inverse="cholesky")), "KFAC.a"),
    (lambda: sr.BKFAC(inverse_every=0), "BKFAC.inverse_every"),
    (lambda: sr.RKFAC(damping=0.0), "RKFAC.damping"),
    (lambda: sr.Policy.from_dict({"default": {"method": "kfac", "a": {"method": "bkfac", "rank": 0}}}), "BKFAC.rank"),
]


@pytest.mark.parametrize("build, field", BAD_CONFIGS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_CONFIGS)])
def test_bad_config_values_raise_naming_the_field(build, field):
    """Each bad value raises ``ValueError`` whose message starts with ``<Class>.<field> must``."""
    with pytest.raises(ValueError, match=rf"(^|: ){re.escape(field)} must"):
        build()


def test_unknown_keys_of_a_nested_factor_config_are_named():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rnak'\] for method 'bkfac'"):
        sr.Policy.from_dict({"default": {"method": "kfac", "a": {"method": "bkfac", "rnak": 8}}})


# -- 11. every method trains in float32 ----------------------------------------------------------------
def _float32_cnn() -> nn.Sequential:
    return _seeded(lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 5)
    ))


def _float32_mlp() -> nn.Sequential:
    return _seeded(lambda: nn.Sequential(nn.Linear(20, 24), nn.ReLU(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 5)))


TRAIN_METHODS = {
    "rkfac": sr.RKFAC(rank=4, inverse_every=2),
    "srekfac": sr.SREKFAC(rank=4, inverse_every=2),
    "nystromkfac": sr.NystromKFAC(rank=4, inverse_every=2, damping_mode="exact"),
    "bkfac": sr.BKFAC(rank=4),
    "brkfac": sr.BRKFAC(rank=4, refresh_every=3),
    "bkfacc": sr.BKFACC(rank=4, correct_every=3),
}
NETS = {
    "cnn-expand": (_float32_cnn, (3, 6, 6), "expand"),
    "cnn-reduce": (_float32_cnn, (3, 6, 6), "reduce"),
    "mlp": (_float32_mlp, (20,), "expand"),
}


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("name", TRAIN_METHODS)
def test_every_method_trains_in_float32(name, net):
    """Rank 4 on every factor (Brand where rank + rows < dim): 12 steps on a fixed batch of 16 in float32,
    the loss halves, parameters and curvature state stay finite and float32, some factor is low-rank."""
    build, shape, approx = NETS[net]
    method = dataclasses.replace(TRAIN_METHODS[name], kfac_approx=approx)
    x, y = classification_batch(16, shape, 5, dtype=torch.float32)
    model = build()
    opt = sr.Optimizer(model, sr.Policy(method), lr=0.05, momentum=0.9)
    losses = train_steps(model, opt, [(x, y)] * 12)
    assert all(map(math.isfinite, losses))
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    low_rank = (SketchedFactor, BrandFactor)
    assert any(isinstance(f, low_rank) for m in opt.preconditioner.layers.values() for f in m.curvature.factors.values())
    for layer in opt.state_dict()["preconditioner"]["layers"].values():
        for value in layer["curvature"].values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert value.dtype == torch.float32 and torch.isfinite(value).all()
