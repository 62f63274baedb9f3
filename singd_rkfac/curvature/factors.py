"""One Kronecker factor of the K-FAC family: statistics, decomposition, damped inverse.

A `Factor` owns the running statistics of one side (A or G) of a layer and
an *inverse representation* refreshed by `decompose`:

* `DenseFactor` — the EA factor (``d × d``) and an eigh/Cholesky inverse (K-FAC);
* `DiagonalFactor` — a factor that is diagonal by construction (one-hot
  inputs, `LayerDims.diagonal_a`): ``d`` numbers, whatever the method;
* `SketchedFactor` — the EA factor and a randomized low-rank eigendecomposition
  (R-KFAC, SRE-KFAC, Nyström);
* `BrandFactor` (in ``brand.py``) — Brand's online low-rank update, no ``d × d``.

`KFACCurvature` combines two factors; ``decompose`` and ``commit`` are split
so that a layer only takes new representations when both sides succeeded.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..linalg import (
    Eigen,
    damped_inverse_apply,
    inverse_from_eigh,
    robust_cholesky,
    robust_decompose,
    robust_eigh,
    sketch_eigen,
    with_complement,
)
from ..methods import KFAC, SketchedKFAC

__all__ = ["Factor", "DenseFactor", "DiagonalFactor", "SketchedFactor", "Inverse", "adapted_rank", "layer_generator", "take"]


class Inverse(NamedTuple):
    """A factor's inverse representation.

    Attributes:
        matrix: the dense damped inverse ``(F + λI)⁻¹`` (π-damping, dense factors).
        eigen: eigenpairs (dense or low-rank with complement) otherwise.
        damping: λ baked in under π-damping; ``None`` under exact damping.
    """

    matrix: Tensor | None = None
    eigen: Eigen | None = None
    damping: Tensor | None = None


def take(state: dict[str, Any], key: str, like: Tensor) -> Tensor:
    """``state[key]`` copied onto ``like``'s device and dtype."""
    return state[key].to(device=like.device, dtype=like.dtype).clone()


def adapted_rank(values: Tensor, bounds: tuple[int, int], target: float) -> int:
    """``⌈1.5·n⌉`` clipped to ``bounds``, ``n`` = eigenvalues ``≥ target·max`` (ascending ``values``).

    Grows the rank while every kept mode is significant, shrinks it towards
    1.5× the significant count otherwise; stationary on a fixed spectrum.
    Runs on decomposition steps only (one host sync).
    """
    significant = int((values >= target * values[-1]).sum()) if values.numel() else 0
    return min(bounds[1], max(bounds[0], math.ceil(1.5 * significant)))


