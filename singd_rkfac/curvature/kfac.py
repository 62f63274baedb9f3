"""The K-FAC family: two factors, each with its own inverse representation.

``V = (G + λ_G I)⁻¹ ∇W (A + λ_A I)⁻¹`` (π-damping) or ``(A ⊗ G + λI)⁻¹ vec ∇W``
(exact damping, from both eigen-representations). Each side is a `Factor`
chosen by the method's ``a`` / ``g`` fields: dense eigh/Cholesky (K-FAC),
randomized sketches (R-KFAC, SRE-KFAC, Nyström) or Brand's online update
(B-KFAC, B-R-KFAC, B-KFAC-c). DESIGN §3.1, §3.2. A side that is diagonal by
construction (`LayerDims.diagonal_a`, embeddings) is a `DiagonalFactor`
whatever the representation asked for: ``d`` numbers, exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..layers import LayerDims
from ..linalg import SKETCHES, FailureTracker, exact_damped_solve
from ..methods import AUTO_DENSE_MAX, AUTO_DIAGONAL_MIN, BKFACC, BRKFAC, KFAC, LowRankKFAC
from .base import BatchCounts, Curvature
from .brand import BrandFactor
from .factors import DenseFactor, DiagonalFactor, Factor, SketchedFactor

__all__ = ["KFACCurvature", "make_factor", "factor_note"]

SIDES = ("a", "g")
PREFIXES = {"a": "A", "g": "G"}
DIAGONAL_NOTES = {"a": "diagonal (one-hot input)", "g": "diagonal (depthwise: one channel per group)"}


def factor_sides(dims: LayerDims) -> tuple[tuple[str, int, bool], ...]:
    """``(side, dimension, diagonal by construction)`` of a layer's two factors."""
    return ("a", dims.d_a, dims.diagonal_a), ("g", dims.d_g, dims.diagonal_g)


def factor_note(method: KFAC, side: str, dim: int, diagonal: bool = False) -> str:
    """What ``describe()`` says about one factor of ``method`` before training (empty when unremarkable)."""
    if diagonal:
        return DIAGONAL_NOTES[side]
    config = method.factor(side, dim)
    if config.representation == "diagonal":
        text = "diagonal"
    elif not isinstance(config, LowRankKFAC):
        text = ""
    elif config.rank >= dim:
        text = f"rank {config.rank} >= dim {dim}: exact {config.inverse}"
    elif config.representation in SKETCHES:
        text = f"{config.representation} rank {config.rank}"
    else:
        text = f"brand rank {config.rank} (exact if rank + rows >= {dim})"
    if method.chooses_by_width(side) and text:
        bound = AUTO_DIAGONAL_MIN if config.representation == "diagonal" else AUTO_DENSE_MAX
        text = f"{text} (auto: width {dim} > {bound})"
    return text


def make_factor(
    method: KFAC, side: str, dim: int, *, seed_text: str, device: torch.device, dtype: torch.dtype, diagonal: bool = False
) -> Factor:
    """The factor implementing ``method``'s representation of ``side``, ``dim`` wide (``diagonal``: by construction)."""
    config = method.factor(side, dim)
    factory = {"device": device, "dtype": dtype}
    if diagonal or config.representation == "diagonal":
        # only an embedding's A arrives as diag(aᵀa); every other diagonal factor gets rows
        factor: Factor = DiagonalFactor(dim, config, given_diagonal=diagonal and side == "a", **factory)
    elif not isinstance(config, LowRankKFAC) or config.rank >= dim:
        factor = DenseFactor(dim, config, **factory)
    elif config.representation in SKETCHES:
        factor = SketchedFactor(dim, config, seed_text=seed_text, **factory)
    else:
        factor = BrandFactor(dim, config, seed_text=seed_text, **factory)
    factor.note = factor_note(method, side, dim, diagonal)
    return factor


#: Rows per statistics step assumed by the cost model (batch × positions is unknown before training).
MODEL_ROWS = 128


