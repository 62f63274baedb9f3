"""Hierarchical and low-rank triangular structures (one implementation).

A hierarchical matrix with sizes ``(k1, k2)`` and ``m = d − k1 − k2``::

    ⎡ A  B₁ B₂ ⎤   A: k1×k1 dense      B = [B₁ B₂]: k1×(d−k1) dense (top border)
    ⎢ 0  C  0  ⎥   C: m diagonal
    ⎣ 0  D  E  ⎦   D: k2×m dense (bottom border)   E: k2×k2 dense

It is closed under multiplication. The low-rank triangular structure of rank
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

from .base import Scalar, Structure, StructuredMatrix, check_size

__all__ = ["Hierarchical", "HierarchicalMatrix", "LowRank"]


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
        """An empty ``(d, k)`` result laid out like ``x`` and its row blocks (views): the products land in place.

        Matching ``x``'s layout matters: ``x`` is often a transposed gradient, and
        an elementwise product between opposite layouts runs several times slower.
        """
        out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, self.dtype))
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
