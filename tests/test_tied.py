"""Tied weights: one Kronecker pair for the sum of the uses' curvatures (`singd_rkfac.curvature.tied`).

The oracle is the untied twin of a tied model — the embedding as a bias-free
``nn.Linear`` on one-hot inputs and the head as its own ``nn.Linear``, both
holding the shared matrix — whose per-use K-FAC factors curvlinops computes
(float64). From them, the summed curvature ``F = A_e ⊗ G_e + (G_h ⊗ A_h)`` laid
out on the embedding's ``dim × vocab`` matrix is formed densely and solved
exactly; the trace-weighted mixture is computed from the same factors
independently of the package.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import singd_rkfac as sr
from conftest import backward_and_step
from singd_rkfac.curvature import BatchCounts, KFACCurvature
from singd_rkfac.curvature.tied import TiedCounts, TiedCurvature
from singd_rkfac.layers import LayerDims, LinearLayer
from singd_rkfac.layers.tied import TiedUse

curvlinops = pytest.importorskip("curvlinops")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, DIM, POSITIONS, BATCH = 7, 3, 4, 6


class TiedClassifier(nn.Module):
    """Tokens ``(N, T)`` → embedding → mean over positions → tanh Linear → head tied to the embedding → ``VOCAB`` logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens).mean(1))))


class Untied(nn.Module):
    """The same function with the embedding as a Linear on one-hot inputs (weight ``Eᵀ``) and a separate head (``E``)."""

    def __init__(self, tied: TiedClassifier) -> None:
        super().__init__()
        self.embed = nn.Linear(VOCAB, DIM, bias=False).double()
        self.mix = copy.deepcopy(tied.mix)
        self.head = nn.Linear(DIM, VOCAB, bias=False).double()
        with torch.no_grad():
            self.embed.weight.copy_(tied.embed.weight.T)
            self.head.weight.copy_(tied.embed.weight)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(F.one_hot(tokens, VOCAB).double()).mean(1))))


def _batch():
    return torch.randint(0, VOCAB, (BATCH, POSITIONS)), torch.randint(0, VOCAB, (BATCH,))


def _gradients(model, batch) -> None:
    model.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()


def _use_factors(twin: Untied, batch):
    """Per use, ``(input-side factor, output-side factor)`` on the embedding's ``DIM × VOCAB`` layout."""
    oracle = curvlinops.KFACLinearOperator(
        twin, nn.CrossEntropyLoss(), list(twin.parameters()), [batch], fisher_type="empirical",
        kfac_approx="expand", separate_weight_and_bias=False, check_deterministic=False,
    )
    oracle.compute_kronecker_factors()
    a, g = oracle._input_covariances, oracle._gradient_covariances
    # the embedding's A is VOCAB × VOCAB (input side), G DIM × DIM; the head is flipped: G_h on the input side
    return [(a["embed"], g["embed"]), (g["head"], a["head"])]


def _mixture(uses):
    """The trace-weighted mixture, written out: ``A = Σ g_u A_u / √W``, ``G = Σ a_u G_u / √W``."""
    means = [(a.trace() / a.shape[0], g.trace() / g.shape[0]) for a, g in uses]
    root = sum(ma * mg for ma, mg in means).sqrt()
    a = sum(mg * a for (a, _), (_, mg) in zip(uses, means)) / root
    g = sum(ma * g for (_, g), (ma, _) in zip(uses, means)) / root
    return a, g


def _exact_direction(curvature: torch.Tensor, grad: torch.Tensor, damping: float) -> torch.Tensor:
    """``(F + λI)⁻¹ vec ∇`` for a dense ``F`` on the row-major ``vec`` of ``grad``."""
    eye = torch.eye(curvature.shape[0], dtype=curvature.dtype)
    return torch.linalg.solve(curvature + damping * eye, grad.reshape(-1)).reshape(grad.shape)


def _summed_kron(uses) -> torch.Tensor:
    """``Σ_u A_u ⊗ G_u`` acting on row-major ``vec`` of ``DIM × VOCAB`` matrices: ``Σ G_u ⊗ A_u`` (torch.kron)."""
    return sum(torch.kron(g, a) for a, g in uses)


def _tied_model_and_batch():
    torch.manual_seed(3)
    model = TiedClassifier().double()
    return model, Untied(model), _batch()


def test_the_tied_weight_is_managed_once_and_its_uses_resolve_to_the_method():
    model = TiedClassifier()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tie the rule covers warns about nothing
        opt = sr.Optimizer(model, sr.Policy(sr.KFAC()), lr=0.1)
    assert set(opt.preconditioner.layers) == {"embed", "mix"}
    assert sr.Policy(sr.KFAC()).resolve(model) == {"embed": sr.KFAC(), "mix": sr.KFAC(), "head": sr.KFAC()}
    assert opt.preconditioner.fallback_parameters() == []
    text = opt.describe()
    assert "tied(EmbeddingLayer, LinearLayer)" in text and "tied to 'embed'" in text