def factor_bytes(config: KFAC, dim: int, exact: bool, inverse_every: int, diagonal: bool = False) -> int:
    """Elements of persistent state one factor of ``dim`` holds (DESIGN §3.6 memory column).

    ``inverse_every`` is the layer's (the outer method's) period: above 1 a
    Brand factor keeps the previous basis for preconditioning too.
    """
    if diagonal or config.representation == "diagonal":
        return 2 * dim  # running diagonal + the snapshot it is inverted from
    if not isinstance(config, LowRankKFAC) or config.rank >= dim:
        return 2 * dim * dim + (dim if exact else 0)  # EA factor + inverse (or eigenvectors and values)
    kept = config.rank * (dim + 1)
    if config.representation in SKETCHES:
        return dim * dim + kept
    snapshots = 2 if inverse_every > 1 else 1
    periodic = dim * dim if config.representation != "brand" else 0
    return snapshots * kept + periodic


def factor_cost(config: KFAC, dim: int, other: int, periods: KFAC, diagonal: bool = False) -> float:
    """Flops per step of one factor (statistics, decomposition, its half of the application).

    ``config`` is the factor's representation; ``periods`` the layer's method,
    whose ``stats_every`` / ``inverse_every`` schedule it.
    """
    if diagonal or config.representation == "diagonal":
        return MODEL_ROWS * dim / periods.stats_every + dim / periods.inverse_every + dim * other
    if not isinstance(config, LowRankKFAC) or config.rank >= dim:
        return MODEL_ROWS * dim**2 / periods.stats_every + 10.0 * dim**3 / periods.inverse_every + dim**2 * other
    rank, apply = config.rank, 2.0 * config.rank * dim * other
    if config.representation in SKETCHES:
        sketch = (rank + config.oversample) * dim**2 * (config.power_iters + 2)
        return MODEL_ROWS * dim**2 / periods.stats_every + sketch / periods.inverse_every + apply
    brand = 4.0 * dim * (rank + MODEL_ROWS) ** 2 / periods.stats_every
    if isinstance(config, BRKFAC):
        brand += MODEL_ROWS * dim**2 / periods.stats_every
        brand += (rank + config.oversample) * dim**2 * (config.power_iters + 2) / config.refresh_every
    elif isinstance(config, BKFACC):
        brand += MODEL_ROWS * dim**2 / periods.stats_every
        brand += dim**2 * rank * config.correct_fraction / config.correct_every
    return brand + apply


