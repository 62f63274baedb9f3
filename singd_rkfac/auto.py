"""`Policy.auto`: a K-FAC-family representation per factor from sizes and a memory budget.

The rule (DESIGN §3.6 cost model), per factor of width ``d``:

1. **Compute**: ``d ≤ dense_max`` → dense eigh (exact; its O(d³) decomposition
   is cheap at that size); up to ``diagonal_min`` → SRE-KFAC of rank ``rank``
   (O(d²·r) decomposition, O(d²) memory for the EA factor); wider →
   diagonal (O(d): vocabulary-sized sides). This is `singd_rkfac.methods.by_width`,
   the rule of ``a="auto"`` / ``g="auto"`` and so of the default policy.
2. **Memory**: while the estimated curvature state exceeds ``memory_budget``,
   the widest factor not yet on Brand switches to B-KFAC (O(d·r) memory, no
   ``d × d`` tensor) — but only where Brand is valid, ``rank + rows < d``.
   If every switchable factor is on Brand and the budget is still exceeded, a
   ``ValueError`` names the smallest budget this rule can reach.

Each layer gets ``KFAC(a=..., g=...)`` with the chosen representation per side
(or the low-rank class itself when both sides agree), plus the shared K-FAC
fields passed through ``fields``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .curvature import curvature_class
from .layers import LayerDims
from .methods import AUTO_DENSE_MAX, AUTO_DIAGONAL_MIN, AUTO_RANK, BKFAC, DIAGONAL, KFAC, LowRankKFAC, by_width

if TYPE_CHECKING:
    from .policy import Policy, plan_layer

__all__ = ["auto_policy"]

SIDES = ("a", "g")


@dataclass
class _Layer:
    """One managed layer while the rule runs: its dims, state dtype and per-side choice."""

    name: str
    dims: LayerDims
    dtype: torch.dtype
    sides: dict[str, KFAC]

    def width(self, side: str) -> int:
        return self.dims.d_a if side == "a" else self.dims.d_g

    def method(self, fields: dict[str, Any]) -> KFAC:
        a, g = self.sides["a"], self.sides["g"]
        if a == g:
            return type(a)(**{"rank": a.rank} if isinstance(a, LowRankKFAC) else {}, **fields)
        return KFAC(a=_short(a), g=_short(g), **fields)

    def bytes(self, fields: dict[str, Any]) -> int:
        method = self.method(fields)
        return curvature_class(method).estimate_bytes(method, self.dims, self.dtype)


def _short(config: KFAC) -> str | KFAC:
    """``"eigh"`` / ``"diagonal"`` for a dense / diagonal side, the config itself otherwise."""
    if config.representation == "diagonal":
        return DIAGONAL
    return config if isinstance(config, LowRankKFAC) else config.inverse


def auto_policy(
    model: nn.Module,
    *,
    memory_budget: int | None = None,
    dense_max: int = AUTO_DENSE_MAX,
    diagonal_min: int = AUTO_DIAGONAL_MIN,
    rank: int = AUTO_RANK,
    rows: int | None = None,
    **fields: Any,
) -> "Policy":
    """A `Policy` with one rule per managed layer, chosen by the rule in this module's docstring.

    Args:
        model: the model the policy is for.
        memory_budget: bytes of curvature state allowed in total (``None`` = no limit).
        dense_max: widest factor kept dense (the compute knob).
        diagonal_min: factors wider than this are diagonal (vocabulary-sized sides).
        rank: rank of the low-rank representations.
        rows: rows per statistics step (batch × positions) if known — Brand is
            only chosen where ``rank + rows < d``; ``None`` assumes it is valid.
        fields: shared K-FAC fields (``damping``, ``ema``, ``inverse_every``, ...).
    """
    from .policy import Policy, plan_layer

    for name, value in (("dense_max", dense_max), ("diagonal_min", diagonal_min), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Policy.auto: {name} must be an integer >= 1 (got {value!r})")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 0):
        raise ValueError(f"Policy.auto: memory_budget must be a number of bytes >= 0 or None (got {memory_budget!r})")
    base = Policy(KFAC(**fields))  # validates the shared fields
    brand = BKFAC(rank=rank)
    layers = []
    for plan in base.plan(model):
        if not plan.manages:
            continue
        layer = plan_layer(plan)
        dtype = curvature_class(plan.method).state_dtype(plan.method, layer.weight.dtype)
        entry = _Layer(plan.name, layer.dims, dtype, {})
        entry.sides = {
            side: by_width(entry.width(side), dense_max=dense_max, diagonal_min=diagonal_min, rank=rank) for side in SIDES
        }
        layers.append(entry)
    if memory_budget is not None:
        _fit_memory(layers, memory_budget, brand, rows, fields)
    return Policy(base.default, rules=[(entry.name, entry.method(fields)) for entry in layers])


def _fit_memory(layers: list[_Layer], budget: int, brand: BKFAC, rows: int | None, fields: dict[str, Any]) -> None:
    """Move the widest factors to Brand until the estimated state fits ``budget``."""
    candidates = sorted(
        ((entry.width(side), i, side) for i, entry in enumerate(layers) for side in SIDES),
        reverse=True,
    )
    total = sum(entry.bytes(fields) for entry in layers)
    for width, i, side in candidates:
        if total <= budget:
            return
        if brand.rank >= width or (rows is not None and brand.rank + rows >= width):
            continue
        entry = layers[i]
        before = entry.bytes(fields)
        entry.sides[side] = brand
        total += entry.bytes(fields) - before
    if total > budget:
        raise ValueError(
            f"Policy.auto: memory_budget={budget} bytes cannot be met; with every eligible factor on "
            f"B-KFAC(rank={brand.rank}) the curvature state is about {total} bytes (lower the rank or raise the budget)"
        )
