"""Diagonal structure: ``d`` numbers; every product is element-wise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Scalar, Structure, StructuredMatrix

__all__ = ["Diagonal", "DiagonalMatrix"]


class DiagonalMatrix(StructuredMatrix):
    """``diag(diag)`` with ``diag`` of shape ``(d,)``."""

    parts = ("diag",)

    def __init__(self, diag: Tensor) -> None:
        super().__init__(diag.shape[0])
        self.diag = diag

    def matmul(self, other: DiagonalMatrix) -> DiagonalMatrix:
        return DiagonalMatrix(self.diag * other.diag)

    def mv(self, x: Tensor) -> Tensor:
        return self.diag.unsqueeze(1) * x

    rmatmat = mv

    def rmul(self, y: Tensor) -> Tensor:
        return y * self.diag

    def outer_self(self, out: DiagonalMatrix | None = None) -> DiagonalMatrix:
        return DiagonalMatrix(torch.square(self.diag, out=None if out is None else out.diag))

    def project_gram(self, s: Tensor) -> DiagonalMatrix:
        return DiagonalMatrix(s.square().sum(1))

    def from_inner(self, x: Tensor | None = None, dtype: torch.dtype | None = None) -> DiagonalMatrix:
        """``diag(S)² ⊙ Σₙ xₙ²``: the squared row norms of ``x``, not of a scaled ``(d, n)`` copy.

        The squares are summed in the wider of ``x``'s dtype and ``dtype``
        (``torch.linalg.vector_norm`` along a dimension is 5–7× slower on the
        CPU than squaring and summing).
        """
        if x is None:
            return self.inner_self()
        work = dtype or self.dtype
        squares = x.to(torch.promote_types(x.dtype, work)).square().sum(1)
        return DiagonalMatrix(self.diag.to(work).square() * squares.to(work))

    def inner_self(self) -> DiagonalMatrix:
        return DiagonalMatrix(self.diag.square())

    def diag_add_(self, value: Scalar) -> DiagonalMatrix:
        self.diag.add_(value)
        return self

    def trace(self) -> Tensor:
        return self.diag.sum()

    def to_dense(self) -> Tensor:
        return torch.diag(self.diag)


@dataclass(frozen=True)
class Diagonal(Structure):
    """Diagonal factor: ``d`` numbers, ``O(m d)`` per update — the memory of AdamW's second moment."""

    name: ClassVar[str] = "diagonal"

    def zeros(self, dim: int, *, dtype: torch.dtype, device: torch.device | str) -> DiagonalMatrix:
        return DiagonalMatrix(torch.zeros(dim, dtype=dtype, device=device))

    def project(self, mat: Tensor) -> DiagonalMatrix:
        return DiagonalMatrix(mat.diagonal().clone())
