"""SENG: the empirical-Fisher natural gradient in the N × N sample space (DESIGN §3.4).

With per-sample gradient rows ``U = [∇ℓ_n / √N]`` (``N × p``) and ``K = UUᵀ``,
Sherman–Morrison–Woodbury gives

    (UᵀU + λI)⁻¹ ∇ = (∇ − Uᵀ (λI + K)⁻¹ U ∇) / λ.

``U`` is never stored: a refresh keeps the batch's ``(a, g)`` rows
(``(N, T, d_a)`` and ``(N, T, d_g)``) and the Cholesky factor of ``λI + K``;
every step applies the fresh gradient through `singd_rkfac.linalg.samples`
(exact for Linear and weight-shared layers). Raw output gradients carry the
loss's ``1/N`` (and an AMP scale), so ``U = √c · Raw`` with ``c`` the
per-sample scale and the correction is ``c · Rawᵀ (λI + c·Raw Rawᵀ)⁻¹ Raw ∇``.

Sketching (``sketch_size``) samples gradient columns, independently for the
two products with ``U``; the ``N × N`` system stays exact, so the direction's
expectation is the exact direction (an inverse of a sampled system would be
biased).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..layers import LayerDims
from ..linalg import FailureTracker, robust_cholesky
from ..linalg.samples import sample_combination, sample_gram, sample_projections
from ..methods import SENG
from .base import BatchCounts, Curvature
from .factors import layer_generator

__all__ = ["SENGCurvature", "NOMINAL_SAMPLES"]

#: Batch size assumed by the estimates made before any batch is seen (`estimate_bytes`, `cost`).
NOMINAL_SAMPLES = 128


class SENGCurvature(Curvature):
    """One layer's SENG state: the last refresh's rows and the factor of ``λI + K``."""

    method_types = (SENG,)
    method: SENG

    def __init__(self, method: SENG, dims: LayerDims, **kwargs: Any) -> None:
        super().__init__(method, dims, **kwargs)
        self._staged: list[tuple[Tensor, Tensor]] = []
        #: The refresh batch's rows ``a`` ``(N, T, d_a)`` and ``g`` ``(N, T, d_g)``.
        self.rows_a: Tensor | None = None
        self.rows_g: Tensor | None = None
        #: Lower Cholesky factor of ``λI + c·Raw Rawᵀ`` ``(N, N)``, and ``c``.
        self.system: Tensor | None = None
        self.scale: Tensor | None = None
        self.refreshes = 0
        self.failures = FailureTracker(self.name, self.max_failures)
        self.generator = layer_generator(self.device, f"{self.name}/seng")

    # -- statistics -----------------------------------------------------------------------
    def accumulate(self, a: Tensor, g: Tensor) -> None:
        self._staged.append((a, g))

    def discard(self) -> None:
        self._staged.clear()

    def update(self, step: int, counts: BatchCounts | None) -> None:
        if counts is None or not self._staged:
            self._staged.clear()
            return
        rows_a = torch.cat([a for a, _ in self._staged])
        rows_g = torch.cat([g for _, g in self._staged])
        self._staged.clear()
        scale = torch.as_tensor(self.g_scale(counts), dtype=self.dtype, device=self.device).reshape(())
        gram = sample_gram(rows_a, rows_g)
        system = torch.diagonal_scatter(scale * gram, scale * gram.diagonal() + self.method.damping)
        factor = robust_cholesky(system)
        self.failures.record(factor is not None)
        if factor is None:
            return
        self.rows_a, self.rows_g, self.system, self.scale = rows_a, rows_g, factor, scale
        self.refreshes += 1

    # -- preconditioning ---------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.system is not None

    def _columns(self) -> Tensor | None:
        """A uniform sample of ``sketch_size`` gradient columns, or ``None`` (all of them)."""
        size = self.method.sketch_size
        if size is None or size >= self.dims.d_a:
            return None
        return torch.randperm(self.dims.d_a, generator=self.generator, device=self.device)[:size]

    def precondition(self, grad: Tensor) -> Tensor:
        grad = grad.to(self.dtype)
        a, g = self.rows_a, self.rows_g
        columns = self._columns()
        if columns is None:
            projections = sample_projections(a, g, grad)
        else:
            projections = sample_projections(a[..., columns], g, grad[:, columns]) * (self.dims.d_a / columns.numel())
        weights = self.scale * torch.cholesky_solve(projections[:, None], self.system)[:, 0]
        columns = self._columns()  # an independent draw: E[direction] = exact direction
        if columns is None:
            correction = sample_combination(a, g, weights)
        else:
            correction = torch.zeros_like(grad)
            correction[:, columns] = sample_combination(a[..., columns], g, weights) * (self.dims.d_a / columns.numel())
        return (grad - correction) / self.method.damping

    def note(self) -> str:
        if self.rows_a is None:
            return self.describe_note(self.method, self.dims)
        samples, positions = self.rows_a.shape[:2]
        return f"{samples} samples × {positions} positions"

    @classmethod
    def describe_note(cls, method: SENG, dims: LayerDims) -> str:
        return f"state grows with the batch; estimated for N={NOMINAL_SAMPLES}, 1 position"

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "rows_a": self.rows_a, "rows_g": self.rows_g, "system": self.system, "scale": self.scale,
            "refreshes": self.refreshes, "failures": self.failures.consecutive,
            "failures_total": self.failures.total, "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def restore(value: Tensor | None) -> Tensor | None:
            return None if value is None else value.to(self.device, self.dtype)

        self.rows_a, self.rows_g = restore(state["rows_a"]), restore(state["rows_g"])
        self.system, self.scale = restore(state["system"]), restore(state["scale"])
        self.refreshes = int(state["refreshes"])
        self.failures.consecutive = int(state["failures"])
        self.failures.total = int(state["failures_total"])
        self.generator.set_state(state["generator"])

    @classmethod
    def estimate_bytes(cls, method: SENG, dims: LayerDims, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        n = NOMINAL_SAMPLES
        return size * (n * (dims.d_a + dims.d_g) + n * n + 1)

    @classmethod
    def cost(cls, method: SENG, dims: LayerDims) -> float:
        n = NOMINAL_SAMPLES
        columns = dims.d_a if method.sketch_size is None else min(method.sketch_size, dims.d_a)
        per_step = 4.0 * n * dims.d_g * columns  # the two products with U
        refresh = n * n * (dims.d_a + dims.d_g) + n ** 3 / 3  # kernel Gram + Cholesky
        return per_step + refresh / method.update_every
