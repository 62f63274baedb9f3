"""A tied weight's curvature: one Kronecker pair for the sum of its uses' curvatures.

A weight used by ``U`` modules (`singd_rkfac.layers.tied.TiedLayer`) has the
curvature ``F = Σ_u A_u ⊗ G_u``, each use's K-FAC factors laid out on the
shared matrix (a flipped use's output-gradient factor on the input side). A
sum of Kronecker products is no Kronecker product, so each statistics step
replaces it by one (the **trace-weighted mixture**): with ``a_u = tr A_u / d_a``
and ``g_u = tr G_u / d_g`` (mean eigenvalues) and ``W = Σ_u a_u g_u``,

    A = Σ_u g_u A_u / √W,        G = Σ_u a_u G_u / √W.

Each factor is the average of the uses' factors weighted by how much
curvature the *other* side gives them; ``tr(A ⊗ G) = tr F``. The rule is

* exact for one use, and invariant to how a use splits a scalar between its
  two factors (``A_u c ⊗ G_u / c`` is the same curvature);
* exact whenever all uses agree on one side up to scale (``G_u ∝ G``, or
  ``A_u ∝ A``): then ``F`` is the Kronecker product ``(Σ_u g_u A_u) ⊗ G/g``
  and the rule returns it. For two uses this is the only way ``F`` can be a
  Kronecker product at all;
* otherwise the product adds cross terms ``A_u ⊗ G_v`` weighted by
  ``g_u a_v / W``: it assumes the uses' factors are alike, as K-FAC-expand
  assumes of weight-sharing positions.

The combined rows are handed to an ordinary curvature of the method (K-FAC
family, SINGD with any structure), which keeps its own running averages,
decompositions and state: the mixture is formed per batch from the staged
rows of every use (they are held until ``step()``), then folded as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..layers import LayerDims
from ..layers.tied import TiedUse
from ..methods import CurvatureMethod
from . import curvature_class
from .base import BatchCounts, Curvature, per_sample_scale

__all__ = ["TiedCounts", "TiedCurvature"]


@dataclass(frozen=True)
class TiedCounts(BatchCounts):
    """`BatchCounts` of a tied weight: the totals, and each use's own (``None``: not called this step)."""

    uses: tuple[BatchCounts | None, ...] = ()


class TiedCurvature(Curvature):
    """Stages each use's rows, mixes them into one Kronecker pair, and hands them to ``inner``.

    Args:
        inner: the curvature of the method on the shared matrix (its dims are the tied layer's).
        uses: the uses, in the order their captures stage rows.
    """

    def __init__(self, inner: Curvature, uses: list[TiedUse]) -> None:
        super().__init__(inner.method, inner.dims, device=inner.device, dtype=inner.dtype, name=inner.name,
                         max_failures=inner.max_failures)
        self.inner = inner
        self.uses = uses
        self._staged: list[list[tuple[Tensor, Tensor]]] = [[] for _ in uses]

    # -- statistics -------------------------------------------------------------
    def stage(self, use: int, a: Tensor, g: Tensor) -> None:
        """Hold one call's rows of use ``use`` (in that use's own layout) until `update`."""
        self._staged[use].append((a, g))

    def accumulate(self, a: Tensor, g: Tensor) -> None:
        self.stage(0, a, g)

    def discard(self) -> None:
        self._staged = [[] for _ in self.uses]
        self.inner.discard()

    def update(self, step: int, counts: BatchCounts | None) -> None:
        if counts is not None:
            assert isinstance(counts, TiedCounts)
            rows = self._mixture(counts)
            counts = None
            if rows is not None:
                a, g, stated = rows
                self.inner.accumulate(a, g)
                counts = BatchCounts(rows=stated, samples=1)  # the rows carry every scale: the inner fold adds none
        self._staged = [[] for _ in self.uses]
        self.inner.update(step, counts)

    def _mixture(self, counts: TiedCounts) -> tuple[Tensor, Tensor, int] | None:
        """The mixed rows ``(a, g)`` of this step (module docstring) and the row count to state to ``inner``."""
        diagonal_a = self.dims.diagonal_a
        work = torch.promote_types(self.dtype, torch.float32)
        sides = []  # per use: input-side rows, their scale, output-side rows, their scale
        for use, staged, use_counts in zip(self.uses, self._staged, counts.uses):
            if not staged or use_counts is None:
                continue
            use_counts = replace(use_counts, loss_scale=counts.loss_scale)
            a = sum(s[0] for s in staged) if diagonal_a else torch.cat([s[0] for s in staged])  # diagonal: diag(aᵀa)
            g = torch.cat([s[1] for s in staged])
            scale_a = 1.0 / use_counts.rows
            scale_g = per_sample_scale(use_counts, self.method.loss_average, self.dtype, self.device)
            sides.append((g, scale_g, a, scale_a) if use.flipped else (a, scale_a, g, scale_g))
        if not sides:
            return None
        # mean eigenvalues of each use's factors (diagonal A: the rows are diag(aᵀa) already)
        means_a = [scale * (x.to(work).sum() if diagonal_a else x.to(work).square().sum()) / self.dims.d_a
                   for x, scale, _, _ in sides]
        means_g = [scale * y.to(work).square().sum() / self.dims.d_g for _, _, y, scale in sides]
        total = sum(ma * mg for ma, mg in zip(means_a, means_g))
        root = torch.as_tensor(total, dtype=work).clamp_min(torch.finfo(work).tiny).sqrt()
        # the row count the inner curvature is told (Brand's validity test reads it): the larger side's
        rows_a = 0 if diagonal_a else sum(x.shape[0] for x, _, _, _ in sides)
        stated = max(1, rows_a, sum(y.shape[0] for _, _, y, _ in sides))
        # A = Σ g_u A_u / √W, fed as rows the inner fold scales by 1/stated; G = Σ a_u G_u / √W (its scale is 1)
        a_parts, g_parts = [], []
        for (x, scale_a, y, scale_g), ma, mg in zip(sides, means_a, means_g):
            weight_a = (scale_a * stated * mg / root).to(self.dtype)
            weight_g = (scale_g * ma / root).to(self.dtype)
            a_parts.append(x * weight_a if diagonal_a else x * weight_a.sqrt())
            g_parts.append(y * weight_g.sqrt())
        a = sum(a_parts) if diagonal_a else torch.cat(a_parts)
        return a, torch.cat(g_parts), stated

    # -- preconditioning and state: the inner curvature's ------------------------
    @property
    def ready(self) -> bool:
        return self.inner.ready

    def precondition(self, grad: Tensor) -> Tensor:
        return self.inner.precondition(grad)

    def elementwise_factors(self) -> tuple[Tensor, Tensor] | None:
        return self.inner.elementwise_factors()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def memory_bytes(self) -> int:
        return self.inner.memory_bytes()

    def note(self) -> str:
        shared = "tied weight, also used by " + ", ".join(repr(use.name) for use in self.uses[1:])
        return "; ".join(filter(None, (self.inner.note(), shared)))

    # persistent state and cost are the inner method's on the shared matrix (the staged rows are transient)
    @classmethod
    def estimate_bytes(cls, method: CurvatureMethod, dims: LayerDims, dtype: torch.dtype) -> int:
        return curvature_class(method).estimate_bytes(method, dims, dtype)

    @classmethod
    def cost(cls, method: CurvatureMethod, dims: LayerDims) -> float:
        return curvature_class(method).cost(method, dims)
