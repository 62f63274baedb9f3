"""SINGD: inverse-free structured Kronecker factors (DESIGN §3.3).

Per layer ``K`` (``d_a × d_a``) and ``C`` (``d_g × d_g``) start at the
identity and move by products only::

    H_K = Π(Kᵀ A K)          H_C = Π(Cᵀ G C)                (from the rows, no d×d)
    INGD:  m̂_K = s (mt(H_C) H_K + λ mt(Π(CᵀC)) Π(KᵀK) − I)   (C alike)
    IKFAC: m̂_K = s (H_K + λ Π(KᵀK) − I)
    m_K ← α₁ m_K + m̂_K,   K ← K − β₁ K m_K

with ``s = ½`` (``½(1 − α₁)`` and ``β₁ / max(1, max|m_K|)`` when
normalized). The preconditioned gradient is ``C Cᵀ ∇W K Kᵀ``. All of it runs
in the method's ``dtype`` (bf16/fp16 allowed); the staged ``H`` terms of an
fp16 layer are kept in fp32 until they are averaged. An update whose result
is not finite is dropped by ``torch.where`` — no host sync, no NaN in state.

A layer whose ``A`` is diagonal by construction (`LayerDims.diagonal_a`,
embeddings) gets a diagonal ``K`` whatever the structure asked for: the IKFAC
fixed point ``K Kᵀ = (A + λI)⁻¹`` is then diagonal too, and ``a`` arrives as
``diag(aᵀa)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..layers import LayerDims
from ..methods import SINGD
from ..structures import Diagonal, DiagonalMatrix, PartsMatrix, Structure, StructuredMatrix
from .base import BatchCounts, Curvature

__all__ = ["SINGDCurvature", "c_structure", "k_structure", "keeps_outer"]


def k_structure(method: SINGD, dims: LayerDims) -> Structure:
    """The structure of ``K``: the method's, or diagonal when ``A`` is diagonal by construction."""
    return Diagonal() if dims.diagonal_a else method.k_structure


def c_structure(method: SINGD, dims: LayerDims) -> Structure:
    """The structure of ``C``: the method's, or diagonal when ``G`` is diagonal by construction (depthwise)."""
    return Diagonal() if dims.diagonal_g else method.c_structure


def keeps_outer(numel: int, method: SINGD, dims: LayerDims) -> bool:
    """Whether a factor of ``numel`` stored numbers caches its ``S Sᵀ`` (`SINGDCurvature._cache_outer`)."""
    return numel < method.update_every * dims.d_g * dims.d_a


