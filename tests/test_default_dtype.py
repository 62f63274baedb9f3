"""Any default dtype (issue 18): everything runs under ``torch.set_default_dtype(torch.float64)``.

Every test runs with float64 as the default dtype (the `float64_default`
fixture; the previous default is restored afterwards). The oracle is the same
run under the usual float32 default: the package must build every tensor it
makes in the dtype it means (float32 AMP flags and scales, the dtype of the
state it meets), never in the default, so that each trajectory, every
curvature tensor and its dtype are bit-identical whatever the default. Models
are built and batches drawn with explicit dtypes under the float32 default, so
both runs start from the same numbers.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch
from torch import nn

import singd_rkfac as sr
from singd_rkfac import amp
from conftest import cnn, mlp
from precision._common import assert_params_equal, assert_same_state, flat_state, params_of, wide_mlp

pytestmark = pytest.mark.usefixtures("one_thread", "float64_default")

STEPS = 6
OPTIONS = {"lr": 0.05, "momentum": 0.5, "weight_decay": 1e-4}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """``torch.set_default_dtype(dtype)`` inside the block; the previous default is restored, also on errors."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture
def float64_default():
    """float64 as the default dtype for one test (restored after it, pass or fail)."""
    with default_dtype(torch.float64):
        yield


# -- tiny models, built under the float32 default ----------------------------------------------------------
class TinyTransformer(nn.Module):
    """Tokens ``(N, T)`` → embedding → causal single-head attention (Linear q, k, v, o) → LayerNorm → MLP → logits ``(N, T, V)``."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = q @ k.transpose(-1, -2) / math.sqrt(x.shape[-1])
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        x = x + self.o(scores.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v)
        x = x + self.mlp(self.norm(x))
        return self.head(x)


def embedding_mlp() -> nn.Module:
    """Tokens ``(N,)`` → Embedding(11, 6) → tanh → Linear(6, 4)."""
    return nn.Sequential(nn.Embedding(11, 6), nn.Tanh(), nn.Linear(6, 4))


#: name → (builder, batch maker); every batch is drawn with explicit dtypes.
MODELS = {
    "mlp": (mlp, lambda: (torch.randn(8, 6, dtype=torch.float32), torch.randint(0, 3, (8,)))),
    "wide": (wide_mlp, lambda: (torch.randn(6, 24, dtype=torch.float32), torch.randint(0, 3, (6,)))),
    "cnn": (lambda: cnn(padding=1), lambda: (torch.randn(6, 2, 8, 8, dtype=torch.float32), torch.randint(0, 4, (6,)))),
    "embedding": (embedding_mlp, lambda: (torch.randint(0, 11, (8,)), torch.randint(0, 4, (8,)))),
    "transformer": (TinyTransformer, lambda: (torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (3, 5)))),
}


def build(model: str, dtype: torch.dtype = torch.float64):
    """The model (seed 0) in ``dtype`` and one fixed batch (floating inputs in ``dtype``), under the float32 default."""
    maker, batch = MODELS[model]
    with default_dtype(torch.float32):
        torch.manual_seed(0)
        net = maker().to(dtype)
        x, y = batch()
    return net, (x.to(dtype) if x.is_floating_point() else x, y)


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    out = model(batch[0])
    return nn.functional.cross_entropy(out.flatten(0, -2).float(), batch[1].flatten())


def train(initial: nn.Module, batch, policy, *, default: torch.dtype, loop: str = "plain", steps: int = STEPS,
          scaled: bool = True, autocast: torch.dtype | None = None, **options):
    """``steps`` full-batch steps on a copy of ``initial`` under the default ``default``.

    ``loop``: ``"plain"`` (``opt.step()``), ``"scaler"`` (``scaler.step(opt)``),
    ``"unscale"`` (``scaler.unscale_(opt)``, gradient clipping, ``scaler.step``),
    ``"preconditioner"`` (`sr.Preconditioner` + ``torch.optim.SGD``, with a scaler unless
    ``scaled=False``).
    Returns the model, the optimizer (or preconditioner), the losses and the scaler.
    """
    with default_dtype(default):
        model = copy.deepcopy(initial)
        policy = policy if isinstance(policy, sr.Policy) else sr.Policy(policy)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1) if loop != "plain" and scaled else None
        options = {**OPTIONS, **options}
        if loop == "preconditioner":
            owner = sr.Preconditioner(model, policy, grad_scaler=scaler)
            options.pop("weight_decay")
            options["lr"] /= 5  # no KL clip here
            opt = torch.optim.SGD(model.parameters(), **options)
        else:
            owner = opt = sr.Optimizer(model, policy, grad_scaler=scaler if loop == "unscale" else None, **options)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                loss = loss_of(model, batch)
            losses.append(loss.item())
            (loss if scaler is None else scaler.scale(loss)).backward()
            if loop == "unscale":
                if scaler is not None:
                    scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), 1e30)  # a no-op clip: exact
            if loop == "preconditioner":
                assert owner.step()
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
    return model, owner, losses, scaler


def curvature_dtypes(pre: sr.Preconditioner) -> dict[str, set[torch.dtype]]:
    """The floating dtypes of each managed layer's curvature state."""
    return {
        name: {t.dtype for t in m.curvature.state_dict().values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
        for name, m in pre.layers.items()
    }


def assert_same_run(got, want) -> None:
    """Two `train` results agree bit for bit: losses, parameters (and their dtypes), the whole optimizer state."""
    (model, owner, losses, _), (ref_model, ref_owner, ref_losses, _) = got, want
    assert losses == ref_losses
    assert_params_equal(params_of(model), params_of(ref_model))
    assert_same_state(flat_state(owner.state_dict()), flat_state(ref_owner.state_dict()))


def assert_trains(losses: list[float]) -> None:
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], losses


