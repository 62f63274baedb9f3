"""``nn.Embedding``: the K-FAC / SINGD of the equivalent Linear on one-hot inputs, with a diagonal A.

The oracle is the same network with the embedding replaced by a bias-free
``nn.Linear(vocab, dim)`` (weight ``Eᵀ``) applied to one-hot vectors, in
float64: its dense ``A`` is exactly diagonal, so the embedding's diagonal ``A``
must reproduce its factors (curvlinops), its preconditioned gradients and its
training trajectory.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import singd_rkfac as sr
from singd_rkfac.layers import EmbeddingLayer

curvlinops = pytest.importorskip("curvlinops")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, DIM, CLASSES = 11, 4, 3


class OneHot(nn.Module):
    """Token indices → float64 one-hot vectors (the oracle's input side)."""

    def forward(self, x):
        return F.one_hot(x, VOCAB).double()


def embedding_net(positions: int, dim: int = DIM, **embedding_kwargs) -> nn.Sequential:
    """Embedding → tanh → flatten → Linear: tokens ``(N,)`` or ``(N, positions)`` to ``CLASSES`` logits."""
    flat = dim * max(positions, 1)
    return nn.Sequential(nn.Embedding(VOCAB, dim, **embedding_kwargs), nn.Tanh(), nn.Flatten(), nn.Linear(flat, CLASSES)).double()


def one_hot_twin(net: nn.Sequential) -> nn.Sequential:
    """The same function with the embedding as a bias-free Linear on one-hot inputs (weight ``Eᵀ``)."""
    linear = nn.Linear(VOCAB, net[0].embedding_dim, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(net[0].weight.T)
    return nn.Sequential(nn.Sequential(OneHot(), linear), *copy.deepcopy(net[1:]))


def tokens(n: int, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (n, positions) if positions else (n,)
    return torch.randint(0, VOCAB, shape), torch.randint(0, CLASSES, (n,))


def _gradients(model, batch) -> None:
    model.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()


SHAPES = {"one-token": 0, "sequence": 3}


def test_rows_are_the_one_hot_gram_diagonal_and_the_gradient_is_transposed():
    module = nn.Embedding(VOCAB, DIM).double()
    layer = EmbeddingLayer(module)
    assert (layer.dims.d_a, layer.dims.d_g, layer.dims.has_bias, layer.dims.diagonal_a) == (VOCAB, DIM, False, True)
    x = torch.randint(0, VOCAB, (5, 7))
    rows = layer.input_features(x).reshape(-1, VOCAB).double()
    torch.testing.assert_close(layer.input_rows(x, "expand", torch.float64), (rows.T @ rows).diagonal())
    module.weight.grad = torch.randn_like(module.weight)
    mat = layer.grad_matrix().clone()
    assert mat.shape == (DIM, VOCAB) and torch.equal(mat, module.weight.grad.T)
    layer.write_grad(2 * mat)
    torch.testing.assert_close(module.weight.grad, 2 * mat.T)


@pytest.mark.parametrize("positions", SHAPES.values(), ids=SHAPES.keys())
def test_factors_equal_curvlinops_on_the_one_hot_linear(positions):
    net = embedding_net(positions)
    twin = one_hot_twin(net)
    batch = tokens(9, positions)
    oracle = curvlinops.KFACLinearOperator(
        twin, nn.CrossEntropyLoss(), list(twin.parameters()), [batch], fisher_type="empirical",
        kfac_approx="expand", separate_weight_and_bias=False, check_deterministic=False,
    )
    oracle.compute_kronecker_factors()
    dense_a = oracle._input_covariances["0.1"]
    assert torch.equal(dense_a, torch.diag(dense_a.diagonal()))  # one-hot inputs: A is exactly diagonal
    pre = sr.Preconditioner(net, sr.Policy(sr.KFAC()))
    _gradients(net, batch)
    pre.step()
    curvature = pre.layers["0"].curvature
    assert curvature.a_factor.value.shape == (VOCAB,)  # d numbers, not d²
    torch.testing.assert_close(curvature.a_factor.value, dense_a.diagonal(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(curvature.g_factor.value, oracle._gradient_covariances["0.1"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pre.layers["3"].curvature.g_factor.value, oracle._gradient_covariances["3"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["exact", "pi"])
@pytest.mark.parametrize("positions", SHAPES.values(), ids=SHAPES.keys())
def test_preconditioned_gradient_equals_curvlinops_inverse(positions, mode):
    damping = 1e-2
    net = embedding_net(positions)
    twin = one_hot_twin(net)
    batch = tokens(9, positions)
    params = list(twin.parameters())
    oracle = curvlinops.KFACLinearOperator(
        twin, nn.CrossEntropyLoss(), params, [batch], fisher_type="empirical", kfac_approx="expand",
        separate_weight_and_bias=False, check_deterministic=False,
    )
    inverse = curvlinops.KFACInverseLinearOperator(
        oracle, damping=damping, use_exact_damping=mode == "exact", use_heuristic_damping=mode == "pi", min_damping=1e-30,
    )
    _gradients(twin, batch)
    expected = inverse @ [p.grad.clone() for p in params]
    pre = sr.Preconditioner(net, sr.Policy(sr.KFAC(damping=damping, damping_mode=mode)))
    _gradients(net, batch)
    pre.step()
    torch.testing.assert_close(net[0].weight.grad, expected[0].T, rtol=1e-9, atol=1e-12)
    for param, reference in zip(list(net.parameters())[1:], expected[1:]):
        torch.testing.assert_close(param.grad, reference, rtol=1e-9, atol=1e-12)


def test_padding_idx_row_stays_zero_and_the_other_columns_match_the_one_hot_linear():
    """torch gives the padding row no gradient; its positions still count as tokens (as in the one-hot Linear)."""
    net = embedding_net(3, padding_idx=0)
    twin = one_hot_twin(net)
    x, y = tokens(9, 3)
    x[:, 0] = 0  # padding in every sample
    directions = []
    for model in (net, twin):
        pre = sr.Preconditioner(model, sr.Policy(sr.KFAC(damping=1e-2, damping_mode="exact")))
        _gradients(model, (x, y))
        pre.step()
        directions.append(model[0].weight.grad if model is net else model[0][1].weight.grad.T)
    ours, oracle = directions
    assert torch.equal(ours[0], torch.zeros(DIM, dtype=torch.float64))
    assert oracle[0].abs().sum() > 0  # the one-hot Linear does train that column
    torch.testing.assert_close(ours[1:], oracle[1:], rtol=1e-10, atol=1e-13)


def test_max_norm_renormalises_before_the_lookup_and_the_factors_follow_the_used_weight():
    net = embedding_net(3, max_norm=0.5)
    x, y = tokens(9, 3)
    with torch.no_grad():
        net[0].weight.mul_(3.0)  # rows well above max_norm
    pre = sr.Preconditioner(net, sr.Policy(sr.KFAC(damping_mode="exact")))
    _gradients(net, (x, y))  # renormalises the looked-up rows in place, then looks them up
    plain = embedding_net(3)
    plain.load_state_dict(net.state_dict())  # the renormalised weights, no max_norm
    reference = sr.Preconditioner(plain, sr.Policy(sr.KFAC(damping_mode="exact")))
    _gradients(plain, (x, y))
    pre.step()
    reference.step()
    for name in ("0", "3"):
        for side in ("a_factor", "g_factor"):
            torch.testing.assert_close(getattr(pre.layers[name].curvature, side).value,
                                       getattr(reference.layers[name].curvature, side).value, rtol=1e-12, atol=1e-15)
    for got, want in zip(net.parameters(), plain.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-15)



class TwoStreams(nn.Module):
    """One embedding (or its one-hot Linear) looked up for two token streams per sample."""

    def __init__(self, embed: nn.Module) -> None:
        super().__init__()
        self.embed = embed
        self.head = nn.Linear(2 * DIM, CLASSES)

    def forward(self, x):
        return self.head(torch.cat([torch.tanh(self.embed(x[:, 0])), torch.tanh(self.embed(x[:, 1]))], dim=1))


def test_embedding_called_twice_adds_both_calls_like_the_one_hot_linear():
    net = TwoStreams(nn.Embedding(VOCAB, DIM)).double()
    twin = TwoStreams(nn.Sequential(OneHot(), nn.Linear(VOCAB, DIM, bias=False))).double()
    with torch.no_grad():
        twin.embed[1].weight.copy_(net.embed.weight.T)
        twin.head.load_state_dict(net.head.state_dict())
    batch = tokens(7, 2)
    pres = [sr.Preconditioner(model, sr.Policy(sr.KFAC(damping_mode="exact"))) for model in (net, twin)]
    for model, pre in zip((net, twin), pres):
        _gradients(model, batch)
        pre.step()
    ours, oracle = pres[0].layers["embed"].curvature, pres[1].layers["embed.1"].curvature
    counts = torch.bincount(batch[0].reshape(-1), minlength=VOCAB).double()
    torch.testing.assert_close(ours.a_factor.value, counts / 14, rtol=1e-14, atol=0)  # 7 samples × 2 calls
    torch.testing.assert_close(ours.a_factor.value, oracle.a_factor.value.diagonal(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ours.g_factor.value, oracle.g_factor.value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(net.embed.weight.grad, twin.embed[1].weight.grad.T, rtol=1e-10, atol=1e-13)

# -- every method: a diagonal A side, the same trajectory as the one-hot Linear ------------------------
def _twin_policy(method: sr.Method, embedding: sr.Method) -> sr.Policy:
    """``method`` everywhere, ``embedding`` on the one-hot Linear (named ``"0.1"`` in the twin)."""
    return sr.Policy(method, rules=[("0.1", embedding)])


#: Our policy on the embedding net, and the twin's: the one-hot Linear needs a dense A (Brand would
#: truncate it) and SINGD a diagonal K there — what the embedding gets by construction.
METHODS = {
    "kfac-pi": (sr.KFAC(inverse_every=1), sr.Policy(sr.KFAC(inverse_every=1))),
    "kfac-exact": (sr.KFAC(damping_mode="exact", inverse_every=2), sr.Policy(sr.KFAC(damping_mode="exact", inverse_every=2))),
    "bkfac": (sr.BKFAC(rank=2), _twin_policy(sr.BKFAC(rank=2), sr.BKFAC(rank=2, a="eigh"))),
    "singd": (sr.SINGD(update_every=1), _twin_policy(sr.SINGD(update_every=1), sr.SINGD(update_every=1, structure="diagonal", structure_g="dense"))),
}


@pytest.mark.parametrize("name", METHODS)
def test_training_trajectory_equals_the_one_hot_linear(name):
    ours, theirs = METHODS[name]
    net = embedding_net(2, dim=16 if name == "bkfac" else DIM)  # Brand on G needs rank + rows < dim
    twin = one_hot_twin(net)
    start = net[0].weight.detach().clone()
    opt = sr.Optimizer(net, sr.Policy(ours), lr=0.1, momentum=0.5)
    twin_opt = sr.Optimizer(twin, theirs, lr=0.1, momentum=0.5)
    for _ in range(4):
        batch = tokens(5, 2)
        for model, optimizer in ((net, opt), (twin, twin_opt)):
            optimizer.zero_grad()
            F.cross_entropy(model(batch[0]), batch[1]).backward()
            optimizer.step()
    assert (net[0].weight - start).abs().max() > 1e-3
    torch.testing.assert_close(net[0].weight, twin[0][1].weight.T, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(net[3].weight, twin[3].weight, rtol=1e-9, atol=1e-11)
    layer = opt.preconditioner.layers["0"]
    if name == "singd":
        assert layer.curvature.K.numel() == VOCAB  # diagonal K
    else:
        assert layer.curvature.a_factor.value.shape == (VOCAB,)
    if name == "bkfac":
        assert type(layer.curvature.g_factor).__name__ == "BrandFactor"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_singd_with_half_precision_state_on_an_embedding_of_fp32_weights(dtype):
    """Half-precision SINGD state under fp32 weights: the token counts arrive in fp32 and are folded in ``dtype``."""
    net = embedding_net(2).float()
    opt = sr.Optimizer(net, sr.Policy(sr.SINGD(update_every=1, dtype=dtype, structure="diagonal")), lr=0.1)
    for _ in range(3):
        batch = tokens(5, 2)
        opt.zero_grad()
        F.cross_entropy(net(batch[0]), batch[1]).backward()
        opt.step()
    K = opt.preconditioner.layers["0"].curvature.K
    assert K.dtype == dtype and bool(torch.isfinite(K.diag).all()) and not torch.equal(K.diag, torch.ones_like(K.diag))


def test_describe_notes_the_diagonal_side_and_counts_d_not_d_squared():
    net = embedding_net(3)
    for method, note in ((sr.KFAC(), "A: diagonal (one-hot input)"), (sr.SINGD(), "K diagonal (one-hot input), C dense")):
        row = next(line for line in sr.Policy(method).describe(net).splitlines() if line.startswith("0 "))
        assert "Embedding" in row and f"{VOCAB} tokens→{DIM}" in row and note in row
    # float64: A = its diagonal and one snapshot (2·V numbers); G and its inverse 2·D²
    pre = sr.Preconditioner(net, sr.Policy(sr.KFAC()))
    _gradients(net, tokens(4, 3))
    pre.step()
    tensors = pre.layers["0"].curvature.state_dict()
    assert tensors["A"].shape == (VOCAB,) and tensors["A_eigenvalues"].shape == (VOCAB,)
    assert "A_eigenvectors" not in tensors
    assert sr.curvature.KFACCurvature.estimate_bytes(sr.KFAC(), pre.layers["0"].layer.dims, torch.float64) == 8 * (2 * VOCAB + 2 * DIM**2)


def test_checkpoint_round_trip_keeps_the_diagonal_factor(tmp_path):
    net = embedding_net(3)
    twin = copy.deepcopy(net)
    policy = sr.Policy(sr.KFAC(inverse_every=2))
    batches = [tokens(6, 3) for _ in range(5)]

    def train(model, opt, part):
        for batch in part:
            opt.zero_grad()
            F.cross_entropy(model(batch[0]), batch[1]).backward()
            opt.step()

    opt = sr.Optimizer(net, policy, lr=0.1)
    train(net, opt, batches)
    first = sr.Optimizer(twin, policy, lr=0.1)
    train(twin, first, batches[:3])
    torch.save(first.state_dict(), tmp_path / "opt.pt")
    resumed = sr.Optimizer(twin, policy, lr=0.1)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    train(twin, resumed, batches[3:])
    for got, want in zip(twin.parameters(), net.parameters()):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("kwargs", "policy", "reason"),
    [
        ({"sparse": True}, sr.KFAC(), "sparse=True gives sparse gradients"),
        ({"scale_grad_by_freq": True}, sr.KFAC(), "scale_grad_by_freq=True rescales"),
        ({}, sr.KFAC(kfac_approx="reduce"), "Embedding supports the row layout(s) 'expand' only"),
        ({}, sr.SINGD(kfac_approx="reduce"), "needs 'reduce'"),
    ],
)
def test_unsupported_embeddings_go_to_the_fallback_with_one_warning(kwargs, policy, reason):
    net = embedding_net(3, **kwargs)
    plan = {p.name: p for p in sr.Policy(policy).plan(net)}
    assert plan["0"].method is None and reason in plan["0"].note and plan["0"].warn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = sr.Optimizer(net, sr.Policy(policy), lr=0.1)
    assert len(caught) == 1 and reason in str(caught[0].message)
    assert [g["name"] for g in opt.param_groups] == ["3", "fallback"]
