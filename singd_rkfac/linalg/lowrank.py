"""Low-rank eigendecompositions of PSD Kronecker factors: sketches and Brand's update.

DESIGN §3.2. Sketches (randomized SVD, symmetric randomized
eigendecomposition, Nyström) cost O(d²·(r + p)·(q + 1)); Brand's online update
of a truncated eigendecomposition costs O(d·(k + m)²) and never forms a
``d × d`` matrix. Results are ascending ``(values (r,), vectors (d, r))``
pairs, like ``torch.linalg.eigh``, computed in the input's dtype (fp32 at least
in the curvature code); randomness comes from an explicit generator.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SKETCHES", "brand_update", "corrected", "range_finder", "sketch_eigen", "top"]


def top(values: Tensor, vectors: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The ``rank`` largest eigenpairs of ascending ``values`` (``(r,)``, ``(d, r)``).

    Truncated pairs are compact copies, so the discarded columns' storage is freed.
    """
    start = values.shape[0] - min(rank, values.shape[0])
    if start == 0:
        return values, vectors
    return values[start:].clone(), vectors[:, start:].contiguous()


# -- randomized sketches -----------------------------------------------------------
SKETCHES = ("rsvd", "sre", "nystrom")


def _orthonormal(matrix: Tensor) -> Tensor:
    return torch.linalg.qr(matrix).Q