# -- the AMP helpers themselves -----------------------------------------------------------------------------
def test_amp_helpers_build_float32_flags_and_scales():
    """The fused unscale kernel demands float32 flags and scales: the helpers build them so
    (they used to follow the default dtype and raise ``inv_scale must be a float tensor``)."""
    grads = [torch.full((3,), 4.0, dtype=torch.float64), torch.ones(2, dtype=torch.bfloat16)]
    found = amp.unscale_and_check_(grads, torch.tensor([0.25], dtype=torch.float64))
    assert found.dtype == torch.float32 and found.item() == 0.0
    assert torch.equal(grads[0], torch.ones(3, dtype=torch.float64)) and torch.equal(grads[1], torch.full((2,), 0.25, dtype=torch.bfloat16))
    grads[0][1] = float("inf")
    assert amp.unscale_and_check_(grads).item() > 0  # no scale given: a float32 ``1``
    empty = amp.unscale_and_check_([])
    assert empty.dtype == torch.float32 and empty.item() == 0.0
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**7)  # no backward yet: the scale the next one will use
    assert amp.loss_scale(scaler).dtype == torch.float32 and amp.loss_scale(scaler).item() == 2.0**7
    assert amp.inverse_scale(scaler).dtype == torch.float32 and amp.inverse_scale(scaler).item() == 2.0**-7


