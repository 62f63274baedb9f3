"""The interface every SINGD structure implements (DESIGN §3.3).

Two halves:

* `Structure` — a frozen, validated *spec* (``Dense()``, ``Block(32)``, …):
  what a user writes in a policy. It builds matrices of a given dimension.
* `StructuredMatrix` — one ``d × d`` matrix in that structure, held as a few
  plain tensors ("parts"). Every operation SINGD needs runs at the cost of the
  structure's size; nothing on the hot path forms a dense ``d × d`` matrix
  (`to_dense` and `Structure.project` exist for tests and inspection).

The projection ``Π`` onto a structure follows the SINGD convention for the
symmetric matrices it is applied to: an entry whose mirror position is also in
the structure keeps ``M_ij``; an entry whose mirror is not (the border of a
triangular structure) gets ``M_ij + M_ji``. Every structure is closed under
multiplication, so ``K (I − β m)`` stays in it, and `rmatmat` is correct for
non-symmetric ``K``.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

__all__ = ["PartsMatrix", "Structure", "StructuredMatrix", "Scalar"]

#: A Python number or a 0-d tensor (kept on device: no host sync).
Scalar = float | Tensor

M = TypeVar("M", bound="PartsMatrix")


class PartsMatrix(ABC):
    """A ``d × d`` matrix held as a few named tensors ("parts") that can be applied to dense tensors.

    Subclasses name their tensors in ``parts``; the element-wise algebra here
    works on the parts directly.
    """

    #: Attribute names of the tensors that hold the matrix.
    parts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, dim: int) -> None:
        self.dim = dim

    # -- parts ------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """The parts by name (plain tensors: the matrix's persistent state)."""
        return {name: getattr(self, name) for name in self.parts}

    def _with(self: M, tensors: dict[str, Tensor]) -> M:
        """A matrix of this layout holding ``tensors``."""
        new = copy.copy(self)
        for name in self.parts:
            setattr(new, name, tensors[name])
        return new

    def _map(self: M, fn) -> M:
        return self._with({name: fn(t) for name, t in self.tensors().items()})

    def load_(self, tensors: dict[str, Tensor]) -> None:
        """Copy saved parts in, keeping this matrix's dtype and device."""
        for name, t in self.tensors().items():
            if tensors[name].shape != t.shape:
                raise ValueError(f"part {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(t.shape)}")
            t.copy_(tensors[name])

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors().values())).dtype

    def numel(self) -> int:
        """Stored numbers (the structure's size)."""
        return sum(t.numel() for t in self.tensors().values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # -- element-wise algebra (generic over the parts) -----------------------------
    def clone(self: M) -> M:
        return self._map(torch.clone)

    def zeros_like(self: M) -> M:
        return self._map(torch.zeros_like)

    def to(self: M, dtype: torch.dtype) -> M:
        """This matrix in ``dtype``: itself when it already is (as ``Tensor.to`` returns the tensor itself)."""
        return self if dtype == self.dtype else self._map(lambda t: t.to(dtype))

    def add_(self: M, other: M, alpha: Scalar = 1.0) -> M:
        """``self += alpha · other`` (``alpha`` a number or a 0-d tensor)."""
        for t, o in zip(self.tensors().values(), other.tensors().values()):
            if isinstance(alpha, Tensor):
                t.addcmul_(o, alpha.to(t.dtype))
            else:
                t.add_(o, alpha=alpha)
        return self

    def mul_(self: M, value: Scalar) -> M:
        for t in self.tensors().values():
            t.mul_(value.to(t.dtype) if isinstance(value, Tensor) else value)
        return self

    def max_abs(self) -> Tensor:
        """Largest absolute entry (0-d tensor)."""
        peaks = [t.abs().amax() for t in self.tensors().values() if t.numel()]
        return torch.stack(peaks).amax()

    def total(self) -> Tensor:
        """Sum of all stored numbers in at least fp32 (0-d): non-finite iff some entry is.

        One cheap reduction per part serves as the finiteness check of a whole
        update (a finite sum of finite entries cannot overflow in fp32 here).
        """
        work = torch.promote_types(self.dtype, torch.float32)
        return torch.stack([t.sum(dtype=work) for t in self.tensors().values()]).sum()

    def select_(self: M, ok: Tensor, other: M) -> M:
        """Keep ``self`` if the 0-d bool ``ok``, else become ``other``: in place, no host sync; returns self."""
        for mine, theirs in zip(self.tensors().values(), other.tensors().values()):
            torch.where(ok, mine, theirs, out=mine)
        return self

    def where_(self: M, ok: Tensor) -> M:
        """Zero every part unless the 0-d bool ``ok``: in place, no host sync; returns self."""
        rejected = ok.logical_not()
        for t in self.tensors().values():
            t.masked_fill_(rejected, 0)
        return self

    # -- application to dense tensors ------------------------------------------------
    def _empty_like(self, x: Tensor) -> Tensor:
        """An uninitialised result for a product with ``x``: ``x``'s shape and layout, the promoted dtype.

        Matching ``x``'s layout matters: ``x`` is often a transposed gradient, and
        an element-wise product between opposite layouts runs several times slower.
        """
        return torch.empty_like(x, dtype=torch.promote_types(x.dtype, self.dtype))

    @abstractmethod
    def mv(self, x: Tensor) -> Tensor:
        """``S @ X`` for a dense ``(d, n)`` tensor."""

    @abstractmethod
    def rmul(self, y: Tensor) -> Tensor:
        """``Y @ S`` for a dense ``(n, d)`` tensor (rows of a gradient, no transposed copies)."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The ``d × d`` matrix (not for hot paths)."""


class StructuredMatrix(PartsMatrix):
    """A square matrix stored in a structure; every method keeps the structure.

    Subclasses implement the products and projections.
    """

    def frobenius_norm(self) -> Tensor:
        """``‖S‖_F`` (0-d tensor; every stored number appears once in the matrix)."""
        work = torch.promote_types(self.dtype, torch.float32)
        return torch.sqrt(sum(t.to(work).square().sum() for t in self.tensors().values())).to(self.dtype)

    def average_trace(self) -> Tensor:
        """``tr(S) / d`` (0-d tensor)."""
        return self.trace() / self.dim

    # -- products ------------------------------------------------------------------
    @abstractmethod
    def matmul(self: M, other: M) -> M:
        """``S @ other`` for another matrix of the same layout."""

    @abstractmethod
    def rmatmat(self, x: Tensor) -> Tensor:
        """``Sᵀ @ X`` for a dense ``(d, n)`` tensor (correct for non-symmetric ``S``)."""

    def rmul(self, y: Tensor) -> Tensor:
        return self.rmatmat(y.T).T  # Y S = (Sᵀ Yᵀ)ᵀ

    def __matmul__(self, other):
        return self.matmul(other) if isinstance(other, StructuredMatrix) else self.mv(other)

    def apply_outer(self, x: Tensor) -> Tensor:
        """``S Sᵀ X`` for a dense ``(d, n)`` tensor."""
        return self.mv(self.rmatmat(x))

    def outer_self(self, out: PartsMatrix | None = None) -> PartsMatrix | None:
        """``S Sᵀ`` held so that one product applies it, when that is cheaper than two; else None.

        Dense, block and diagonal keep it in their own structure; hierarchical
        in its symmetric arrow form. ``out``: a previous result whose tensors
        receive this one (no new memory).
        """
        return None

    # -- projections (SINGD's H terms) ------------------------------------------------
    @abstractmethod
    def project_gram(self: M, s: Tensor) -> M:
        """``Π(S Sᵀ)`` in this layout, from ``s`` of shape ``(d, n)``, without forming ``d × d``."""

    @abstractmethod
    def inner_self(self: M) -> M:
        """``Π(Sᵀ S)``."""

    def from_inner(self: M, x: Tensor | None = None, dtype: torch.dtype | None = None) -> M:
        """``Π(Sᵀ X Xᵀ S)`` for ``x`` of shape ``(d, n)``; ``Π(Sᵀ S)`` when ``x`` is None.

        ``Sᵀ X`` is formed in this matrix's dtype, the projected Gram in
        ``dtype`` (default: the same; fp16 state stages it in fp32).
        """
        if x is None:
            return self.inner_self()
        product = self.rmatmat(x)
        return self.project_gram(product if dtype is None else product.to(dtype))

    # -- diagonal ---------------------------------------------------------------------
    @abstractmethod
    def diag_add_(self: M, value: Scalar) -> M:
        """``S += value · I`` in place."""

    @abstractmethod
    def trace(self) -> Tensor:
        """``tr(S)`` (0-d tensor)."""


@dataclass(frozen=True)
class Structure(ABC):
    """A structure spec: validated sizes, and a factory of matrices of any dimension."""

    #: Lowercase name used in policies (``structure = "block"``).
    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming a bad size field."""

    @abstractmethod
    def zeros(self, dim: int, *, dtype: torch.dtype, device: torch.device | str) -> StructuredMatrix:
        """The ``dim × dim`` zero matrix in this structure."""

    def eye(self, dim: int, *, dtype: torch.dtype, device: torch.device | str) -> StructuredMatrix:
        """The ``dim × dim`` identity in this structure."""
        return self.zeros(dim, dtype=dtype, device=device).diag_add_(1.0)

    @abstractmethod
    def project(self, mat: Tensor) -> StructuredMatrix:
        """``Π(mat)`` of a dense symmetric ``d × d`` matrix (tests and inspection)."""

    def numel(self, dim: int) -> int:
        """Stored numbers of one ``dim × dim`` matrix."""
        return self.zeros(dim, dtype=torch.float32, device="meta").numel()

    def outer_numel(self, dim: int) -> int:
        """Stored numbers of the cached ``S Sᵀ`` of one ``dim × dim`` matrix (0 when it has none)."""
        outer = self.zeros(dim, dtype=torch.float32, device="meta").outer_self()
        return 0 if outer is None else outer.numel()

    def clip_note(self, dim: int) -> str:
        """Text for ``describe()`` when a size is clipped to ``dim`` (else empty)."""
        return ""

    def summary(self) -> str:
        """Short text such as ``block(32)``."""
        values = [str(v).lower() if isinstance(v, bool) else str(v) for v in vars(self).values()]
        return f"{self.name}({', '.join(values)})" if values else self.name


def check_size(spec: Structure, field: str, minimum: int = 1) -> None:
    """Raise unless ``spec.<field>`` is an int (not a bool) ``>= minimum``."""
    value = getattr(spec, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{type(spec).__name__}.{field} must be an integer >= {minimum} (got {value!r})")