class Factor(ABC):
    """Base: inverse representation, its application and its state.

    Subclasses implement statistics (`accumulate`, `discard`, `fold`,
    `mean_eigenvalue`, `has_statistics`), `decompose` and `exchange`.
    """

    def __init__(self, dim: int, config: KFAC, *, device: torch.device, dtype: torch.dtype) -> None:
        self.dim = dim
        self.config = config
        self.device = device
        self.dtype = dtype
        self.inverse: Inverse | None = None
        #: Text for ``describe()`` (e.g. why an exact representation was chosen).
        self.note = ""

    # -- statistics (subclasses) ------------------------------------------------
    @abstractmethod
    def accumulate(self, rows: Tensor) -> None:
        """Stage rows ``(m, dim)`` of one call."""

    @abstractmethod
    def discard(self) -> None:
        """Drop the staged rows."""

    @abstractmethod
    def fold(self, scale: float, ema: float, *, compute: bool = True) -> None:
        """Fold staged rows into the running average ``F ← ρF + (1−ρ)·scale·Σ rowsᵀrows``.

        ``compute=False`` (a rank that does not own the layer): skip the
        assignable part of the fold (`assigned_fold`), only drop the rows.
        """

    @abstractmethod
    def mean_eigenvalue(self) -> Tensor:
        """``tr(F) / dim`` as a 0-d tensor (for π-damping)."""

    @abstractmethod
    def has_statistics(self) -> bool:
        """Whether a finite batch has been folded in (one host sync; decomposition steps only)."""

    @abstractmethod
    def decompose(self, damping: Tensor | None, step: int) -> Inverse | None:
        """A new inverse representation (``damping`` λ under π, ``None`` under exact), or ``None`` on failure."""

    def settle(self, rows: int) -> "Factor":
        """The factor to use from now on, given this step's row count (Brand may hand over to dense)."""
        return self

    # -- distributed (see Curvature.exchange_statistics / update_assigned) -------------
    #: Whether `fold` itself is the expensive, assignable work (Brand's eigh) rather than a running average.
    assigned_fold = False

    @abstractmethod
    def exchange(self, exchange: Any, weight: float | Tensor, rows_per_rank: list[int]) -> None:
        """Hand the staged statistics, pre-multiplied by ``weight``, to the distributed ``exchange``."""

    def fold_state(self, prefix: str) -> dict[str, Any]:
        """State an assigned `fold` changed (sent by the layer's owner)."""
        return {}

    def decomposition_state(self, prefix: str) -> dict[str, Any]:
        """State `decompose` + `commit` changed (sent by the layer's owner)."""
        return {f"{prefix}_decomposed": 1, **Factor.state(self, prefix)}

    def load_shared(self, state: dict[str, Any], prefix: str) -> None:
        """Take what the owner sent (`fold_state` / `decomposition_state` keys present in ``state``).

        Under MEM-OPT only the plain numbers arrive: a decomposition step then
        leaves this (non-owning) factor without an inverse.
        """
        if f"{prefix}_decomposed" in state:
            Factor.load(self, state, prefix)

    def release(self) -> None:
        """Drop the inverse representation (a MEM-OPT non-owner keeps none)."""
        self.inverse = None

    # -- inverse --------------------------------------------------------------------
    def commit(self, inverse: Inverse) -> None:
        self.inverse = inverse

    def apply(self, x: Tensor, side: str) -> Tensor:
        """``x (F+λI)⁻¹`` (``side="right"``) or ``(F+λI)⁻¹ x`` (``"left"``) under π-damping."""
        matrix, eigen, damping = self.inverse
        if matrix is not None:
            return x @ matrix if side == "right" else matrix @ x
        return damped_inverse_apply(x, eigen, damping, side)

    # -- state -----------------------------------------------------------------------
    def state(self, prefix: str) -> dict[str, Any]:
        if self.inverse is None:
            return {}
        matrix, eigen, damping = self.inverse
        state: dict[str, Any] = {}
        if matrix is not None:
            state[f"{prefix}_inverse"] = matrix
        if eigen is not None:
            state[f"{prefix}_eigenvalues"] = eigen.values
            if eigen.vectors is not None:  # None: a diagonal factor
                state[f"{prefix}_eigenvectors"] = eigen.vectors
            if eigen.complement is not None:
                state[f"{prefix}_complement"] = eigen.complement
        if damping is not None:
            state[f"{prefix}_damping"] = damping
        return state

    def load(self, state: dict[str, Any], prefix: str) -> None:
        like = torch.empty((), device=self.device, dtype=self.dtype)

        def optional(key: str) -> Tensor | None:
            return take(state, f"{prefix}_{key}", like) if f"{prefix}_{key}" in state else None

        matrix, values, complement, damping = (optional(k) for k in ("inverse", "eigenvalues", "complement", "damping"))
        eigen = None if values is None else Eigen(values, optional("eigenvectors"), complement)
        self.inverse = None if matrix is None and eigen is None else Inverse(matrix, eigen, damping)


class DenseFactor(Factor):
    """The EA factor ``F`` (``d × d``) with a dense eigh or Cholesky inverse.

    The running average never admits a non-finite batch (``torch.where`` on a
    fused finiteness check, no host sync), and the first finite batch replaces
    the zero initial value exactly (no identity blending).
    """

    def __init__(self, dim: int, config: KFAC, **kwargs: Any) -> None:
        super().__init__(dim, config, **kwargs)
        self.value = torch.zeros(self.value_shape, device=self.device, dtype=self.dtype)
        self.initialized = torch.zeros((), dtype=torch.bool, device=self.device)
        self.staged: Tensor | None = None

    @property
    def value_shape(self) -> tuple[int, ...]:
        """Shape of the running statistics: ``(d, d)``."""
        return (self.dim, self.dim)

    def accumulate(self, rows: Tensor) -> None:
        gram = rows.T @ rows
        self.staged = gram if self.staged is None else self.staged.add_(gram)

    def discard(self) -> None:
        self.staged = None

    def fold(self, scale: float, ema: float, *, compute: bool = True) -> None:
        if self.staged is None:
            return
        batch = self.staged.mul_(scale)
        self.staged = None
        finite = torch.isfinite(batch.sum())  # one reduction: inf/NaN anywhere reach the sum
        keep = self.initialized.to(batch.dtype) * ema  # weight of the old value, in the factor's dtype
        # in place: F ← F + (1−ρ)(batch − F); a non-finite batch is zeroed and gets weight 0 (F unchanged)
        self.value.lerp_(batch.masked_fill_(~finite, 0.0), torch.where(finite, 1.0 - keep, 0.0))
        self.initialized = self.initialized | finite

    def mean_eigenvalue(self) -> Tensor:
        return self.value.diagonal().mean()

    def exchange(self, exchange: Any, weight: float | Tensor, rows_per_rank: list[int]) -> None:
        staged = self.staged
        if staged is None:  # nothing captured on this rank: it adds zeros
            staged = torch.zeros_like(self.value)
        elif not (isinstance(weight, float) and weight == 1.0):
            staged = staged.mul_(weight.to(staged.dtype) if isinstance(weight, Tensor) else weight)
        exchange.all_reduce([staged], self._set_staged)

    def _set_staged(self, reduced: list[Tensor]) -> None:
        self.staged = reduced[0]

    def has_statistics(self) -> bool:
        return bool(self.initialized)

    def decompose(self, damping: Tensor | None, step: int) -> Inverse | None:
        if damping is None:
            eigen = robust_eigh(self.value)
            return None if eigen is None else Inverse(eigen=Eigen(*eigen))
        if self.config.inverse == "eigh":
            eigen = robust_eigh(self.value)
            return None if eigen is None else Inverse(matrix=inverse_from_eigh(*eigen, damping))
        shifted = self.value.clone()  # F + λI without a d × d identity or a second temporary
        shifted.diagonal().add_(damping)
        chol = robust_cholesky(shifted)
        return None if chol is None else Inverse(matrix=torch.cholesky_inverse(chol))

    def state(self, prefix: str) -> dict[str, Any]:
        return {prefix: self.value, f"{prefix}_initialized": self.initialized, **super().state(prefix)}

    def load(self, state: dict[str, Any], prefix: str) -> None:
        self.value = take(state, prefix, self.value)
        self.initialized = take(state, f"{prefix}_initialized", self.initialized)
        super().load(state, prefix)


