"""Statistics capture: when hooks act, in-place activations, micro-batches, repeated calls."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import singd_rkfac as sr
from conftest import classification_batch, mlp


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _train(model, opt, batches, between=None):
    for batch in batches:
        opt.zero_grad()
        _loss(model, batch).backward()
        if between is not None:
            between(model)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_eval_and_no_grad_forwards_between_steps_change_nothing():
    batches = [classification_batch(8, (6,), 3) for _ in range(4)]
    probe = torch.randn(50, 6, dtype=torch.float64) * 10

    def interfere(model):
        with torch.no_grad():
            model(probe)
        model.eval()
        _loss(model, (probe, torch.zeros(50, dtype=torch.long)))  # graph built, never backpropagated
        model.train()

    model = mlp()
    twin = copy.deepcopy(model)
    policy = sr.Policy(sr.KFAC(inverse_every=1))
    plain = _train(model, sr.Optimizer(model, policy, lr=0.1), batches)
    disturbed = _train(twin, sr.Optimizer(twin, policy, lr=0.1), batches, between=interfere)
    for got, want in zip(disturbed, plain):
        assert torch.equal(got, want)


def test_inplace_activation_gives_the_out_of_place_result():
    batches = [classification_batch(8, (6,), 3) for _ in range(3)]
    model = mlp(inplace=False)
    twin = mlp(inplace=True)
    twin.load_state_dict(model.state_dict())
    policy = sr.Policy(sr.KFAC(inverse_every=1))
    for got, want in zip(
        _train(twin, sr.Optimizer(twin, policy, lr=0.1), batches),
        _train(model, sr.Optimizer(model, policy, lr=0.1), batches),
    ):
        assert torch.equal(got, want)


def test_micro_batches_accumulate_to_the_full_batch_factors():
    x, y = classification_batch(12, (6,), 3)
    model = mlp()
    twin = copy.deepcopy(model)
    full = sr.Preconditioner(model, sr.Policy(sr.KFAC()))
    micro = sr.Preconditioner(twin, sr.Policy(sr.KFAC()))
    _loss(model, (x, y)).backward()
    for part in (slice(0, 5), slice(5, 12)):  # unequal micro-batches, loss scaled to the full-batch mean
        (nn.functional.cross_entropy(twin(x[part]), y[part], reduction="sum") / 12).backward()
    full.step()
    micro.step()
    for name in full.layers:
        a, b = full.layers[name].curvature, micro.layers[name].curvature
        torch.testing.assert_close(b.a_factor.value, a.a_factor.value, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(b.g_factor.value, a.g_factor.value, rtol=1e-12, atol=1e-15)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)


class TwiceUsed(nn.Module):
    """The same Linear applied to two halves of the input (weight sharing across calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.cat([torch.tanh(self.shared(x[:, :3])), torch.tanh(self.shared(x[:, 3:]))], dim=1))


def test_module_called_twice_expand_counts_both_calls_as_positions():
    """A = mean over all (sample, call) rows; G = N · Σ g gᵀ over both calls."""
    model = TwiceUsed().double()
    x, y = classification_batch(7, (6,), 2)
    pre = sr.Preconditioner(model, sr.Policy(sr.KFAC()))
    calls = []

    def keep(module, args, output):
        calls.append((args[0].detach(), output))
        output.retain_grad()

    handle = model.shared.register_forward_hook(keep)
    _loss(model, (x, y)).backward()
    handle.remove()
    pre.step()
    rows_a = torch.cat([torch.cat([inp, torch.ones(7, 1, dtype=inp.dtype)], 1) for inp, _ in calls])
    rows_g = torch.cat([out.grad for _, out in calls])
    curvature = pre.layers["shared"].curvature
    torch.testing.assert_close(curvature.a_factor.value, rows_a.T @ rows_a / 14, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(curvature.g_factor.value, 7 * rows_g.T @ rows_g, rtol=1e-12, atol=1e-15)


def test_module_called_twice_with_reduce_is_a_clear_error():
    model = TwiceUsed().double()
    sr.Preconditioner(model, sr.Policy(sr.KFAC(kfac_approx="reduce")))
    with pytest.raises(RuntimeError, match="called more than once"):
        model(torch.randn(2, 6, dtype=torch.float64))


def test_statistics_only_on_statistics_steps():
    model = mlp()
    pre = sr.Preconditioner(model, sr.Policy(sr.KFAC(stats_every=3, ema=0.5)))
    folds = []
    for _ in range(7):
        model.zero_grad()
        _loss(model, classification_batch(4, (6,), 3)).backward()
        pre.step()
        folds.append(pre.layers["0"].curvature.folds)
    assert folds == [1, 1, 1, 2, 2, 2, 3]


def test_model_with_multihead_attention_trains():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(5, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.embed(x)
            h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
            return self.head(h.mean(dim=1))

    model = Block().double()
    resolved = sr.Policy().resolve(model)
    assert resolved["attn.out_proj"] is None and resolved["attn"] is None and resolved["norm"] is None
    assert isinstance(resolved["embed"], sr.KFAC)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = sr.Optimizer(model, lr=0.05, momentum=0.5, fallback="adamw", fallback_options={"lr": 1e-2})
    assert any("attn (projections used inside F.multi_head_attention_forward" in str(w.message) for w in caught)
    x, y = classification_batch(16, (4, 5), 3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = _loss(model, (x, y))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


def test_layer_without_statistics_uses_its_gradient_and_warns_once():
    """A managed module whose weight is used functionally never gets statistics."""

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 3)
            self.bypassed = nn.Linear(3, 2)

        def forward(self, x):
            return nn.functional.linear(self.used(x), self.bypassed.weight, self.bypassed.bias)

    model = Functional().double()
    pre = sr.Preconditioner(model, sr.Policy(sr.KFAC()))
    x = torch.randn(4, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model.zero_grad()
            model(x).square().mean().backward()
            raw = model.bypassed.weight.grad.clone()
            pre.step()
            assert torch.equal(model.bypassed.weight.grad, raw)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "'bypassed' has a gradient but no curvature statistics" in messages[0]
