"""K-FAC: exponentially averaged Kronecker factors with dense fp32 inverses.

``V = (G + λ_G I)⁻¹ ∇W (A + λ_A I)⁻¹`` (π-damping) or ``(A ⊗ G + λI)⁻¹ vec ∇W``
(exact damping, from both eigendecompositions). DESIGN §3.1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..layers import LayerDims
from ..linalg import FailureTracker, exact_damped_solve, inverse_from_eigh, robust_cholesky, robust_eigh
from ..methods import KFAC
from .base import BatchCounts, Curvature

__all__ = ["DenseFactor", "KFACCurvature"]


class DenseFactor:
    """One Kronecker factor: its running average and a dense damped inverse.

    The running average never admits a non-finite batch (``torch.where`` on a
    fused finiteness check, no host sync), and the first finite batch replaces
    the zero initial value exactly (no identity blending).
    """

    def __init__(self, dim: int, inverse: str, *, device: torch.device, dtype: torch.dtype) -> None:
        self.dim = dim
        self.inverse_kind = inverse
        self.value = torch.zeros(dim, dim, device=device, dtype=dtype)
        self.initialized = torch.zeros((), dtype=torch.bool, device=device)
        self.staged: Tensor | None = None
        #: ``(F + λI)⁻¹`` under π-damping.
        self.inverse: Tensor | None = None
        #: ``(eigenvalues, eigenvectors)`` under exact damping.
        self.eigen: tuple[Tensor, Tensor] | None = None

    def accumulate(self, rows: Tensor) -> None:
        """Stage ``rowsᵀ rows`` for ``rows`` of shape ``(m, dim)``."""
        gram = rows.T @ rows
        self.staged = gram if self.staged is None else self.staged.add_(gram)

    def discard(self) -> None:
        self.staged = None

    def fold(self, scale: float, ema: float) -> None:
        """``F ← ρF + (1−ρ)·scale·staged`` (``F ← scale·staged`` the first time), skipping non-finite batches."""
        if self.staged is None:
            return
        batch = self.staged.mul_(scale)
        self.staged = None
        finite = torch.isfinite(batch).all()
        weight = self.initialized.to(batch.dtype) * ema  # in the factor's dtype: ρ exact in fp64
        averaged = torch.lerp(batch, self.value, weight)
        self.value = torch.where(finite, averaged, self.value)
        self.initialized = self.initialized | finite

    def mean_eigenvalue(self) -> Tensor:
        """``tr(F) / dim`` as a 0-d tensor."""
        return self.value.diagonal().mean()

    def decompose(self, damping: Tensor | None) -> tuple[Tensor, ...] | None:
        """New inverse representation, or ``None`` if every retry failed.

        With ``damping`` (π mode) returns ``((F + damping·I)⁻¹,)``; without
        (exact mode) the eigenpairs ``(s, Q)``.
        """
        if damping is None:
            return robust_eigh(self.value)
        if self.inverse_kind == "eigh":
            eigen = robust_eigh(self.value)
            return None if eigen is None else (inverse_from_eigh(*eigen, damping),)
        chol = robust_cholesky(self.value + damping * torch.eye(self.dim, device=self.value.device, dtype=self.value.dtype))
        return None if chol is None else (torch.cholesky_inverse(chol),)

    def commit(self, representation: tuple[Tensor, ...], exact: bool) -> None:
        if exact:
            self.eigen = representation  # type: ignore[assignment]
        else:
            self.inverse = representation[0]

    def state(self, prefix: str) -> dict[str, Tensor]:
        state = {f"{prefix}": self.value, f"{prefix}_initialized": self.initialized}
        if self.inverse is not None:
            state[f"{prefix}_inverse"] = self.inverse
        if self.eigen is not None:
            state[f"{prefix}_eigenvalues"], state[f"{prefix}_eigenvectors"] = self.eigen
        return state

    def load(self, state: dict[str, Any], prefix: str) -> None:
        def take(key: str, like: Tensor) -> Tensor:
            return state[key].to(device=like.device, dtype=like.dtype).clone()

        self.value = take(prefix, self.value)
        self.initialized = take(f"{prefix}_initialized", self.initialized)
        self.inverse = take(f"{prefix}_inverse", self.value) if f"{prefix}_inverse" in state else None
        self.eigen = None
        if f"{prefix}_eigenvalues" in state:
            self.eigen = (take(f"{prefix}_eigenvalues", self.value), take(f"{prefix}_eigenvectors", self.value))


class KFACCurvature(Curvature):
    """Classic K-FAC with eigen or Cholesky inverses per factor."""

    method_types = (KFAC,)
    method: KFAC

    def __init__(self, method: KFAC, dims: LayerDims, **kwargs: Any) -> None:
        super().__init__(method, dims, **kwargs)
        factory = {"device": self.device, "dtype": self.dtype}
        self.a_factor = DenseFactor(dims.d_a, method.inverse_a, **factory)
        self.g_factor = DenseFactor(dims.d_g, method.inverse_g, **factory)
        self.exact = method.damping_mode == "exact"
        self.folds = 0
        self.decompositions = 0
        self.failures = FailureTracker(self.name, self.max_failures)

    def accumulate(self, a: Tensor, g: Tensor) -> None:
        self.a_factor.accumulate(a)
        self.g_factor.accumulate(g)

    def discard(self) -> None:
        self.a_factor.discard()
        self.g_factor.discard()

    def update(self, step: int, counts: BatchCounts | None) -> None:
        if counts is not None:
            self.a_factor.fold(1.0 / counts.rows, self.method.ema)
            self.g_factor.fold(self.g_scale(counts), self.method.ema)
            self.folds += 1
        due = step % self.method.inverse_every == 0 or not self.ready
        if due and self.folds > 0:
            self._decompose()

    def _factor_dampings(self) -> tuple[Tensor | None, Tensor | None]:
        """``(λ_A, λ_G)`` for π-damping, ``(None, None)`` for exact damping."""
        if self.exact:
            return None, None
        tiny = torch.finfo(self.dtype).tiny
        mean_a = self.a_factor.mean_eigenvalue().clamp_min(tiny)
        mean_g = self.g_factor.mean_eigenvalue().clamp_min(tiny)
        pi = torch.sqrt(mean_a / mean_g)
        root = math.sqrt(self.method.damping)
        return pi * root, root / pi

    def _decompose(self) -> None:
        damping_a, damping_g = self._factor_dampings()
        new_a = self.a_factor.decompose(damping_a)
        new_g = self.g_factor.decompose(damping_g) if new_a is not None else None
        ok = new_a is not None and new_g is not None
        if ok:
            self.a_factor.commit(new_a, self.exact)
            self.g_factor.commit(new_g, self.exact)
            self.decompositions += 1
        self.failures.record(ok)

    @property
    def ready(self) -> bool:
        return self.decompositions > 0

    def precondition(self, grad: Tensor) -> Tensor:
        grad = grad.to(self.dtype)
        if self.exact:
            return exact_damped_solve(grad, self.g_factor.eigen, self.a_factor.eigen, self.method.damping)
        return self.g_factor.inverse @ grad @ self.a_factor.inverse

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.a_factor.state("A"),
            **self.g_factor.state("G"),
            "folds": self.folds,
            "decompositions": self.decompositions,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.a_factor.load(state, "A")
        self.g_factor.load(state, "G")
        self.folds = int(state["folds"])
        self.decompositions = int(state["decompositions"])

    @classmethod
    def estimate_bytes(cls, method: KFAC, dims: LayerDims, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        per_factor = 2 if method.damping_mode == "pi" else 1  # factor + inverse, or factor + eigvecs
        eigenvalues = 0 if method.damping_mode == "pi" else dims.d_a + dims.d_g
        return size * (per_factor * (dims.d_a**2 + dims.d_g**2) + eigenvalues)

    @classmethod
    def cost(cls, method: KFAC, dims: LayerDims) -> float:
        d_a, d_g = dims.d_a, dims.d_g
        statistics = (d_a**2 + d_g**2) * max(d_a, d_g) / method.stats_every
        decomposition = 10.0 * (d_a**3 + d_g**3) / method.inverse_every
        apply = d_g * d_a * (d_a + d_g)
        return statistics + decomposition + apply
