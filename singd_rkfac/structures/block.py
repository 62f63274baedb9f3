"""Dense and block-diagonal structures (one implementation: dense is one block).

A block-diagonal ``d × d`` matrix with block size ``b`` holds ``n = d // b``
full blocks ``(n, b, b)`` and, when ``b`` does not divide ``d``, a smaller
trailing block ``(r, r)`` with ``r = d − n b``. Products are batched matmuls
over the blocks; ``Sᵀ`` transposes each block (correct for non-symmetric
blocks, unlike the reference package).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor

from .base import Scalar, Structure, StructuredMatrix, check_size

__all__ = ["Block", "BlockMatrix", "Dense"]


class BlockMatrix(StructuredMatrix):
    """``blockdiag(blocks[0], …, blocks[n−1], tail)``.

    Attributes:
        blocks: ``(n, b, b)`` full blocks.
        tail: ``(r, r)`` trailing block (``r = 0`` when ``b`` divides ``d``).
    """

    parts = ("blocks", "tail")

    def __init__(self, blocks: Tensor, tail: Tensor) -> None:
        super().__init__(blocks.shape[0] * blocks.shape[1] + tail.shape[0])
        self.blocks = blocks
        self.tail = tail

    @property
    def _head(self) -> int:
        return self.blocks.shape[0] * self.blocks.shape[1]

    def _apply(self, x: Tensor, transpose: bool) -> Tensor:
        """``S x`` or ``Sᵀ x`` for ``x`` ``(d, k)``: one matmul per block group into one output, no copies."""
        blocks, tail = (self.blocks.mT, self.tail.T) if transpose else (self.blocks, self.tail)
        if not self.tail.numel() and blocks.shape[0] == 1:
            return blocks[0] @ x  # the dense structure
        out = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, self.dtype))
        head, rest = self._split(out)  # views of out: the products land in place
        torch.matmul(blocks, self._split(x)[0], out=head)
        if self.tail.numel():
            torch.mm(tail, x[self._head :], out=rest)
        return out

    def matmul(self, other: BlockMatrix) -> BlockMatrix:
        return BlockMatrix(self.blocks @ other.blocks, self.tail @ other.tail)

    def mv(self, x: Tensor) -> Tensor:
        return self._apply(x, transpose=False)

    def rmatmat(self, x: Tensor) -> Tensor:
        return self._apply(x, transpose=True)

    def outer_self(self, out: BlockMatrix | None = None) -> BlockMatrix:
        blocks, tail = (None, None) if out is None else (out.blocks, out.tail)
        return BlockMatrix(torch.matmul(self.blocks, self.blocks.mT, out=blocks), torch.mm(self.tail, self.tail.T, out=tail))

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Rows of ``(d, k)`` as ``(n, b, k)`` block rows and the ``(r, k)`` tail rows."""
        return rearrange(x[: self._head], "(n b) k -> n b k", b=self.blocks.shape[1]), x[self._head :]

    def project_gram(self, s: Tensor) -> BlockMatrix:
        head, tail = self._split(s)
        return BlockMatrix(head @ head.mT, tail @ tail.T)

    def inner_self(self) -> BlockMatrix:
        return BlockMatrix(self.blocks.mT @ self.blocks, self.tail.T @ self.tail)

    def diag_add_(self, value: Scalar) -> BlockMatrix:
        for diagonal in (self.blocks.diagonal(dim1=-2, dim2=-1), self.tail.diagonal()):
            diagonal.add_(value)
        return self

    def trace(self) -> Tensor:
        return self.blocks.diagonal(dim1=-2, dim2=-1).sum() + self.tail.diagonal().sum()

    def to_dense(self) -> Tensor:
        return torch.block_diag(*self.blocks, self.tail)

    @classmethod
    def from_dense(cls, mat: Tensor, block: int) -> BlockMatrix:
        """The diagonal blocks of ``mat`` (its projection; blocks are symmetric positions)."""
        dim = mat.shape[0]
        head = dim - dim % block
        grid = rearrange(mat[:head, :head], "(n b) (m c) -> b c n m", b=block, c=block)
        blocks = rearrange(grid.diagonal(dim1=-2, dim2=-1), "b c n -> n b c")
        return cls(blocks.clone(), mat[head:, head:].clone())


def _block_zeros(dim: int, block: int, dtype: torch.dtype, device: torch.device | str) -> BlockMatrix:
    n, r = divmod(dim, block)
    return BlockMatrix(
        torch.zeros(n, block, block, dtype=dtype, device=device), torch.zeros(r, r, dtype=dtype, device=device)
    )


@dataclass(frozen=True)
class Dense(Structure):
    """Unstructured ``d × d`` factor: ``d²`` numbers, ``d³`` per update (exact SINGD/IKFAC)."""

    name: ClassVar[str] = "dense"

    def zeros(self, dim: int, *, dtype: torch.dtype, device: torch.device | str) -> BlockMatrix:
        return _block_zeros(dim, dim, dtype, device)

    def project(self, mat: Tensor) -> BlockMatrix:
        return BlockMatrix.from_dense(mat, mat.shape[0])


@dataclass(frozen=True)
class Block(Structure):
    """Block-diagonal factor with blocks of ``size`` (the last one may be smaller): ``≈ b·d`` numbers.

    A ``size`` at or above a layer's dimension gives the dense structure (noted in ``describe()``).
    """

    name: ClassVar[str] = "block"
    size: int = 32

    def validate(self) -> None:
        check_size(self, "size")

    def zeros(self, dim: int, *, dtype: torch.dtype, device: torch.device | str) -> BlockMatrix:
        return _block_zeros(dim, min(self.size, dim), dtype, device)

    def project(self, mat: Tensor) -> BlockMatrix:
        return BlockMatrix.from_dense(mat, min(self.size, mat.shape[0]))

    def clip_note(self, dim: int) -> str:
        return f"block size {self.size} > dim {dim}: one dense block" if self.size > dim else ""