class SINGDCurvature(Curvature):
    """Structured ``K``, ``C`` and (with α₁ > 0) their Riemannian momenta."""

    method_types = (SINGD,)
    method: SINGD

    def __init__(self, method: SINGD, dims: LayerDims, **kwargs: Any) -> None:
        super().__init__(method, dims, **kwargs)
        factory = {"dtype": self.dtype, "device": self.device}
        self.K = k_structure(method, dims).eye(dims.d_a, **factory)
        self.C = c_structure(method, dims).eye(dims.d_g, **factory)
        self.alpha1 = method.momentum
        self.m_K = self.K.zeros_like() if self.alpha1 else None
        self.m_C = self.C.zeros_like() if self.alpha1 else None
        #: fp16 products overflow or underflow: statistics and the preconditioner run in fp32 then.
        self.stage_dtype = torch.float32 if self.dtype == torch.float16 else self.dtype
        self.H_K: StructuredMatrix | None = None
        self.H_C: StructuredMatrix | None = None
        self.updates = 0
        self.KKt: PartsMatrix | None = None
        self.CCt: PartsMatrix | None = None
        self._cache_outer()

    @classmethod
    def state_dtype(cls, method: SINGD, param_dtype: torch.dtype) -> torch.dtype:
        return method.dtype or param_dtype

    # -- statistics -------------------------------------------------------------
    def accumulate(self, a: Tensor, g: Tensor) -> None:
        # diagonal A: a = diag(aᵀa); with K diagonal, Π(Kᵀ diag(a) K) is what the one column √a gives
        columns = a.sqrt().unsqueeze(1) if self.dims.diagonal_a else a.T
        h_k = self.K.from_inner(columns, self.stage_dtype)
        h_c = self.C.from_inner(g.T, self.stage_dtype)
        self.H_K = h_k if self.H_K is None else self.H_K.add_(h_k)
        self.H_C = h_c if self.H_C is None else self.H_C.add_(h_c)

    def discard(self) -> None:
        self.H_K = self.H_C = None

    def update(self, step: int, counts: BatchCounts | None) -> None:
        if counts is None or self.H_K is None or self.H_C is None:
            return
        h_k = self.H_K.mul_(1.0 / counts.rows).to(self.dtype)
        h_c = self.H_C.mul_(self.g_scale(counts)).to(self.dtype)
        self.discard()
        self._step_factors(step, h_k, h_c)
        self.updates += 1

    # -- distributed (singd_rkfac.distributed) ---------------------------------------------
    distributed_support = True

    def exchange_statistics(
        self, exchange: Any, local: BatchCounts | None, total: BatchCounts, rows_per_rank: list[int]
    ) -> None:
        # H_K = Π(Kᵀ aᵀa K) is linear in aᵀa and K is the same on every rank: the sums add up.
        if self.H_K is None or self.H_C is None:  # nothing captured on this rank: it adds zeros
            self.H_K, self.H_C = self.K.zeros_like().to(self.stage_dtype), self.C.zeros_like().to(self.stage_dtype)
        elif local is not None:
            self.H_C.mul_(self.g_weight(local, total))
        parts_k, parts_c = list(self.H_K.tensors().values()), list(self.H_C.tensors().values())

        def receive(reduced: list[Tensor]) -> None:
            names_k, names_c = self.H_K.parts, self.H_C.parts
            self.H_K = self.H_K._with(dict(zip(names_k, reduced[: len(parts_k)])))
            self.H_C = self.H_C._with(dict(zip(names_c, reduced[len(parts_k) :])))

        exchange.all_reduce(parts_k + parts_c, receive)

    def update_assigned(self, step: int, counts: BatchCounts | None, *, compute: bool = True) -> bool:
        if counts is None or self.H_K is None or self.H_C is None:
            return False
        if compute:
            self.update(step, counts)
        else:  # the owner sends K, C, the momenta and the cached outer products
            self.discard()
        return True

    def _shared_matrices(self) -> dict[str, PartsMatrix | None]:
        return {**self._matrices(), "KKt": self.KKt, "CCt": self.CCt}

    def shared_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            f"{key}.{part}": tensor
            for key, matrix in self._shared_matrices().items()
            if matrix is not None
            for part, tensor in matrix.tensors().items()
        }
        state["updates"] = self.updates
        return state

    def load_shared_state(self, state: dict[str, Any]) -> None:
        for key, matrix in self._shared_matrices().items():
            if matrix is not None:
                setattr(self, key, matrix._with({part: state[f"{key}.{part}"] for part in matrix.parts}))
        self.updates = int(state["updates"])

    def _step_factors(self, step: int, h_k: StructuredMatrix, h_c: StructuredMatrix) -> None:
        method, damping = self.method, self.method.damping
        k_tk, c_tc = self.K.from_inner(), self.C.from_inner()
        if method.kfac_like:
            coefficients = (1.0, damping, 1.0, damping)
        else:
            coefficients = (
                h_c.average_trace(), damping * c_tc.average_trace(),
                h_k.average_trace(), damping * k_tk.average_trace(),
            )
        scale = 0.5 * (1.0 - self.alpha1) if method.normalize_lr_cov else 0.5
        lr_cov = method.lr_cov_at(step)
        c = [scale * coefficient for coefficient in coefficients]
        new_m_k = h_k.mul_(c[0]).add_(k_tk, alpha=c[1]).diag_add_(-scale)
        new_m_c = h_c.mul_(c[2]).add_(c_tc, alpha=c[3]).diag_add_(-scale)
        if self.alpha1:
            new_m_k.add_(self.m_K, alpha=self.alpha1)
            new_m_c.add_(self.m_C, alpha=self.alpha1)
        step_k, step_c = self.K.matmul(new_m_k), self.C.matmul(new_m_c)
        # One reduction per part of the two products checks the whole update: every entry of m̂ is
        # multiplied into K m̂ and x·inf, x·NaN are never finite. A non-finite update changes nothing.
        ok = torch.isfinite(step_k.total() + step_c.total())
        beta_k, beta_c = lr_cov, lr_cov
        if method.normalize_lr_cov:
            beta_k, beta_c = (torch.where(ok, lr_cov / m.max_abs().clamp_min(1.0), 0.0) for m in (new_m_k, new_m_c))
        self.K.add_(step_k.where_(ok), alpha=-beta_k)
        self.C.add_(step_c.where_(ok), alpha=-beta_c)
        if self.alpha1:
            self.m_K, self.m_C = new_m_k.select_(ok, self.m_K), new_m_c.select_(ok, self.m_C)
        self._cache_outer()

    def _cache_outer(self) -> None:
        """Keep ``K Kᵀ`` / ``C Cᵀ`` (`StructuredMatrix.outer_self`) when it saves work between updates.

        Applying the cached product saves one structured product per step
        (``numel(K)·d_g`` flops); forming it costs ``numel(K)·b`` once per ``T``
        steps (``b`` the block width, or ``k1 + k2`` for hierarchical, with
        ``numel(K) ≈ b·d_a``), so it is kept when ``numel(K) < T·d_g·d_a``
        (``C`` alike).
        """
        method, dims = self.method, self.dims
        self.KKt = self.K.outer_self(out=self.KKt) if keeps_outer(self.K.numel(), method, dims) else None
        self.CCt = self.C.outer_self(out=self.CCt) if keeps_outer(self.C.numel(), method, dims) else None

    # -- preconditioning -------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return True  # K = C = I is a valid (identity) preconditioner

    def elementwise_factors(self) -> tuple[Tensor, Tensor] | None:
        if isinstance(self.K, DiagonalMatrix) and isinstance(self.C, DiagonalMatrix):
            return self.C.diag, self.K.diag
        return None

    def precondition(self, grad: Tensor) -> Tensor:
        # fp16 state: apply in fp32 — C Cᵀ ∇W K Kᵀ can exceed fp16's range although every factor fits
        work = self.stage_dtype
        grad = grad.to(work)
        k_kt, c_ct = (None if m is None else m.to(dtype=work) for m in (self.KKt, self.CCt))
        # ∇W K Kᵀ: one product with the cached K Kᵀ, else two structured products
        right = k_kt.rmul(grad) if k_kt is not None else self.K.to(dtype=work).apply_outer(grad.T).T
        return c_ct.mv(right) if c_ct is not None else self.C.to(dtype=work).apply_outer(right)

    # -- state ---------------------------------------------------------------------------
    def _matrices(self) -> dict[str, StructuredMatrix]:
        matrices = {"K": self.K, "C": self.C}
        if self.alpha1:
            matrices.update(m_K=self.m_K, m_C=self.m_C)
        return matrices

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            f"{key}.{part}": tensor
            for key, matrix in self._matrices().items()
            for part, tensor in matrix.tensors().items()
        }
        state["updates"] = self.updates
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, matrix in self._matrices().items():
            matrix.load_({part: state[f"{key}.{part}"] for part in matrix.parts})
        self.updates = int(state["updates"])
        self._cache_outer()

    def memory_bytes(self) -> int:
        """The state's bytes plus the cached ``K Kᵀ`` and ``C Cᵀ``, which also persist between steps."""
        return super().memory_bytes() + sum(m.nbytes() for m in (self.KKt, self.CCt) if m is not None)

    @classmethod
    def describe_note(cls, method: SINGD, dims: LayerDims) -> str:
        k, c = k_structure(method, dims), c_structure(method, dims)
        notes = [f"K {k.summary()}{' (one-hot input)' if dims.diagonal_a else ''}, "
                 f"C {c.summary()}{' (depthwise)' if dims.diagonal_g else ''}"]
        notes += [f"{side}: {note}" for side, note in (("K", k.clip_note(dims.d_a)), ("C", c.clip_note(dims.d_g))) if note]
        return "; ".join(notes)

    @classmethod
    def estimate_bytes(cls, method: SINGD, dims: LayerDims, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        copies = 2 if method.momentum else 1
        numbers = 0
        for structure, dim in ((k_structure(method, dims), dims.d_a), (c_structure(method, dims), dims.d_g)):
            numel = structure.numel(dim)
            numbers += copies * numel + (structure.outer_numel(dim) if keeps_outer(numel, method, dims) else 0)
        return size * numbers

    @classmethod
    def cost(cls, method: SINGD, dims: LayerDims) -> float:
        d_a, d_g = dims.d_a, dims.d_g
        n_k, n_c = k_structure(method, dims).numel(d_a), c_structure(method, dims).numel(d_g)
        apply = 2.0 * (n_k * d_g + n_c * d_a)  # K Kᵀ on d_g columns, C Cᵀ on d_a columns
        update = 4.0 * (n_k * d_a + n_c * d_g) / method.update_every  # Π(KᵀK), K m_K, the H terms
        return apply + update