# -- every method on a float64 model: the same trajectory under either default -------------------------------
STRUCTURES = ["dense", "diagonal", "block", "lowrank", "hierarchical", "toeplitz"]
#: id → (model, policy or method, extra optimizer options)
CASES = {
    "kfac-pi-eigh": ("mlp", sr.KFAC(inverse_every=1), {}),
    "kfac-exact-eigh": ("mlp", sr.KFAC(damping_mode="exact", inverse_every=2), {}),
    "kfac-pi-cholesky": ("mlp", sr.KFAC(inverse="cholesky", inverse_every=1), {}),
    "rkfac": ("wide", sr.RKFAC(rank=4, oversample=2, inverse_every=2), {}),
    "srekfac": ("wide", sr.SREKFAC(rank=4, oversample=2, inverse_every=2), {}),
    "nystrom": ("wide", sr.NystromKFAC(rank=4, oversample=2, inverse_every=2), {}),
    "bkfac": ("wide", sr.BKFAC(rank=4), {}),
    "brkfac": ("wide", sr.BRKFAC(rank=4, refresh_every=2), {}),
    "bkfacc": ("wide", sr.BKFACC(rank=4, correct_every=2), {}),
    **{f"singd-{s}": ("mlp", sr.SINGD(structure=s, update_every=1, lr_cov=0.05), {}) for s in STRUCTURES},
    **{f"singd-{s}-bf16": ("mlp", sr.SINGD(structure=s, update_every=1, lr_cov=0.05, dtype=torch.bfloat16), {})
       for s in STRUCTURES},
    "seng": ("mlp", sr.SENG(update_every=2), {}),
    "seng-sketch": ("mlp", sr.SENG(sketch_size=3), {}),
    "kfac+two-level": ("mlp", sr.KFAC(inverse_every=1), {"two_level": sr.TwoLevel(update_every=2)}),
    "kfac+two-level-residual": ("mlp", sr.KFAC(inverse_every=1), {"two_level": sr.TwoLevel(coarse="residual")}),
    "kfac+adamw-fallback+clip": ("mlp", sr.Policy(sr.KFAC(inverse_every=1), rules=[("4", sr.Skip())]),
                                 {"fallback": "adamw", "clip": 1e-3}),
    "cnn-kfac": ("cnn", sr.KFAC(inverse_every=2), {}),
    "cnn-singd-bf16": ("cnn", sr.SINGD(structure="block", block_size=4, update_every=1, dtype=torch.bfloat16), {}),
    "cnn-bkfac": ("cnn", sr.BKFAC(rank=3), {}),
    "embedding-kfac": ("embedding", sr.KFAC(inverse_every=1), {}),
    "embedding-singd": ("embedding", sr.SINGD(structure="diagonal", update_every=1), {}),
    "transformer-kfac-expand": ("transformer", sr.KFAC(inverse_every=2), {}),
    "transformer-kfac-reduce": ("transformer", sr.Policy(sr.KFAC(kfac_approx="reduce", inverse_every=2),  # an embedding expands
                                                         rules=[("embed", sr.KFAC(inverse_every=2))]), {}),
    "transformer-singd-bf16": ("transformer", sr.SINGD(structure="dense", update_every=1, dtype=torch.bfloat16), {}),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64-model", "float32-model"])
@pytest.mark.parametrize("case", CASES)
def test_model_trains_identically_under_either_default(case, dtype):
    """Bit-identical to the float32-default run; the loss falls; parameters, momenta and
    curvature state keep their dtypes (the parameter dtype, or SINGD's bf16 ``dtype``):
    a float32 model under the float64 default gets no float64 state."""
    name, policy, options = CASES[case]
    initial, batch = build(name, dtype)
    got = train(initial, batch, policy, default=torch.float64, **options)
    want = train(initial, batch, policy, default=torch.float32, **options)
    assert_same_run(got, want)
    model, opt, losses, _ = got
    assert_trains(losses)
    assert opt.preconditioner.skipped_steps == 0 and opt.preconditioner.steps == STEPS
    assert all(p.dtype == dtype for p in model.parameters())
    for buffers in opt.state.values():  # momenta / AdamW moments in the parameter dtype, AdamW's step counter float32
        assert buffers and all(t.dtype == (torch.float32 if k == "step" else dtype) for k, t in buffers.items())
    method = policy.default if isinstance(policy, sr.Policy) else policy
    state = getattr(method, "dtype", None) or dtype
    assert opt.preconditioner.layers and all(d == {state} for d in curvature_dtypes(opt.preconditioner).values())


# -- AMP: GradScaler loops and bf16 autocast -------------------------------------------------------------------
AMP_CASES = {
    "kfac": ("mlp", sr.KFAC(inverse_every=1)),
    "singd-bf16": ("mlp", sr.SINGD(structure="hierarchical", update_every=1, lr_cov=0.05, dtype=torch.bfloat16)),
    "srekfac": ("wide", sr.SREKFAC(rank=4, oversample=2, inverse_every=1)),
    "bkfac": ("wide", sr.BKFAC(rank=4)),
    "seng": ("mlp", sr.SENG()),
    "transformer-kfac": ("transformer", sr.KFAC(inverse_every=1)),
}


@pytest.mark.parametrize("loop", ["scaler", "unscale", "preconditioner"])
@pytest.mark.parametrize("case", AMP_CASES)
def test_grad_scaler_loop_equals_the_unscaled_run_under_a_float64_default(case, loop):
    """``scaler.step(opt)``, the ``scaler.unscale_(opt)`` clipping path and `sr.Preconditioner`
    + SGD: the scale doubles every step and is removed exactly, so the run equals the
    unscaled float64-default run and the float32-default scaled run bit for bit."""
    name, method = AMP_CASES[case]
    initial, batch = build(name)
    got = train(initial, batch, method, default=torch.float64, loop=loop)
    assert_same_run(got, train(initial, batch, method, default=torch.float32, loop=loop))
    plain = train(initial, batch, method, default=torch.float64, loop=loop, scaled=False)
    assert plain[2] == got[2]
    assert_params_equal(params_of(got[0]), params_of(plain[0]))
    model, owner, losses, scaler = got
    assert_trains(losses)
    assert scaler.get_scale() == 2.0 ** (10 + STEPS)  # no step overflowed, every step scaled differently
    pre = owner if isinstance(owner, sr.Preconditioner) else owner.preconditioner
    assert pre.skipped_steps == 0 and pre.steps == STEPS
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_overflow_under_a_float64_default_skips_the_step():
    """An inf loss under the scaler: the float32 found-inf flag is set, the step is skipped,
    nothing changes and the scale backs off."""
    initial, batch = build("mlp")
    model, opt, _, scaler = train(initial, batch, sr.KFAC(inverse_every=1), default=torch.float64, loop="scaler", steps=2)
    before = flat_state(opt.state_dict())
    weights, scale = params_of(model), scaler.get_scale()
    opt.zero_grad()
    scaler.scale(loss_of(model, batch) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.preconditioner.skipped_steps == 1 and scaler.get_scale() == scale / 2
    assert_params_equal(params_of(model), weights)
    assert_same_state(flat_state(opt.state_dict()), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bf16_autocast_under_a_float64_default(dtype):
    """CPU bf16 autocast: bit-identical to the float32-default run; K-FAC factors fp32 at
    least (the parameter dtype), SINGD state bf16, parameters keep their dtype."""
    initial, batch = build("mlp", dtype)
    policy = sr.Policy(sr.KFAC(inverse_every=1), rules=[("4", sr.SINGD(structure="dense", update_every=1, dtype=torch.bfloat16))])
    got = train(initial, batch, policy, default=torch.float64, autocast=torch.bfloat16)
    assert_same_run(got, train(initial, batch, policy, default=torch.float32, autocast=torch.bfloat16))
    model, opt, losses, _ = got
    assert_trains(losses)
    assert all(p.dtype == dtype for p in model.parameters())
    assert curvature_dtypes(opt.preconditioner) == {"0": {dtype}, "2": {dtype}, "4": {torch.bfloat16}}


# -- checkpoints ---------------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_under_a_float64_default_resumes_bit_for_bit():
    """``torch.save`` / ``torch.load(weights_only=True)`` mid-run: the resumed run equals the
    uninterrupted one, and every state tensor keeps its dtype (float64 K-FAC, bf16 SINGD,
    float64 AdamW moments of the fallback layer; float32 step counters)."""
    initial, batch = build("cnn")
    policy = sr.Policy(sr.KFAC(inverse_every=2), rules=[("0", sr.SINGD(structure="diagonal", update_every=1, dtype=torch.bfloat16)),
                                                         ("3", sr.Skip())])
    options = {"fallback": "adamw"}
    uninterrupted, *_ = train(initial, batch, policy, default=torch.float64, **options)

    model, opt, first, _ = train(initial, batch, policy, default=torch.float64, steps=3, **options)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    fresh = copy.deepcopy(initial)
    fresh.load_state_dict(checkpoint["model"])
    fresh_opt = sr.Optimizer(fresh, policy, **OPTIONS, **options)
    fresh_opt.load_state_dict(checkpoint["optimizer"])
    assert_same_state(flat_state(fresh_opt.state_dict()), flat_state(opt.state_dict()))
    dtypes = {t.dtype for t in flat_state(fresh_opt.state_dict()).values() if isinstance(t, torch.Tensor)}
    assert {torch.float64, torch.bfloat16, torch.float32} <= dtypes
    assert curvature_dtypes(fresh_opt.preconditioner) == {"0": {torch.bfloat16}}
    for _ in range(STEPS - 3):
        fresh_opt.zero_grad()
        loss_of(fresh, batch).backward()
        fresh_opt.step()
    assert_params_equal(params_of(fresh), params_of(uninterrupted))


# -- the user report, end to end -----------------------------------------------------------------------------------
def test_model_and_data_made_under_a_float64_default_train_with_a_grad_scaler():
    """The report: nothing given a dtype, float64 by default; every step used to raise
    ``inv_scale must be a float tensor``. Now it trains and nothing is skipped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    assert x.dtype == torch.float64 and all(p.dtype == torch.float64 for p in model.parameters())
    opt = sr.Optimizer(model, sr.Policy(sr.KFAC(), rules=[("2", sr.SINGD(dtype=torch.bfloat16))]), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert_trains(losses)
    assert opt.preconditioner.skipped_steps == 0
    assert curvature_dtypes(opt.preconditioner) == {"0": {torch.float64}, "2": {torch.bfloat16}}
