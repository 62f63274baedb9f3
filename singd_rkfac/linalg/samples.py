"""Per-sample gradients of one layer, through its ``(a, g)`` rows only (SENG, two-level K-FAC).

A layer's per-sample gradient is ``G_n = Σ_t g_{n,t} a_{n,t}ᵀ`` (``d_g × d_a``),
summed over the weight-sharing positions ``t``, with rows ``a`` of shape
``(N, T, d_a)`` and ``g`` of shape ``(N, T, d_g)`` (the ``"sample"`` row
layout). These helpers give the three products the sample-space methods need
without forming the ``N × d_g·d_a`` matrix of per-sample gradients unless that
is the cheaper exact route:

* `sample_gram`: ``K_{nm} = ⟨G_n, G_m⟩`` (``N × N``);
* `sample_projections`: ``⟨G_n, M⟩`` for a ``d_g × d_a`` matrix ``M`` (``N``);
* `sample_combination`: ``Σ_n c_n G_n`` (``d_g × d_a``).

Column sampling (SENG's ``sketch_size``) restricts the last two to a subset of
the ``d_a`` columns; the caller rescales.
"""

from __future__ import annotations

import torch
from einops import rearrange, reduce
from torch import Tensor

__all__ = ["GRAM_PATHS", "gram_path", "sample_gram", "sample_projections", "sample_combination", "leading_eigenvector"]

#: ``"kernel"``: ``Σ_{t,s} (a_{n,t}·a_{m,s})(g_{n,t}·g_{m,s})``, ``(N·T)²·(d_a+d_g)`` flops, ``(N·T)²`` memory.
#: ``"materialize"``: form ``G_n`` then ``G Gᵀ``, ``N·d_g·d_a·(T+N)`` flops, ``N·d_g·d_a`` memory.
GRAM_PATHS = ("kernel", "materialize")


def gram_path(samples: int, positions: int, d_a: int, d_g: int) -> str:
    """The cheaper exact route to the sample Gram matrix (by flop count).

    Without weight sharing (``positions == 1``) the kernel route always wins,
    so per-sample gradients of a Linear layer are never formed; with many
    positions (convolutions) forming them is usually far cheaper than the
    ``(N·T)²`` kernel.
    """
    kernel = (samples * positions) ** 2 * (d_a + d_g)
    materialize = samples * d_g * d_a * (positions + samples)
    return "kernel" if kernel <= materialize else "materialize"


def sample_gram(a: Tensor, g: Tensor, path: str | None = None) -> Tensor:
    """``K_{nm} = ⟨G_n, G_m⟩`` for rows ``a`` ``(N, T, d_a)`` and ``g`` ``(N, T, d_g)``: ``(N, N)``.

    ``path`` is one of `GRAM_PATHS` (``None``: `gram_path` picks); both are exact.
    """
    samples, positions, d_a = a.shape
    path = gram_path(samples, positions, d_a, g.shape[-1]) if path is None else path
    if path == "materialize":
        per_sample = rearrange(torch.einsum("ntg,nta->nga", g, a), "n g a -> n (g a)")
        return per_sample @ per_sample.T
    if path != "kernel":
        raise ValueError(f"path must be one of {GRAM_PATHS} (got {path!r})")
    flat_a = rearrange(a, "n t d -> (n t) d")
    flat_g = rearrange(g, "n t d -> (n t) d")
    kernel = (flat_a @ flat_a.T) * (flat_g @ flat_g.T)
    return reduce(kernel, "(n t) (m s) -> n m", "sum", t=positions, s=positions)


def sample_projections(a: Tensor, g: Tensor, matrix: Tensor) -> Tensor:
    """``⟨G_n, M⟩ = Σ_t g_{n,t}ᵀ M a_{n,t}`` for ``M`` ``(d_g, d_a)``: ``(N,)``."""
    return torch.einsum("ntd,ntd->n", g @ matrix, a)


def sample_combination(a: Tensor, g: Tensor, weights: Tensor) -> Tensor:
    """``Σ_n c_n G_n = Σ_{n,t} c_n g_{n,t} a_{n,t}ᵀ`` for weights ``c`` ``(N,)``: ``(d_g, d_a)``."""
    weighted = rearrange(g * weights[:, None, None], "n t d -> d (n t)")
    return weighted @ rearrange(a, "n t d -> (n t) d")


def leading_eigenvector(rows: Tensor, start: Tensor, iterations: int) -> Tensor:
    """Top eigenvector of ``rowsᵀ rows`` by power iteration from ``start`` (``rows``: ``(m, d)``; ``(d,)``).

    Never forms the ``d × d`` matrix: each iteration is two products with the rows.
    """
    vector = start / start.norm().clamp_min(torch.finfo(start.dtype).tiny)
    for _ in range(iterations):
        vector = rows.T @ (rows @ vector)
        vector = vector / vector.norm().clamp_min(torch.finfo(vector.dtype).tiny)
    return vector