@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_direction_is_the_mixture_of_the_uses_curvlinops_factors(mode):
    damping = 1e-2
    model, twin, batch = _tied_model_and_batch()
    a, g = _mixture(_use_factors(twin, batch))
    pre = sr.Preconditioner(model, sr.Policy(sr.KFAC(damping=damping, damping_mode=mode)))
    _gradients(model, batch)
    grad = model.embed.weight.grad.T.clone()  # the sum of both uses' gradients, DIM × VOCAB
    pre.step()
    curvature = pre.layers["embed"].curvature.inner
    torch.testing.assert_close(curvature.a_factor.value, a, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(curvature.g_factor.value, g, rtol=1e-10, atol=1e-13)
    if mode == "exact":
        expected = _exact_direction(torch.kron(g, a), grad, damping)
    else:
        pi = torch.sqrt((a.trace() / VOCAB) / (g.trace() / DIM))
        eye_a, eye_g = torch.eye(VOCAB, dtype=a.dtype), torch.eye(DIM, dtype=g.dtype)
        root = damping**0.5
        expected = torch.linalg.solve(g + root / pi * eye_g, grad) @ torch.linalg.inv(a + pi * root * eye_a)
    torch.testing.assert_close(model.embed.weight.grad.T, expected, rtol=1e-8, atol=1e-11)


def test_mixture_is_closer_to_the_exact_summed_solve_than_either_use_alone():
    damping = 1e-2
    model, twin, batch = _tied_model_and_batch()
    uses = _use_factors(twin, batch)
    pre = sr.Preconditioner(model, sr.Policy(sr.KFAC(damping=damping, damping_mode="exact")))
    _gradients(model, batch)
    grad = model.embed.weight.grad.T.clone()
    pre.step()
    exact = _exact_direction(_summed_kron(uses), grad, damping)

    def error(direction):
        return float((direction - exact).norm() / exact.norm())

    ours = error(model.embed.weight.grad.T)
    alone = [error(_exact_direction(_summed_kron([use]), grad, damping)) for use in uses]
    assert ours < min(alone), (ours, alone)


def test_mixture_is_exact_when_the_uses_share_their_output_side():
    # two uses of one 3 → 4 Linear weight whose output rows agree up to scale: G_2 ∝ G_1, so
    # F = A_1 ⊗ G_1 + A_2 ⊗ G_2 is a Kronecker product and the mixture must be it
    torch.manual_seed(0)
    damping = 1e-3
    linears = [nn.Linear(3, 4, bias=False).double() for _ in range(2)]
    linears[1].weight = linears[0].weight
    inner = KFACCurvature(sr.KFAC(damping=damping, damping_mode="exact", inverse_every=1),
                          LayerDims(d_a=3, d_g=4, has_bias=False), device=torch.device("cpu"), dtype=torch.float64,
                          name="w", max_failures=3)
    tied = TiedCurvature(inner, [TiedUse(str(i), LinearLayer(m), flipped=False) for i, m in enumerate(linears)])
    inputs = [torch.randn(6, 3, dtype=torch.float64), 3 * torch.randn(6, 3, dtype=torch.float64)]
    g = torch.randn(6, 4, dtype=torch.float64)
    outputs = [g, 0.5 * g]
    for i in range(2):
        tied.stage(i, inputs[i], outputs[i])
    counts = BatchCounts(rows=6, samples=6)
    tied.update(0, TiedCounts(rows=12, samples=6, uses=(counts, counts)))
    per_use = [(x.T @ x / 6, 6 * y.T @ y) for x, y in zip(inputs, outputs)]  # A = aᵀa/rows, G = N·gᵀg
    grad = torch.randn(4, 3, dtype=torch.float64)
    expected = _exact_direction(_summed_kron(per_use), grad, damping)
    torch.testing.assert_close(tied.precondition(grad), expected, rtol=1e-9, atol=1e-12)


class TiedLM(nn.Module):
    """A sequence model whose head shares the embedding: ``(N, T)`` tokens → ``(N, T, VOCAB)`` logits."""

    def __init__(self, vocab: int = 12, dim: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=True)  # its own bias is not shared: fallback rule
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def _lm_losses(model, opt, steps: int = 25, scaler=None):
    torch.manual_seed(1)
    vocab = model.embed.num_embeddings
    losses = []
    for _ in range(steps):
        x = torch.randint(0, vocab, (8, 6))
        opt.zero_grad()
        loss = F.cross_entropy(model(x).reshape(-1, vocab), ((x + 1) % vocab).reshape(-1))
        backward_and_step(loss, opt, scaler)
        losses.append(loss.item())
    return losses


METHODS = {
    "kfac": sr.KFAC(),
    "default": None,
    "diagonal-kfac": sr.DiagonalKFAC(),
    "srekfac": sr.SREKFAC(rank=4),
    "bkfac": sr.BKFAC(rank=3),
    "singd-diagonal": sr.SINGD(structure="diagonal"),
    "singd-dense-bf16": sr.SINGD(dtype=torch.bfloat16),
}


@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
def test_tied_lm_trains_with_every_kind_of_method(method):
    torch.manual_seed(0)
    model = TiedLM()
    opt = sr.Optimizer(model, sr.Policy(method), lr=0.1, fallback="adamw", fallback_options={"lr": 1e-2})
    assert set(opt.preconditioner.layers) == {"embed", "mix"}
    assert opt.preconditioner.fallback_parameters() == [model.head.bias]
    losses = _lm_losses(model, opt)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert sum(losses[-5:]) < sum(losses[:5]) - 1.0
    state = opt.preconditioner.layers["embed"].curvature.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point())


