"""Brand online low-rank factors: B-KFAC, B-R-KFAC and B-KFAC-c (DESIGN §3.2).

A `BrandFactor` keeps the top-``rank`` eigenpairs ``(U, s)`` of the running
average and folds each statistics step's rows ``X`` straight into them:
``eig(ρ U diag(s) Uᵀ + (1−ρ)·scale·X Xᵀ)`` in O(d·(k+m)²), never a ``d × d``
tensor (B-KFAC). B-R-KFAC also keeps the dense EA factor and periodically
replaces ``(U, s)`` by a fresh sketch of it; B-KFAC-c re-diagonalises a random
share of the kept columns against it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..linalg import Eigen, brand_update, corrected, robust_decompose, sketch_eigen, top, with_complement
from ..methods import BKFAC, BKFACC, BRKFAC
from .factors import DenseFactor, Factor, Inverse, adapted_rank, layer_generator, take

__all__ = ["BrandFactor", "brand_note"]


def brand_note(rank: int, rows: int, dim: int, inverse: str) -> str:
    """Why a Brand factor uses the exact representation instead."""
    return f"Brand needs rank + rows < dim ({rank} + {rows} >= {dim}): exact {inverse}"


class BrandFactor(Factor):
    """Brand's truncated eigendecomposition of one EA factor, updated online.

    State: ``values`` ``(k,)``, ``vectors`` ``(d, k)`` with ``k ≤ rank``, the
    exact trace (for π-damping; the truncated values under-count it), and for
    B-R-KFAC / B-KFAC-c the dense EA factor. Rows beyond ``d − rank`` in one
    step are folded in chunks (truncating between chunks).
    """

    config: BKFAC

    def __init__(self, dim: int, config: BKFAC, *, seed_text: str, **kwargs: Any) -> None:
        super().__init__(dim, config, **kwargs)
        factory = {"device": self.device, "dtype": self.dtype}
        self.values = torch.zeros(0, **factory)
        self.vectors = torch.zeros(dim, 0, **factory)
        self.trace = torch.zeros((), **factory)
        self.initialized = False
        self.rank = config.rank
        self.failed = False
        self.staged: list[Tensor] = []
        periodic = isinstance(config, (BRKFAC, BKFACC))
        self.dense = DenseFactor(dim, config, **factory) if periodic else None
        self.generator = layer_generator(self.device, seed_text) if periodic else None
        self.last_periodic = -math.inf

    # -- statistics ----------------------------------------------------------------
    def accumulate(self, rows: Tensor) -> None:
        self.staged.append(rows)
        if self.dense is not None:
            self.dense.accumulate(rows)

    def discard(self) -> None:
        self.staged = []
        if self.dense is not None:
            self.dense.discard()

    def settle(self, rows: int) -> Factor:
        """Hand over to a dense factor if Brand is not valid for the first step's rows."""
        if self.initialized or self.rank + rows < self.dim:
            return self
        dense = self.handover()
        dense.note = brand_note(self.rank, rows, self.dim, self.config.inverse)
        return dense

    def handover(self) -> DenseFactor:
        """The exact dense factor replacing this one, with the staged statistics."""
        if self.dense is not None:
            return self.dense
        dense = DenseFactor(self.dim, self.config, device=self.device, dtype=self.dtype)
        for staged in self.staged:
            dense.accumulate(staged)
        return dense

    assigned_fold = True

    def fold(self, scale: float, ema: float, *, compute: bool = True) -> None:
        if not self.staged:
            return
        rows = torch.cat(self.staged) if len(self.staged) > 1 else self.staged[0]
        self.staged = []
        if self.dense is not None:
            self.dense.fold(scale, ema)
        if not compute:  # another rank owns this layer and sends the result (fold_state)
            return
        # statistics steps of Brand are decompositions: one host sync is their price
        if not bool(torch.isfinite(rows).all()):
            return
        weight = ema if self.initialized else 0.0
        columns = rows.T * math.sqrt((1.0 - weight) * scale)  # (d, m)
        decay = weight
        values, vectors = self.values, self.vectors
        chunk = self.dim - self.rank
        for start in range(0, columns.shape[1], chunk):
            part = columns[:, start : start + chunk]
            result = robust_decompose(
                lambda x: brand_update(values.to(x.dtype), vectors.to(x.dtype), x, decay), part, jitter=False
            )
            if result is None:
                self.failed = True
                return
            values, vectors = top(*result, self.rank)
            decay = 1.0
        self._keep(values, vectors)
        self.trace = self.trace * weight + columns.square().sum()
        self.initialized = True
        self.failed = False

    def _keep(self, values: Tensor, vectors: Tensor) -> None:
        """Store eigenpairs, adapting the rank first when asked."""
        bounds = self.config.rank_bounds
        if bounds is not None and values.numel():
            self.rank = adapted_rank(values, (bounds[0], min(bounds[1], self.dim - 1)), self.config.rank_target)
        self.values, self.vectors = top(values, vectors, self.rank)

    def mean_eigenvalue(self) -> Tensor:
        return self.trace / self.dim

    def has_statistics(self) -> bool:
        return self.initialized

    # -- decomposition --------------------------------------------------------------
    def _periodic(self, step: int) -> None:
        """B-R-KFAC's refresh or B-KFAC-c's correction, when due."""
        config = self.config
        period = config.refresh_every if isinstance(config, BRKFAC) else getattr(config, "correct_every", None)
        if period is None or step - self.last_periodic < period or not bool(self.dense.initialized):
            return
        self.last_periodic = step
        matrix = self.dense.value
        if isinstance(config, BRKFAC):
            sketch = lambda m: sketch_eigen(m, "sre", self.rank, config.oversample, config.power_iters, self.generator)
            result = robust_decompose(sketch, matrix)
        elif self.values.numel():
            fraction = config.correct_fraction
            result = robust_decompose(lambda m: corrected(self.values, self.vectors, m, fraction, self.generator), matrix)
        else:
            return
        if result is not None:
            self._keep(*result)

    def decompose(self, damping: Tensor | None, step: int) -> Inverse | None:
        self._periodic(step)
        if self.failed:
            return None
        return Inverse(eigen=with_complement(self.values, self.vectors, self.config.complement), damping=damping)

    # -- distributed ----------------------------------------------------------------------
    def exchange(self, exchange: Any, weight: float | Tensor, rows_per_rank: list[int]) -> None:
        """All-gather the rows (scaled by ``√weight``): the fold is not linear in a gram, it needs the rows.

        The gathered rows are in rank order, i.e. the concatenated global batch,
        so the chunked, truncating fold equals one process's on that batch. The
        dense factor of B-R-KFAC / B-KFAC-c is re-staged from the gathered rows
        (no ``d × d`` all-reduce).
        """
        if self.staged:
            rows = torch.cat(self.staged) if len(self.staged) > 1 else self.staged[0]
        else:
            rows = torch.zeros(0, self.dim, device=self.device, dtype=self.dtype)
        if not (isinstance(weight, float) and weight == 1.0):
            root = weight.sqrt().to(rows.dtype) if isinstance(weight, Tensor) else math.sqrt(weight)
            rows = rows * root
        exchange.all_gather_rows(rows, rows_per_rank, self._set_gathered)

    def _set_gathered(self, rows: Tensor) -> None:
        self.staged = [rows]
        if self.dense is not None:
            self.dense.discard()
            self.dense.accumulate(rows)

    def fold_state(self, prefix: str) -> dict[str, Any]:
        return {
            f"{prefix}_brand_values": self.values,
            f"{prefix}_brand_vectors": self.vectors,
            f"{prefix}_trace": self.trace,
            f"{prefix}_brand_initialized": self.initialized,
            f"{prefix}_rank": self.rank,
            f"{prefix}_failed": self.failed,
        }

    def decomposition_state(self, prefix: str) -> dict[str, Any]:
        # the periodic refresh / correction may have changed (U, s) and drawn from the generator
        state = {**self.fold_state(prefix), f"{prefix}_last_periodic": self.last_periodic}
        if self.generator is not None:
            state[f"{prefix}_generator"] = self.generator.get_state()
        inverse = self.inverse
        if inverse is not None and inverse.eigen.values is self.values and inverse.eigen.vectors is self.vectors:
            # the preconditioner uses the live (U, s): send them once
            state[f"{prefix}_decomposed"] = "live"
            if inverse.eigen.complement is not None:
                state[f"{prefix}_complement"] = inverse.eigen.complement
            if inverse.damping is not None:
                state[f"{prefix}_damping"] = inverse.damping
            return state
        return {**state, **super().decomposition_state(prefix)}

    def load_shared(self, state: dict[str, Any], prefix: str) -> None:
        # MEM-OPT sends only the numbers: a non-owner keeps no eigenpairs, but the flags and the
        # rank that decide `settle` (and so which collectives the statistics take) stay in step
        if f"{prefix}_brand_initialized" in state:
            self.initialized = bool(state[f"{prefix}_brand_initialized"])
            self.rank = int(state[f"{prefix}_rank"])
            self.failed = bool(state[f"{prefix}_failed"])
        tensors = f"{prefix}_brand_values" in state
        if tensors:
            self.values = take(state, f"{prefix}_brand_values", self.values)
            self.vectors = take(state, f"{prefix}_brand_vectors", self.vectors)
            self.trace = take(state, f"{prefix}_trace", self.trace)
        decomposed = state.get(f"{prefix}_decomposed")
        if decomposed is None:
            return
        self.last_periodic = float(state[f"{prefix}_last_periodic"])
        if self.generator is not None and f"{prefix}_generator" in state:
            self.generator.set_state(state[f"{prefix}_generator"])
        if decomposed == "live" and not tensors:
            self.inverse = None
        elif decomposed == "live":
            like = self.values
            complement = take(state, f"{prefix}_complement", like) if f"{prefix}_complement" in state else None
            damping = take(state, f"{prefix}_damping", like) if f"{prefix}_damping" in state else None
            self.inverse = Inverse(eigen=Eigen(self.values, self.vectors, complement), damping=damping)
        else:
            super().load_shared(state, prefix)

    def release(self) -> None:
        """Drop the eigenpairs and the inverse (a MEM-OPT non-owner keeps neither)."""
        super().release()
        self.values, self.vectors = self.values.new_zeros(0), self.vectors.new_zeros(self.dim, 0)

    # -- state ------------------------------------------------------------------------
    def state(self, prefix: str) -> dict[str, Any]:
        state: dict[str, Any] = {
            f"{prefix}_brand_values": self.values,
            f"{prefix}_brand_vectors": self.vectors,
            f"{prefix}_trace": self.trace,
            f"{prefix}_brand_initialized": self.initialized,
            f"{prefix}_rank": self.rank,
            f"{prefix}_last_periodic": self.last_periodic,
            **super().state(prefix),
        }
        if self.dense is not None:
            state.update(self.dense.state(f"{prefix}_dense"))
            state[f"{prefix}_generator"] = self.generator.get_state()
        return state

    def load(self, state: dict[str, Any], prefix: str) -> None:
        self.values = take(state, f"{prefix}_brand_values", self.values)
        self.vectors = take(state, f"{prefix}_brand_vectors", self.vectors)
        self.trace = take(state, f"{prefix}_trace", self.trace)
        self.initialized = bool(state[f"{prefix}_brand_initialized"])
        self.rank = int(state[f"{prefix}_rank"])
        self.last_periodic = float(state[f"{prefix}_last_periodic"])
        super().load(state, prefix)
        saved = [state.get(f"{prefix}_{key}") for key in ("eigenvalues", "eigenvectors", "brand_values", "brand_vectors")]
        if saved[0] is not None and all(a.data_ptr() == b.data_ptr() for a, b in zip(saved[:2], saved[2:])):
            # the preconditioner used the live (U, s) when saved: share them again instead of holding two copies
            self.inverse = self.inverse._replace(eigen=self.inverse.eigen._replace(values=self.values, vectors=self.vectors))
        if self.dense is not None:
            self.dense.load(state, f"{prefix}_dense")
            self.generator.set_state(state[f"{prefix}_generator"])
