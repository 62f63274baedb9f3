"""Degenerate configurations equal torch.optim (DESIGN §8), and the update-rule fields."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import singd_rkfac as sr
from conftest import classification_batch, mlp


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 6) -> list[torch.Tensor]:
    for step in range(steps):
        torch.manual_seed(100 + step)
        x, y = classification_batch(8, (6,), 3)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "options",
    [
        {"momentum": 0.0, "weight_decay": 0.0},
        {"momentum": 0.9, "weight_decay": 1e-2},
        {"momentum": 0.9, "weight_decay": 1e-2, "nesterov": True},
    ],
)
@pytest.mark.parametrize("foreach", [False, True])
def test_skip_policy_with_sgd_fallback_reproduces_torch_sgd(options, foreach):
    model = mlp()
    reference = copy.deepcopy(model)
    ours = sr.Optimizer(model, sr.Policy(sr.Skip()), lr=0.1, fallback="sgd", **options)
    theirs = torch.optim.SGD(reference.parameters(), lr=0.1, foreach=foreach, **options)
    for got, want in zip(_train(model, ours), _train(reference, theirs)):
        assert torch.equal(got, want)


def test_skip_policy_with_adamw_fallback_reproduces_torch_adamw():
    model = mlp()
    reference = copy.deepcopy(model)
    ours = sr.Optimizer(
        model, sr.Policy(sr.Skip()), lr=1e-2, weight_decay=0.05, fallback="adamw",
        fallback_options={"betas": (0.8, 0.99), "eps": 1e-7},
    )
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-7, foreach=True)
    for got, want in zip(_train(model, ours), _train(reference, theirs)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def test_decoupled_weight_decay_shrinks_before_the_step():
    model = mlp()
    start = [p.detach().clone() for p in model.parameters()]
    opt = sr.Optimizer(model, sr.Policy(sr.Skip()), lr=0.1, weight_decay=0.5, decoupled_weight_decay=True)
    x, y = classification_batch(8, (6,), 3)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, p0, g in zip(model.parameters(), start, grads):
        torch.testing.assert_close(p.detach(), p0 * (1 - 0.1 * 0.5) - 0.1 * g, rtol=0, atol=1e-15)


def test_managed_layers_step_with_the_preconditioned_gradient():
    """One K-FAC step is W ← W − lr·V with V the preconditioner's direction."""
    model = mlp()
    twin = copy.deepcopy(model)
    policy = sr.Policy(sr.KFAC(damping=1e-2))
    opt = sr.Optimizer(model, policy, lr=0.3, clip=None)
    pre = sr.Preconditioner(twin, policy)
    x, y = classification_batch(8, (6,), 3)
    for net in (model, twin):
        nn.functional.cross_entropy(net(x), y).backward()
    pre.step()
    opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.detach(), q.detach() - 0.3 * q.grad, rtol=0, atol=1e-14)


def test_clip_bounds_the_quadratic_model_change():
    model = mlp()
    twin = copy.deepcopy(model)
    clip = 1e-6
    lr = 0.5
    opt = sr.Optimizer(model, sr.Policy(sr.KFAC()), lr=lr, clip=clip)
    pre = sr.Preconditioner(twin, sr.Policy(sr.KFAC()))
    x, y = classification_batch(8, (6,), 3)
    for net in (model, twin):
        nn.functional.cross_entropy(net(x), y).backward()
    raw = [p.grad.clone() for p in twin.parameters()]
    pre.step()
    directions = [p.grad for p in twin.parameters()]
    total = sum(lr**2 * (v * g).sum() for v, g in zip(directions, raw))
    nu = min(1.0, (clip / abs(total)).sqrt().item())
    assert nu < 1.0  # the constraint is active in this configuration
    opt.step()
    for p, q, v in zip(model.parameters(), twin.parameters(), directions):
        torch.testing.assert_close(p.detach(), q.detach() - lr * nu * v, rtol=1e-12, atol=1e-14)


def test_lr_scheduler_changes_every_group():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    opt = sr.Optimizer(model, lr=0.1, fallback="adamw")
    assert [g["name"] for g in opt.param_groups] == ["0", "2", "fallback"]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(5, 4, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == [0.025, 0.025, 0.025]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"lr": -1.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"nesterov": True}, "nesterov"),
        ({"clip": 0.0}, "clip"),
        ({"fallback": "adam"}, "fallback"),
        ({"fallback_options": {"betas": (0.9, 0.9)}}, "betas"),
        ({"fallback": "adamw", "fallback_options": {"betas": (0.9, 1.5)}}, "betas"),
        ({"max_decomposition_failures": 0}, "max_decomposition_failures"),
    ],
)
def test_bad_optimizer_arguments_raise_value_error(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sr.Optimizer(mlp(), **kwargs)


def test_memory_bytes_counts_factors_and_inverses():
    model = mlp()
    opt = sr.Optimizer(model, sr.Policy(sr.KFAC()))
    x, y = classification_batch(8, (6,), 3)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    sizes = opt.memory_bytes()
    # pi damping: factor + inverse per side in float64 (bias column on the A side),
    # plus one bool "initialized" flag per factor
    assert sizes == {"0": 16 * (7**2 + 7**2) + 2, "2": 16 * (8**2 + 5**2) + 2, "4": 16 * (6**2 + 3**2) + 2}
    assert "kfac" in opt.describe() and "fallback=sgd" in opt.describe()
