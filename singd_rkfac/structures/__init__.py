"""SINGD structures: ``Dense``, ``Diagonal``, ``Block``, ``LowRank``, ``Hierarchical``, ``Toeplitz``.

A structure spec is what a policy names (``sr.structures.Block(32)`` or
``structure = "block"`` with ``block_size = 32``); it builds the
`StructuredMatrix` objects that hold SINGD's ``K``, ``C`` and their momenta.
"""

from __future__ import annotations

from .base import PartsMatrix, Structure, StructuredMatrix
from .block import Block, BlockMatrix, Dense
from .diagonal import Diagonal, DiagonalMatrix
from .hierarchical import ArrowMatrix, Hierarchical, HierarchicalMatrix, LowRank
from .toeplitz import Toeplitz, ToeplitzMatrix

__all__ = [
    "STRUCTURES",
    "ArrowMatrix",
    "Block",
    "BlockMatrix",
    "Dense",
    "Diagonal",
    "DiagonalMatrix",
    "Hierarchical",
    "HierarchicalMatrix",
    "LowRank",
    "PartsMatrix",
    "Structure",
    "StructuredMatrix",
    "Toeplitz",
    "ToeplitzMatrix",
]

#: Every structure spec by its lowercase name.
STRUCTURES: dict[str, type[Structure]] = {
    cls.name: cls for cls in (Dense, Diagonal, Block, LowRank, Hierarchical, Toeplitz)
}
