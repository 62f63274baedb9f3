"""The parameter update rules, applied with torch's foreach kernels.

Parameters are bucketed by their group's hyperparameters so one kernel launch
sequence serves every parameter that shares them (no per-parameter Python loop
on the hot path). The arithmetic is torch's own (``torch.optim.sgd.sgd`` and
``torch.optim.adamw.adamw``), so a degenerate policy reproduces
``torch.optim.SGD`` / ``torch.optim.AdamW`` exactly.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

__all__ = ["sgd_step", "adamw_step", "SGD_KEYS", "ADAMW_KEYS"]

#: Hyperparameters of each rule, the keys of its param groups.
SGD_KEYS = ("lr", "momentum", "nesterov", "weight_decay", "decoupled_weight_decay")
ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")


def _buckets(groups: Iterable[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple, list[Tensor]]:
    """Parameters with a gradient, bucketed by the group hyperparameters ``keys``."""
    buckets: dict[tuple, list[Tensor]] = defaultdict(list)
    for group in groups:
        key = tuple(group[k] for k in keys)
        buckets[key].extend(p for p in group["params"] if p.grad is not None)
    return buckets


def sgd_step(groups: Iterable[dict[str, Any]], state: dict[Tensor, dict[str, Any]]) -> None:
    """SGD with momentum (dampening 0), optional Nesterov, coupled or decoupled weight decay.

    Coupled: ``d = ∇ + γW``; decoupled: ``W ← (1 − lr·γ) W`` first, ``d = ∇``.
    Then ``m ← μ m + d`` and ``W ← W − lr·(d + μ m if nesterov else m)``.
    """
    for (lr, momentum, nesterov, weight_decay, decoupled), params in _buckets(groups, SGD_KEYS).items():
        if not params:
            continue
        grads = [p.grad for p in params]
        if decoupled and weight_decay:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        buffers = [state[p].get("momentum_buffer") for p in params]
        sgd(
            params, grads, buffers, foreach=True,
            weight_decay=0.0 if decoupled else weight_decay,
            momentum=momentum, lr=lr, dampening=0.0, nesterov=nesterov, maximize=False,
        )
        if momentum:
            for p, buffer in zip(params, buffers):
                state[p]["momentum_buffer"] = buffer


def adamw_step(groups: Iterable[dict[str, Any]], state: dict[Tensor, dict[str, Any]]) -> None:
    """AdamW (decoupled weight decay), torch's foreach implementation."""
    for (lr, (beta1, beta2), eps, weight_decay), params in _buckets(groups, ADAMW_KEYS).items():
        if not params:
            continue
        for p in params:
            if not state[p]:
                state[p]["step"] = torch.zeros((), dtype=torch.float32)
                state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        adamw(
            params, [p.grad for p in params],
            [state[p]["exp_avg"] for p in params], [state[p]["exp_avg_sq"] for p in params],
            [], [state[p]["step"] for p in params], foreach=True,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False,
        )
