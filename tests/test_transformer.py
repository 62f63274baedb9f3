"""Transformers: sequence weight sharing in the blocks, attention and norms to the fallback, tied weights, a tiny LM.

The LM and its synthetic tokens are those of the ``lm`` benchmark
(``benchmarks/lm.py``), trained with the benchmark's own contenders.
"""

from __future__ import annotations

import copy

import math
import warnings

import pytest
import torch
from torch import nn

import singd_rkfac as sr
from singd_rkfac import cli

pytestmark = pytest.mark.usefixtures("one_thread")

lm = cli.load_benchmark("lm")


class Block(nn.Module):
    """One pre-norm transformer encoder layer on ``(batch, positions, 6)`` features, mean-pooled, linear head."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(6, 2, 10, dropout=0.0, batch_first=batch_first, norm_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.block(x).mean(dim=1))


def _caught(build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = build()
    return result, [str(w.message) for w in caught]


# -- the blocks' Linear layers: K-FAC-expand and -reduce over positions ------------------------------------
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_block_linear_factors_equal_curvlinops(approx):
    curvlinops = pytest.importorskip("curvlinops")
    net = Block().double()
    x, y = torch.randn(5, 4, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    params = [p for name, p in net.named_parameters() if "linear" in name or "head" in name]
    oracle = curvlinops.KFACLinearOperator(
        net, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type="empirical", kfac_approx=approx,
        separate_weight_and_bias=False, check_deterministic=False,
    )
    oracle.compute_kronecker_factors()
    pre, messages = _caught(lambda: sr.Preconditioner(net, sr.Policy(sr.KFAC(kfac_approx=approx))))
    assert set(pre.layers) == {"block.linear1", "block.linear2", "head"} == set(oracle._input_covariances)
    nn.functional.cross_entropy(net(x), y).backward()
    pre.step()
    for name, managed in pre.layers.items():
        torch.testing.assert_close(managed.curvature.a_factor.value, oracle._input_covariances[name], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(managed.curvature.g_factor.value, oracle._gradient_covariances[name], rtol=1e-12, atol=1e-14)
    assert len(messages) == 1 and "block.self_attn (projections used inside F.multi_head_attention_forward" in messages[0]


def test_attention_and_norms_go_to_the_fallback_with_one_warning_naming_the_attention():
    plan = {p.name: p for p in sr.Policy().plan(Block())}
    assert plan["block.self_attn"].method is None and plan["block.self_attn"].warn
    assert "F.multi_head_attention_forward" in plan["block.self_attn"].note
    out_proj = plan["block.self_attn.out_proj"]
    assert out_proj.method is None and not out_proj.warn and "'block.self_attn'" in out_proj.note
    for norm in ("block.norm1", "block.norm2"):
        assert plan[norm].method is None and plan[norm].note == "normalisation layer" and not plan[norm].warn
    opt, messages = _caught(lambda: sr.Optimizer(Block()))
    assert len(messages) == 1 and "block.self_attn (" in messages[0]
    assert "out_proj (" not in messages[0] and "norm1" not in messages[0]
    fallback = next(g for g in opt.param_groups if g["name"] == "fallback")
    block = opt.preconditioner.model.block
    expected = [block.self_attn.in_proj_weight, block.self_attn.in_proj_bias, block.self_attn.out_proj.weight,
                block.self_attn.out_proj.bias, *block.norm1.parameters(), *block.norm2.parameters()]
    assert {id(p) for p in fallback["params"]} == {id(p) for p in expected}


def test_describe_lists_norm_layers_and_every_fallback_parameter():
    text = sr.Policy().describe(Block())
    rows = {line.split()[0]: line for line in text.splitlines()[2:] if line and not line.startswith("curvature")}
    assert "fallback" in rows["block.norm1"] and "LayerNorm" in rows["block.norm1"] and "normalisation layer" in rows["block.norm1"]
    assert "MultiheadAttention" in rows["block.self_attn"] and "18×6, 18" in rows["block.self_attn"]
    assert "fallback" in rows["block.self_attn.out_proj"] and "6×6, 6" in rows["block.self_attn.out_proj"]
    assert "kfac" in rows["block.linear1"] and "6→10" in rows["block.linear1"]


def test_batch_first_false_layers_fall_back_with_a_reason():
    plan = {p.name: p for p in sr.Policy().plan(Block(batch_first=False))}
    for name in ("block.linear1", "block.linear2"):
        assert plan[name].method is None and plan[name].warn and "batch_first=False" in plan[name].note
    assert isinstance(plan["head"].method, sr.KFAC)


# -- tied weights ------------------------------------------------------------------------------------------
class Tied(nn.Module):
    """Embedding → tanh → Linear head whose weight is the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def test_tied_weight_is_one_managed_layer_and_is_updated_exactly_once():
    model = Tied().double()
    plan = {p.name: p for p in sr.Policy().plan(model)}
    assert plan["embed"].manages and [name for name, _, _ in plan["embed"].tied] == ["head"]
    assert plan["head"].tied_to == "embed" and not plan["head"].manages and not plan["head"].warn
    opt, messages = _caught(lambda: sr.Optimizer(model, sr.Policy(sr.KFAC()), lr=0.1, clip=None))
    assert messages == []
    shared = model.embed.weight
    assert sum(p is shared for g in opt.param_groups for p in g["params"]) == 1
    assert opt.preconditioner.layers.keys() == {"embed", "mix"}
    assert opt.preconditioner.fallback_parameters() == [model.head.bias]  # the head's own bias is not shared
    pre = sr.Preconditioner(copy.deepcopy(model), sr.Policy(sr.KFAC()))
    tokens, targets = torch.randint(0, 7, (6, 3)), torch.randint(0, 7, (6, 3))
    for _ in range(2):  # one SGD update of the shared weight per step, with its one preconditioned gradient
        for net in (model, pre.model):
            net.zero_grad()
            nn.functional.cross_entropy(net(tokens).reshape(-1, 7), targets.reshape(-1)).backward()
        before = shared.detach().clone()
        opt.step()
        pre.step()
        torch.testing.assert_close(shared.detach(), before - 0.1 * pre.model.embed.weight.grad, rtol=0, atol=1e-12)
        with torch.no_grad():
            pre.model.embed.weight.copy_(shared)
            pre.model.mix.load_state_dict(model.mix.state_dict())
            pre.model.head.bias.copy_(model.head.bias)