class DiagonalFactor(DenseFactor):
    """A factor kept as its diagonal ``(d,)``: diagonal by construction, or by choice (`DiagonalKFAC`).

    `accumulate` takes the rows ``(m, d)`` and stages ``diag(rowsᵀrows)``, or
    — for a factor diagonal by construction (``given_diagonal``) — that
    diagonal itself (``(d,)``, e.g. token counts of one-hot rows). The running
    average and its finiteness guard are `DenseFactor`'s, on the vector. The
    inverse is the diagonal itself (``Eigen(values, vectors=None)``), under
    either damping.
    """

    def __init__(self, dim: int, config: KFAC, *, given_diagonal: bool = True, **kwargs: Any) -> None:
        super().__init__(dim, config, **kwargs)
        self.given_diagonal = given_diagonal

    @property
    def value_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def accumulate(self, rows: Tensor) -> None:
        diagonal = rows.clone() if self.given_diagonal else rows.square().sum(0)
        self.staged = diagonal if self.staged is None else self.staged.add_(diagonal)

    def mean_eigenvalue(self) -> Tensor:
        return self.value.mean()

    def decompose(self, damping: Tensor | None, step: int) -> Inverse | None:
        return Inverse(eigen=Eigen(self.value.clamp_min(0.0), None), damping=damping)


def layer_generator(device: torch.device, seed_text: str) -> torch.Generator:
    """A generator seeded from text (the layer and side), identical in every process."""
    generator = torch.Generator(device=device)
    generator.manual_seed(zlib.crc32(seed_text.encode()))
    return generator


class SketchedFactor(DenseFactor):
    """The EA factor with a randomized top-``rank`` eigendecomposition (R-KFAC, SRE-KFAC, Nyström).

    The sketch's Gaussian test matrices come from a per-factor generator
    (seeded from the layer name, checkpointed), so runs are reproducible and
    every process draws the same sketch.
    """

    config: SketchedKFAC

    def __init__(self, dim: int, config: SketchedKFAC, *, seed_text: str, **kwargs: Any) -> None:
        super().__init__(dim, config, **kwargs)
        self.rank = config.rank
        self.generator = layer_generator(self.device, seed_text)

    def _sketch(self, matrix: Tensor) -> tuple[Tensor, Tensor]:
        config = self.config
        return sketch_eigen(matrix, config.representation, self.rank, config.oversample, config.power_iters, self.generator)

    def decompose(self, damping: Tensor | None, step: int) -> Inverse | None:
        result = robust_decompose(self._sketch, self.value)
        if result is None:
            return None
        values, vectors = result
        bounds = self.config.rank_bounds
        if bounds is not None:
            self.rank = adapted_rank(values, (bounds[0], min(bounds[1], self.dim)), self.config.rank_target)
        return Inverse(eigen=with_complement(values, vectors, self.config.complement), damping=damping)

    def state(self, prefix: str) -> dict[str, Any]:
        return {**super().state(prefix), f"{prefix}_rank": self.rank, f"{prefix}_generator": self.generator.get_state()}

    def decomposition_state(self, prefix: str) -> dict[str, Any]:
        # the owner drew the sketch: its generator (and adapted rank) move on for everybody
        return {**super().decomposition_state(prefix), f"{prefix}_rank": self.rank,
                f"{prefix}_generator": self.generator.get_state()}

    def load_shared(self, state: dict[str, Any], prefix: str) -> None:
        super().load_shared(state, prefix)
        if f"{prefix}_decomposed" in state:
            self.rank = int(state[f"{prefix}_rank"])
            if f"{prefix}_generator" in state:  # not under MEM-OPT: only the owner sketches
                self.generator.set_state(state[f"{prefix}_generator"])

    def load(self, state: dict[str, Any], prefix: str) -> None:
        super().load(state, prefix)
        self.rank = int(state[f"{prefix}_rank"])
        self.generator.set_state(state[f"{prefix}_generator"])