def range_finder(matrix: Tensor, width: int, power_iters: int, generator: torch.Generator) -> Tensor:
    """Orthonormal ``Q`` (``d × width``) with ``range(Q) ≈`` the top range of symmetric ``matrix``.

    Halko–Martinsson–Tropp: Gaussian test matrix, then ``power_iters`` power
    iterations, re-orthonormalised by QR between powers (without it the
    columns collapse onto the top eigenvector in finite precision).
    """
    omega = torch.randn(matrix.shape[0], width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = _orthonormal(matrix @ omega)
    for _ in range(power_iters):
        basis = _orthonormal(matrix @ basis)
    return basis


def _rsvd(matrix: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Randomized SVD (R-KFAC): the SVD of ``Qᵀ F`` gives ``F``'s singular pairs."""
    left, singular, _ = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return singular.flip(0), (basis @ left).flip(1)


def _sre(matrix: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric randomized eigendecomposition (SRE-KFAC): ``eigh(Qᵀ F Q)``."""
    projected = basis.T @ matrix @ basis
    values, vectors = torch.linalg.eigh((projected + projected.T) / 2)
    return values, basis @ vectors


def _nystrom(matrix: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Nyström approximation ``F Ω (Ωᵀ F Ω)⁺ Ωᵀ F`` with a stabilising shift (Tropp et al. 2017).

    ``ν = eps·‖FΩ‖``; ``Y = FΩ + νΩ``; ``Ωᵀ Y = L Lᵀ``; ``B = Y L⁻ᵀ``;
    ``B = Ũ Σ Vᵀ`` gives ``s = max(Σ² − ν, 0)``, ``U = Ũ``.
    """
    sketch = matrix @ basis
    shift = torch.finfo(matrix.dtype).eps * torch.linalg.matrix_norm(sketch)
    sketch = sketch + shift * basis
    core = basis.T @ sketch
    lower, info = torch.linalg.cholesky_ex((core + core.T) / 2)
    if bool(info != 0):
        raise torch.linalg.LinAlgError("Nyström core is not positive definite")
    factor = torch.linalg.solve_triangular(lower, sketch.T, upper=False).T
    left, singular, _ = torch.linalg.svd(factor, full_matrices=False)
    return (singular.square() - shift).clamp_min(0.0).flip(0), left.flip(1)


_SKETCH_FUNCTIONS = {"rsvd": _rsvd, "sre": _sre, "nystrom": _nystrom}


def sketch_eigen(
    matrix: Tensor,
    kind: str,
    rank: int,
    oversample: int,
    power_iters: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Top-``rank`` eigenpairs of symmetric PSD ``matrix`` by a randomized sketch.

    ``kind`` is ``"rsvd"``, ``"sre"`` or ``"nystrom"``. The sketch width is
    ``rank + oversample`` (at most ``d``: then the result is exact up to
    rounding). Returns ascending ``(values (r,), vectors (d, r))``, values ≥ 0.
    """
    dim = matrix.shape[0]
    basis = range_finder(matrix, min(rank + oversample, dim), power_iters, generator)
    values, vectors = _SKETCH_FUNCTIONS[kind](matrix, basis)
    return top(values.clamp_min(0.0), vectors, min(rank, dim))


# -- Brand's online update -------------------------------------------------------------
def brand_update(values: Tensor, vectors: Tensor, rows: Tensor, decay: Tensor | float) -> tuple[Tensor, Tensor]:
    """Eigenpairs of ``decay·U diag(s) Uᵀ + X Xᵀ`` without forming ``d × d`` (Brand 2006).

    ``values`` ``(k,)``, ``vectors`` ``(d, k)`` orthonormal, ``rows`` ``X`` of
    shape ``(d, m)`` with ``k + m ≤ d``. ``C = Uᵀ X`` and ``P = X − U C``
    (orthogonalised twice for stability); an orthonormal basis ``Q`` of
    ``P``'s numerical range (thin SVD, singular values below
    ``max(d, m)·eps·‖X‖`` dropped — a plain QR would complete a rank-deficient
    ``P`` with columns that are not orthogonal to ``U``) and ``R = Qᵀ P``; the
    small ``(k+m') × (k+m')`` matrix ``[[decay·diag(s) + CCᵀ, CRᵀ], [RCᵀ, RRᵀ]]``
    has eigenpairs ``(σ, W)``; the result is ``σ``, ``[U Q] W`` — exactly the
    EA update before any truncation. Cost O(d·(k + m)²); one host sync (the
    numerical rank). Returns ascending eigenpairs of size ``k + m' ≤ k + m``.
    """
    coords = vectors.T @ rows
    residual = rows - vectors @ coords
    again = vectors.T @ residual
    residual -= vectors @ again
    coords += again
    left, singular, right = torch.linalg.svd(residual, full_matrices=False)
    tolerance = max(rows.shape) * torch.finfo(rows.dtype).eps * torch.linalg.matrix_norm(rows)
    kept = int((singular > tolerance).sum())
    basis = left[:, :kept]
    stacked = torch.cat([coords, singular[:kept, None] * right[:kept]])  # (k+m', m): X = [U Q] stacked
    small = stacked @ stacked.T
    k = values.shape[0]
    small[:k, :k] += torch.diag(values * decay)
    new_values, rotation = torch.linalg.eigh((small + small.T) / 2)
    return new_values.clamp_min(0.0), torch.cat([vectors, basis], dim=1) @ rotation


def corrected(values: Tensor, vectors: Tensor, matrix: Tensor, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """B-KFAC-c's partial correction: re-diagonalise ``F`` on a random subset of kept columns.

    Picks ``⌈fraction·r⌉`` columns ``U_S``, takes ``eigh(U_Sᵀ F U_S) = W σ Wᵀ``
    and replaces them by ``U_S W`` with eigenvalues ``σ`` (a rotation inside
    their span: orthonormality is kept). Cost O(d²·|S|). Returns ascending pairs.
    """
    rank = values.shape[0]
    count = max(1, min(rank, math.ceil(fraction * rank)))
    chosen = torch.randperm(rank, generator=generator, device=generator.device)[:count].to(values.device)
    subset = vectors[:, chosen]
    projected = subset.T @ matrix @ subset
    sigma, rotation = torch.linalg.eigh((projected + projected.T) / 2)
    vectors = vectors.clone()
    values = values.clone()
    vectors[:, chosen] = subset @ rotation
    values[chosen] = sigma.clamp_min(0.0)
    order = torch.argsort(values)
    return values[order], vectors[:, order]