class KFACCurvature(Curvature):
    """The K-FAC family: EA statistics per factor, each with its own inverse representation."""

    method_types = (KFAC,)
    method: KFAC

    def __init__(self, method: KFAC, dims: LayerDims, **kwargs: Any) -> None:
        super().__init__(method, dims, **kwargs)
        self.factors: dict[str, Factor] = {
            side: make_factor(
                method, side, dim, seed_text=f"{self.name}/{side}", device=self.device, dtype=self.dtype, diagonal=diagonal
            )
            for side, dim, diagonal in factor_sides(dims)
        }
        self.exact = method.damping_mode == "exact"
        self.folds = 0
        self.decompositions = 0
        self.failures = FailureTracker(self.name, self.max_failures)
        #: What the last `update_assigned` changed beyond running averages ("a", "g", "decomposition").
        self._changed: list[str] = []

    @property
    def a_factor(self) -> Factor:
        return self.factors["a"]

    @property
    def g_factor(self) -> Factor:
        return self.factors["g"]

    def accumulate(self, a: Tensor, g: Tensor) -> None:
        self.factors["a"].accumulate(a)
        self.factors["g"].accumulate(g)

    def discard(self) -> None:
        for factor in self.factors.values():
            factor.discard()

    def update(self, step: int, counts: BatchCounts | None) -> None:
        self.update_assigned(step, counts, compute=True)

    def update_assigned(self, step: int, counts: BatchCounts | None, *, compute: bool = True) -> bool:
        # One process: compute=True always. Distributed: only the layer's owner decomposes
        # (and runs Brand folds); every rank keeps the running averages.
        self._changed = []
        if counts is not None:
            for side, factor in self.factors.items():
                self.factors[side] = factor = factor.settle(counts.rows)
                scale = 1.0 / counts.rows if side == "a" else self.g_scale(counts)
                factor.fold(scale, self.method.ema, compute=compute)
                if factor.assigned_fold:
                    self._changed.append(side)
            self.folds += 1
        due = step % self.method.inverse_every == 0 or not self.ready
        if due and self.folds > 0:
            # a factor whose every batch so far was non-finite (dropped) has nothing to invert yet
            if compute and all(f.has_statistics() for f in self.factors.values()):
                self._decompose(step)
            self._changed.append("decomposition")
        return bool(self._changed)

    # -- distributed (singd_rkfac.distributed) ---------------------------------------------
    distributed_support = True
    memory_split = True  # statistics are plain grams / rows; counters and factor flags are numbers

    def exchange_statistics(
        self, exchange: Any, local: BatchCounts | None, total: BatchCounts, rows_per_rank: list[int]
    ) -> None:
        for side, factor in self.factors.items():
            # decide Brand validity on the global row count, before choosing what to send
            self.factors[side] = factor = factor.settle(total.rows)
            weight = 1.0 if side == "a" or local is None else self.g_weight(local, total)
            factor.exchange(exchange, weight, rows_per_rank)

    def shared_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "decompositions": self.decompositions,
            "failures": self.failures.consecutive,
            "failures_total": self.failures.total,
        }
        for side, factor in self.factors.items():
            if side in self._changed:
                state.update(factor.fold_state(PREFIXES[side]))
            if "decomposition" in self._changed:
                state.update(factor.decomposition_state(PREFIXES[side]))
        return state

    def release(self) -> None:
        for factor in self.factors.values():
            factor.release()

    def load_shared_state(self, state: dict[str, Any]) -> None:
        self.decompositions = int(state["decompositions"])
        self.failures.consecutive = int(state["failures"])
        self.failures.total = int(state["failures_total"])
        for side, factor in self.factors.items():
            factor.load_shared(state, PREFIXES[side])

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

    def _decompose(self, step: int) -> None:
        damping_a, damping_g = self._factor_dampings()
        new_a = self.a_factor.decompose(damping_a, step)
        new_g = self.g_factor.decompose(damping_g, step) if new_a is not None else None
        ok = new_a is not None and new_g is not None
        if ok:
            self.a_factor.commit(new_a)
            self.g_factor.commit(new_g)
            self.decompositions += 1
        self.failures.record(ok)

    @property
    def ready(self) -> bool:
        return self.decompositions > 0

    def precondition(self, grad: Tensor) -> Tensor:
        grad = grad.to(self.dtype)
        if self.exact:
            eig_g, eig_a = self.g_factor.inverse.eigen, self.a_factor.inverse.eigen
            return exact_damped_solve(grad, eig_g, eig_a, self.method.damping)
        return self.g_factor.apply(self.a_factor.apply(grad, "right"), "left")

    def note(self) -> str:
        return "; ".join(f"{PREFIXES[side]}: {f.note}" for side, f in self.factors.items() if f.note)

    @classmethod
    def describe_note(cls, method: KFAC, dims: LayerDims) -> str:
        notes = {side: factor_note(method, side, dim, diagonal) for side, dim, diagonal in factor_sides(dims)}
        return "; ".join(f"{PREFIXES[side]}: {text}" for side, text in notes.items() if text)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"folds": self.folds, "decompositions": self.decompositions}
        for side, factor in self.factors.items():
            state.update(factor.state(PREFIXES[side]))
            state[f"{PREFIXES[side]}_kind"] = type(factor).__name__
            state[f"{PREFIXES[side]}_note"] = factor.note
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for side, factor in self.factors.items():
            prefix = PREFIXES[side]
            if state.get(f"{prefix}_kind", "DenseFactor") != type(factor).__name__:
                assert isinstance(factor, BrandFactor)  # the only factor that changes kind
                self.factors[side] = factor = factor.handover()
            factor.load(state, prefix)
            factor.note = state.get(f"{prefix}_note", factor.note)
        self.folds = int(state["folds"])
        self.decompositions = int(state["decompositions"])

    @classmethod
    def estimate_bytes(cls, method: KFAC, dims: LayerDims, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        exact = method.damping_mode == "exact"
        return size * sum(
            factor_bytes(method.factor(side, dim), dim, exact, method.inverse_every, diagonal)
            for side, dim, diagonal in factor_sides(dims)
        )

    @classmethod
    def cost(cls, method: KFAC, dims: LayerDims) -> float:
        other = {"a": dims.d_g, "g": dims.d_a}
        return sum(
            factor_cost(method.factor(side, dim), dim, other[side], method, diagonal) for side, dim, diagonal in factor_sides(dims)
        )
