"""Hierarchical and low-rank triangular structures (one implementation).

A hierarchical matrix with sizes ``(k1, k2)`` and ``m = d − k1 − k2``::

    ⎡ A  B₁ B₂ ⎤   A: k1×k1 dense      B = [B₁ B₂]: k1×(d−k1) dense (top border)
    ⎢ 0  C  0  ⎥   C: m diagonal
    ⎣ 0  D  E  ⎦   D: k2×m dense (bottom border)   E: k2×k2 dense

It is closed under multiplication; ``S Sᵀ`` is not, and is kept as an
`ArrowMatrix` (dense on the corner indices, diagonal between) so that one
product applies it. The low-rank triangular structure of rank
``k`` is the special case with one corner: upper ``(k, 0)`` — dense top-left
corner and top border, diagonal rest; lower ``(0, k)`` — dense bottom-right
corner and bottom border, diagonal rest (block lower triangular). When ``d`` is
too small for both corners, ``A`` is filled first, then ``E``.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import PartsMatrix, Scalar, Structure, StructuredMatrix, check_size

__all__ = ["ArrowMatrix", "Hierarchical", "HierarchicalMatrix", "LowRank"]


class HierarchicalMatrix(StructuredMatrix):
    """Parts ``A (k1,k1)``, ``B (k1,d−k1)``, ``C (m,)``, ``D (k2,m)``, ``E (k2,k2)``."""

    parts = ("A", "B", "C", "D", "E")

    def __init__(self, A: Tensor, B: Tensor, C: Tensor, D: Tensor, E: Tensor) -> None:
        super().__init__(A.shape[0] + C.shape[0] + E.shape[0])
        self.A, self.B, self.C, self.D, self.E = A, B, C, D, E

    @property
    def _sizes(self) -> list[int]:
        return [self.A.shape[0], self.C.shape[0], self.E.shape[0]]

    def _rows(self, x: Tensor) -> tuple[Tensor, ...]:
        return x.split(self._sizes)

    def matmul(self, other: HierarchicalMatrix) -> HierarchicalMatrix:
        b_c, b_e = self.B.split([self.C.shape[0], self.E.shape[0]], dim=1)
        border = torch.cat([b_c * other.C + b_e @ other.D, b_e @ other.E], dim=1)
        return HierarchicalMatrix(
            self.A @ other.A,
            self.A @ other.B + border,
            self.C * other.C,
            self.D * other.C + self.E @ other.D,
            self.E @ other.E,
        )

    def _output(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """An empty ``(d, k)`` result laid out like ``x`` and its row blocks (views): the products land in place."""
        out = self._empty_like(x)
        return out, self._rows(out)

    def mv(self, x: Tensor) -> Tensor:
        x1, x2, _ = self._rows(x)
        k1, m, _ = self._sizes
        out, (top, middle, bottom) = self._output(x)
        # both dense row groups in one product: one read of x's last d − k1 rows
        borders = torch.cat([self.B, torch.cat([self.D, self.E], dim=1)]) @ x[k1:]
        torch.addmm(borders[:k1], self.A, x1, out=top)
        torch.mul(self.C.unsqueeze(1), x2, out=middle)
        bottom.copy_(borders[k1:])
        return out

    def rmatmat(self, x: Tensor) -> Tensor:
        x1, x2, x3 = self._rows(x)
        m = self.C.shape[0]
        out, (top, middle, bottom) = self._output(x)
        b_c, b_e = self.B.split([m, self.E.shape[0]], dim=1)
        corners = torch.cat([x1, x3])  # (k1 + k2, k): the rows the dense parts act on
        torch.mm(self.A.T, x1, out=top)
        # the middle rows: the diagonal, then both borders as one rank-(k1 + k2) update
        torch.mul(self.C.unsqueeze(1), x2, out=middle).addmm_(torch.cat([b_c, self.D]).T, corners)
        torch.mm(torch.cat([b_e, self.E]).T, corners, out=bottom)
        return out

    def outer_self(self, out: ArrowMatrix | None = None) -> ArrowMatrix:
        k1, m, k2 = self._sizes
        # the k1 + k2 corner rows of S as one (k, d) matrix: [A B] over [0 D E]
        rows = torch.cat([torch.cat([self.A, self.B], dim=1), torch.cat([self.D.new_zeros(k2, k1), self.D, self.E], dim=1)])
        corners, border, middle = (None, None, None) if out is None else (out.corners, out.border, out.middle)
        return ArrowMatrix(
            torch.mm(rows, rows.T, out=corners),
            torch.mul(rows[:, k1 : k1 + m], self.C, out=border),
            torch.square(self.C, out=middle),
            k1,
        )

    def project_gram(self, s: Tensor) -> HierarchicalMatrix:
        s1, s2, s3 = self._rows(s)
        return HierarchicalMatrix(
            s1 @ s1.T,
            2 * (s1 @ s[s1.shape[0] :].T),
            s2.square().sum(1),
            2 * (s3 @ s2.T),
            s3 @ s3.T,
        )

    def inner_self(self) -> HierarchicalMatrix:
        m = self.C.shape[0]
        b_c, b_e = self.B.split([m, self.E.shape[0]], dim=1)
        return HierarchicalMatrix(
            self.A.T @ self.A,
            2 * (self.A.T @ self.B),
            b_c.square().sum(0) + self.C.square() + self.D.square().sum(0),
            2 * (b_e.T @ b_c + self.E.T @ self.D),
            b_e.T @ b_e + self.E.T @ self.E,
        )

    def diag_add_(self, value: Scalar) -> HierarchicalMatrix:
        for diagonal in (self.A.diagonal(), self.C, self.E.diagonal()):
            diagonal.add_(value)
        return self

    def trace(self) -> Tensor:
        return self.A.diagonal().sum() + self.C.sum() + self.E.diagonal().sum()

    def to_dense(self) -> Tensor:
        k1, m, _ = self._sizes
        dense = torch.zeros(self.dim, self.dim, dtype=self.A.dtype, device=self.A.device)
        dense[:k1, :k1] = self.A
        dense[:k1, k1:] = self.B
        dense[k1 : k1 + m, k1 : k1 + m] = torch.diag(self.C)
        dense[k1 + m :, k1 : k1 + m] = self.D
        dense[k1 + m :, k1 + m :] = self.E
        return dense

    @classmethod
    def from_dense(cls, mat: Tensor, k1: int, k2: int) -> HierarchicalMatrix:
        """Projection of a symmetric ``mat``: borders add their mirror entries."""
        e = mat.shape[0] - k2
        return cls(
            mat[:k1, :k1].clone(),
            mat[:k1, k1:] + mat[k1:, :k1].T,
            mat.diagonal()[k1:e].clone(),
            mat[e:, k1:e] + mat[k1:e, e:].T,
            mat[e:, e:].clone(),
        )


class ArrowMatrix(PartsMatrix):
    """``S Sᵀ`` of a hierarchical ``S``: symmetric, dense on the corner indices, diagonal between.

    With ``I`` the first ``k1`` and last ``k2`` indices (``k = k1 + k2``) and
    ``M`` the ``m`` middle ones: ``(S Sᵀ)[I, I] = corners`` ``(k, k)``,
    ``(S Sᵀ)[I, M] = border`` ``(k, m)`` and its mirror, ``(S Sᵀ)[M, M] =
    diag(middle)``. One product costs ``2 k m n`` like the two hierarchical
    products it replaces, in fewer passes over the ``m`` middle rows.
    """

    parts = ("corners", "border", "middle")

    def __init__(self, corners: Tensor, border: Tensor, middle: Tensor, k1: int) -> None:
        super().__init__(corners.shape[0] + middle.shape[0])
        self.corners, self.border, self.middle = corners, border, middle
        self.k1 = k1

    def mv(self, x: Tensor) -> Tensor:
        k1, end = self.k1, self.k1 + self.middle.shape[0]
        out = self._empty_like(x)
        x_corner, x_middle = torch.cat([x[:k1], x[end:]]), x[k1:end]
        y_corner = torch.mm(self.corners, x_corner).addmm_(self.border, x_middle)
        torch.mul(self.middle.unsqueeze(1), x_middle, out=out[k1:end]).addmm_(self.border.T, x_corner)
        out[:k1].copy_(y_corner[:k1])
        out[end:].copy_(y_corner[k1:])
        return out

    def rmul(self, y: Tensor) -> Tensor:
        return self.mv(y.T).T  # symmetric: Y S = (S Yᵀ)ᵀ

    def to_dense(self) -> Tensor:
        k1, end = self.k1, self.k1 + self.middle.shape[0]
        corner = torch.cat([torch.arange(k1), torch.arange(end, self.dim)]).to(self.corners.device)
        dense = torch.diag(torch.cat([self.corners.new_zeros(k1), self.middle, self.corners.new_zeros(self.dim - end)]))
        dense[corner.unsqueeze(1), corner] = self.corners
        dense[corner, k1:end] = self.border
        dense[k1:end, corner] = self.border.T
        return dense


def _corner_sizes(dim: int, k1: int, k2: int) -> tuple[int, int]:
    """``(k1, k2)`` clipped to ``dim``: ``A`` first, then ``E``."""
    k1 = min(k1, dim)
    return k1, min(k2, dim - k1)


def _hierarchical_zeros(dim: int, k1: int, k2: int, dtype: torch.dtype, device: torch.device | str) -> HierarchicalMatrix:
    k1, k2 = _corner_sizes(dim, k1, k2)
    m = dim - k1 - k2
    z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    return HierarchicalMatrix(z(k1, k1), z(k1, dim - k1), z(m), z(k2, m), z(k2, k2))


@dataclass(frozen=True)
class _Corners(Structure):
    """Shared factory of the two hierarchical specs."""

    @property
    @abstractmethod
    def corners(self) -> tuple[int, int]:
        """``(k1, k2)``: sizes of the top-left and bottom-right dense corners."""

    def zeros(self, dim: int, *, dtype: torch.dtype, device: torch.device | str) -> HierarchicalMatrix:
        return _hierarchical_zeros(dim, *self.corners, dtype, device)

    def project(self, mat: Tensor) -> HierarchicalMatrix:
        return HierarchicalMatrix.from_dense(mat, *_corner_sizes(mat.shape[0], *self.corners))

    def clip_note(self, dim: int) -> str:
        k1, k2 = self.corners
        return f"corners {k1}+{k2} > dim {dim}: clipped to {_corner_sizes(dim, k1, k2)}" if k1 + k2 > dim else ""


@dataclass(frozen=True)
class Hierarchical(_Corners):
    """Dense ``k1×k1`` top-left and ``k2×k2`` bottom-right corners with their borders, diagonal middle: ``≈ (k1+k2)·d`` numbers."""

    name: ClassVar[str] = "hierarchical"
    k1: int = 16
    k2: int = 16

    def validate(self) -> None:
        check_size(self, "k1", 0)
        check_size(self, "k2", 0)

    @property
    def corners(self) -> tuple[int, int]:
        return self.k1, self.k2


@dataclass(frozen=True)
class LowRank(_Corners):
    """Rank-``k`` triangular: a ``k×k`` dense corner, a ``k``-wide dense border, diagonal elsewhere (``≈ k·d`` numbers).

    ``lower=True``: block lower triangular (bottom-right corner, bottom rows);
    ``lower=False``: block upper triangular (top-left corner, top rows).
    """

    name: ClassVar[str] = "lowrank"
    rank: int = 8
    lower: bool = True

    def validate(self) -> None:
        check_size(self, "rank")
        if not isinstance(self.lower, bool):
            raise ValueError(f"LowRank.lower must be a bool (got {self.lower!r})")

    @property
    def corners(self) -> tuple[int, int]:
        return (0, self.rank) if self.lower else (self.rank, 0)
