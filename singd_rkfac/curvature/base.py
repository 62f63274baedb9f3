"""The per-layer ``Curvature`` protocol every method implements (DESIGN §1).

The preconditioner drives one instance per managed layer:

* ``accumulate(a, g)`` from the backward hooks: fold one call's raw factor rows
  into staged (not yet averaged) statistics; cheap.
* ``update(step, counts)`` in ``step()``: fold the staged statistics
  (``counts`` says how many rows and samples they hold; ``None`` when nothing
  was captured) and refresh decompositions when due.
* ``precondition(grad)``: apply the current preconditioner to the
  ``(d_g, d_a)`` gradient matrix.
* ``discard()`` drops staged statistics (a skipped step).

State is plain tensors and numbers (``state_dict``), so checkpoints load with
``torch.load(weights_only=True)`` and keep their dtypes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..layers import LayerDims
from ..methods import CurvatureMethod

if TYPE_CHECKING:
    from ..distributed import StatisticsExchange

__all__ = ["BatchCounts", "Curvature", "per_sample_scale"]


@dataclass(frozen=True)
class BatchCounts:
    """How much the staged statistics of one step hold.

    Attributes:
        rows: number of ``a`` (and ``g``) rows accumulated (samples × positions
            for K-FAC-expand, samples for reduce).
        samples: number of distinct samples (micro-batches add up; a module
            called twice in one forward counts its samples once).
        loss_scale: the AMP loss scale the backward pass ran under (a
            1-element tensor), or ``None``; G-side statistics are divided by its square.
    """

    rows: int
    samples: int
    loss_scale: Tensor | None = None


def per_sample_scale(
    counts: BatchCounts, loss_average: str | None, dtype: torch.dtype, device: torch.device
) -> float | Tensor:
    """Factor turning ``Σ gᵀg`` of raw output gradients into the per-sample average.

    With a batch-averaged loss each output gradient carries ``1/N``;
    ``G = Σ (N g)(N g)ᵀ / N = N Σ g gᵀ``. With a summed loss ``G = Σ g gᵀ / N``.
    Under an AMP loss scale ``s`` it is divided by ``s²`` (a 0-d tensor in at
    least fp32, on ``device``: no host sync).
    """
    n = counts.samples
    scale = float(n) if loss_average == "batch" else 1.0 / n
    if counts.loss_scale is None:
        return scale
    work = torch.promote_types(dtype, torch.float32)  # N/s² underflows fp16
    return (scale / counts.loss_scale.to(device, work).square()).reshape(())


class Curvature(ABC):
    """One layer's curvature state and preconditioner."""

    #: Method config classes this implementation serves (subclasses included).
    method_types: ClassVar[tuple[type[CurvatureMethod], ...]] = ()

    def __init__(
        self,
        method: CurvatureMethod,
        dims: LayerDims,
        *,
        device: torch.device,
        dtype: torch.dtype,
        name: str,
        max_failures: int,
    ) -> None:
        self.method = method
        self.dims = dims
        self.device = device
        self.dtype = dtype
        self.name = name
        self.max_failures = max_failures

    # -- statistics -------------------------------------------------------
    @abstractmethod
    def accumulate(self, a: Tensor, g: Tensor) -> None:
        """Stage one call's rows: ``a`` is ``(m, d_a)``, ``g`` is ``(m, d_g)``, both in ``self.dtype``."""

    @abstractmethod
    def discard(self) -> None:
        """Drop staged statistics without touching any persistent state."""

    @abstractmethod
    def update(self, step: int, counts: BatchCounts | None) -> None:
        """Fold staged statistics (if ``counts``) and refresh what is due at ``step``."""

    def g_scale(self, counts: BatchCounts) -> float | Tensor:
        """Factor turning ``Σ gᵀg`` of raw output gradients into the per-sample average (`per_sample_scale`)."""
        return per_sample_scale(counts, self.method.loss_average, self.dtype, self.device)

    # -- preconditioning --------------------------------------------------
    @property
    @abstractmethod
    def ready(self) -> bool:
        """Whether a preconditioner exists (statistics were folded at least once)."""

    @abstractmethod
    def precondition(self, grad: Tensor) -> Tensor:
        """Preconditioned ``(d_g, d_a)`` gradient matrix, in ``self.dtype``."""

    def elementwise_factors(self) -> tuple[Tensor, Tensor] | None:
        """``(r, c)``, shapes ``(d_g,)`` and ``(d_a,)``, when the preconditioned gradient is
        ``diag(r)² ∇ diag(c)²`` (diagonal SINGD); ``None`` otherwise.

        The preconditioner then scales the gradient in place (`Layer.grad_parts`)
        instead of copying it into a matrix and back: no gradient-sized temporaries.
        """
        return None

    # -- state --------------------------------------------------------------
    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Persistent state: tensors and plain numbers only."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output (dtypes and devices of this instance kept)."""

    def memory_bytes(self) -> int:
        """Bytes of persistent tensor state (tensors sharing storage counted once)."""
        storages = {}
        for value in self.state_dict().values():
            if isinstance(value, Tensor):
                storage = value.untyped_storage()
                storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        return sum(storages.values())

    def note(self) -> str:
        """Extra text for ``describe()`` (e.g. a fallback chosen for one factor)."""
        return self.describe_note(self.method, self.dims)

    @classmethod
    def describe_note(cls, method: CurvatureMethod, dims: LayerDims) -> str:
        """Note for ``describe()`` known before construction (structures, clipped sizes)."""
        return ""

    @classmethod
    def state_dtype(cls, method: CurvatureMethod, param_dtype: torch.dtype) -> torch.dtype:
        """Dtype of the layer's curvature state and captured rows (fp32 at least by default)."""
        return torch.promote_types(param_dtype, torch.float32)

    @classmethod
    @abstractmethod
    def estimate_bytes(cls, method: CurvatureMethod, dims: LayerDims, dtype: torch.dtype) -> int:
        """Persistent state bytes a layer of ``dims`` will hold (before construction)."""

    @classmethod
    @abstractmethod
    def cost(cls, method: CurvatureMethod, dims: LayerDims) -> float:
        """Flops per step, amortised over update periods (DESIGN §3.6 cost model)."""

    # -- distributed data parallel (driven by singd_rkfac.distributed) ---------------
    #: Whether this implementation takes part in multi-process training: it
    #: implements `exchange_statistics` (and, to spread work, `update_assigned`,
    #: `shared_state`, `load_shared_state`).
    distributed_support: ClassVar[bool] = False

    #: Whether MEM-OPT (``grad_worker_fraction = 1/world``) may keep this layer's
    #: preconditioner on its owner only: its statistics must not depend on that
    #: state, `shared_state`'s plain numbers must be all the other ranks need to
    #: stay in step (`load_shared_state` then gets only those), and `precondition`
    #: must return ``self.dtype``. `release` frees what the owner alone keeps.
    memory_split: ClassVar[bool] = False

    def g_weight(self, local: BatchCounts, total: BatchCounts) -> float | Tensor:
        """Weight of one rank's staged G-side sums so that the sum over ranks, folded with ``total``, is exact.

        The global ``G`` is the sample-weighted mean of the ranks' ``G``, each
        made per-sample with its *local* batch (`g_scale` of ``local``, which
        also undoes that rank's loss scale): ``Σ_r (n_r/N)·g_scale(local_r)·S_r``.
        The fold multiplies the reduced sum by ``g_scale(total)`` (``total``
        carries no loss scale), so rank ``r`` pre-multiplies ``S_r`` by
        ``(n_r/N)·g_scale(local_r)/g_scale(total)``: ``(n_r/N)²`` for a
        batch-averaged loss, ``1`` for a summed one. A-side sums need no weight
        (``Σ_r aᵀa / Σ_r rows``).
        """
        return (local.samples / total.samples) * self.g_scale(local) / self.g_scale(replace(total, loss_scale=None))

    def exchange_statistics(
        self, exchange: "StatisticsExchange", local: BatchCounts | None, total: BatchCounts, rows_per_rank: list[int]
    ) -> None:
        """Hand the staged statistics to ``exchange`` so that afterwards every rank holds the global batch's.

        ``local`` is this rank's counts (``None`` when it staged nothing; it
        contributes zeros), ``total`` the sums over ranks (no loss scale: each
        rank pre-weights its own, see `g_weight`), ``rows_per_rank`` the row
        counts of every rank (for gathered rows). Called on every rank, in the
        same layer order, before `update_assigned` with ``total``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not support distributed training")

    def update_assigned(self, step: int, counts: BatchCounts | None, *, compute: bool) -> bool:
        """`update` where only the layer's owner (``compute=True``) does the expensive, assignable work.

        The other ranks do the deterministic rest (running averages) and then
        receive the owner's `shared_state`. Returns whether that happened this
        step (the same answer on every rank). Default: every rank runs
        `update` (replicated work, nothing to send).
        """
        self.update(step, counts)
        return False

    def shared_state(self) -> dict[str, Any]:
        """What the owner's `update_assigned` changed: tensors and plain numbers."""
        return {}

    def release(self) -> None:
        """Drop the preconditioner state a MEM-OPT non-owner does not keep (after loading a full checkpoint)."""

    def load_shared_state(self, state: dict[str, Any]) -> None:
        """Take the owner's `shared_state` (non-owners, same step; MEM-OPT: its plain numbers only)."""