def test_tied_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    opt = sr.Optimizer(model, sr.Policy(sr.KFAC(inverse_every=3)), lr=0.1)
    _lm_losses(model, opt, steps=4)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    resumed = TiedLM()
    resumed_opt = sr.Optimizer(resumed, sr.Policy(sr.KFAC(inverse_every=3)), lr=0.1)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed.head.weight is resumed.embed.weight
    assert _lm_losses(resumed, resumed_opt, steps=5) == _lm_losses(model, opt, steps=5)


def test_tied_weights_under_a_grad_scaler_stay_finite():
    torch.manual_seed(0)
    model = TiedLM()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    opt = sr.Optimizer(model, sr.Policy(sr.KFAC()), lr=0.1, grad_scaler=scaler)
    reference_model = TiedLM()
    reference_model.load_state_dict(model.state_dict())
    reference = sr.Optimizer(reference_model, sr.Policy(sr.KFAC()), lr=0.1)
    scaled, plain = _lm_losses(model, opt, steps=6, scaler=scaler), _lm_losses(reference_model, reference, steps=6)
    torch.testing.assert_close(torch.tensor(scaled), torch.tensor(plain), rtol=1e-4, atol=1e-5)  # scales are powers of 2


class TwoLinears(nn.Module):
    """Two 4 → 4 Linear layers in a row sharing their ``"weight"`` or their ``"bias"``."""

    def __init__(self, shared: str) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        setattr(self.b, shared, getattr(self.a, shared))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize(
    "model,policy,reason",
    [
        (TwoLinears("weight"), sr.Policy(sr.SENG()), "keeps per-sample gradients"),
        (TiedLM(), sr.Policy(sr.SENG()), r"Embedding supports the row layout\(s\) 'expand' only"),
        (TwoLinears("bias"), sr.Policy(sr.KFAC()), "a parameter other than its weight is shared"),
    ],
    ids=["seng", "seng-embedding", "shared-bias"],
)
def test_ties_the_rule_cannot_cover_fall_back_with_one_warning_saying_why(model, policy, reason):
    with pytest.warns(UserWarning, match=reason) as record:
        opt = sr.Optimizer(model, policy, lr=0.1)
    assert len([w for w in record if "fallback rule" in str(w.message)]) == 1
    shared = {id(p) for p in model.parameters()} - {id(p) for p in opt.preconditioner.managed_parameters().get("mix", [])}
    assert shared <= {id(p) for p in opt.preconditioner.fallback_parameters()}


def test_skipping_the_first_use_leaves_the_tied_weight_to_the_fallback_silently():
    model = TiedLM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = sr.Optimizer(model, sr.Policy(sr.KFAC(), rules=[("embed", sr.Skip())]), lr=0.1)
    assert set(opt.preconditioner.layers) == {"mix"}
    assert "skipped by policy; shared with 'head'" in opt.describe()


def test_a_dense_vocabulary_factor_asked_for_explicitly_warns_before_it_is_allocated(monkeypatch):
    # a 40 000-token tied head with dense K-FAC: A alone would be 40 000² fp32 values (and as much again for its inverse)
    model = TiedLM(vocab=40_000, dim=2)
    zeros = torch.zeros

    def refuse_huge(*shape, **kwargs):  # no 12 GiB on a test machine: the allocation fails, after the warning
        dims = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        if len(dims) == 2 and dims[0] * dims[1] > 10**8:
            raise RuntimeError("refused: a 40 000² factor")
        return zeros(*shape, **kwargs)

    monkeypatch.setattr(torch, "zeros", refuse_huge)
    with pytest.warns(UserWarning, match=r"more than 1 GiB of curvature state each: embed \(.*kfac: 11\.9 GiB\)"):
        with pytest.raises(RuntimeError, match="refused"):
            sr.Optimizer(model, sr.Policy(sr.KFAC()), lr=0.1)
    monkeypatch.undo()
    text = sr.Policy().describe(model)  # the default keeps it linear: diagonal on the 40 000 side
    assert "A: diagonal (auto: width 40000 > 8192)" in text