# -- the tiny LM -------------------------------------------------------------------------------------------
QUICK = lm.SIZES["quick"]


def _tiny_lm(tied: bool) -> nn.Module:
    return lm.build_lm(QUICK.vocab, QUICK.dim, QUICK.layers, tied, heads=QUICK.heads, context=QUICK.context)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_resolve_shows_the_transformer_block_layers_managed(tied):
    resolved = sr.Policy(sr.KFAC()).resolve(_tiny_lm(tied))
    managed = {name for name, method in resolved.items() if method is not None}
    fallback = {name for name, method in resolved.items() if method is None}
    assert {"blocks.0.linear1", "blocks.0.linear2", "pos"} <= managed
    assert {"blocks.0.self_attn", "blocks.0.self_attn.out_proj", "blocks.0.norm1", "blocks.0.norm2", "norm"} <= fallback
    assert {"embed", "head"} <= managed  # tied: one layer for the shared matrix, its method for both uses


@pytest.mark.parametrize("label", ["KFAC", "SINGD", "BKFAC"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tiny_lm_trains_with_finite_values(label, tied):
    """The benchmark's contender fits two batches of generated tokens: the loss falls by a nat or more."""
    torch.manual_seed(0)
    model = _tiny_lm(tied)
    batches = lm.token_batches(QUICK.vocab, QUICK.context, QUICK.batch, 2, seed=1)
    opt, _ = _caught(lambda: lm.POLICIES[label](model))
    losses = []
    for step in range(40):
        opt.zero_grad()
        loss = lm.lm_loss(model, batches[step % 2])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = opt.state_dict()["preconditioner"]["layers"]
    assert all(torch.isfinite(t).all() for layer in state.values() for t in layer["curvature"].values() if isinstance(t, torch.Tensor))
    assert {"blocks.0.linear1", "blocks.0.linear2", "pos"} <= set(opt.preconditioner.layers)
    if label == "BKFAC" and not tied:  # the head's G (vocab wide) is a true Brand factor
        assert type(opt.preconditioner.layers["head"].curvature.g_factor).__name__ == "BrandFactor"


def test_run_lm_reports_every_number():
    result, messages = _caught(lambda: lm.run_lm("SINGD-bf16+KFAC-head", 4, "cpu", None, tied=True))
    # the tied head's own rule (K-FAC) yields to the embedding's SINGD, which serves the shared weight
    assert len(messages) == 2 and "fallback rule" in messages[0] and "the first use's serves all" in messages[1]
    assert len(result["losses"]) == 4 == len(result["seconds_per_step"]) and result["finite"]
    assert 0 < result["oracle_loss"] < math.log(QUICK.vocab) and result["state_bytes"] > 0
    assert "embed" in result["managed"] and "head" not in result["fallback"] and "blocks.0.linear1" in result["managed"]
    with pytest.raises(ValueError, match="unknown policy 'Shampoo'"):
        lm.run_lm("Shampoo", 1)
