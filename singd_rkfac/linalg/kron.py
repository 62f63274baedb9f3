"""Applying damped inverses of Kronecker factors, dense or low-rank (DESIGN §3.1, §3.2).

A factor ``F`` (``d × d``, symmetric PSD) is represented by
``Eigen(values, vectors, complement)``: ``F ≈ U diag(s) Uᵀ + s⊥ (I − U Uᵀ)``
with ``U`` (``d × r``, orthonormal columns) and eigenvalues ``s`` (``r``,
ascending, like ``torch.linalg.eigh``). ``complement`` is ``s⊥`` as a 0-d
tensor, or ``None`` when ``U`` is square and spans everything (the exact,
dense case). A diagonal factor has ``vectors=None`` (its eigenbasis is the
standard basis) and ``values`` its diagonal. Damped inverses are applied in
O(d·r·k) for a ``d × k`` input, never forming ``d × d``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["COMPLEMENTS", "Eigen", "damped_inverse_apply", "exact_damped_solve", "inverse_from_eigh", "with_complement"]


def inverse_from_eigh(eigenvalues: Tensor, eigenvectors: Tensor, damping: Tensor | float) -> Tensor:
    """``(F + λI)⁻¹ = Q diag(1/(s+λ)) Qᵀ`` from ``F = Q diag(s) Qᵀ``; ``(d, d)``."""
    return (eigenvectors / (eigenvalues + damping)) @ eigenvectors.T


COMPLEMENTS = ("min", "zero")


class Eigen(NamedTuple):
    """``F ≈ U diag(values) Uᵀ + complement·(I − U Uᵀ)``.

    Attributes:
        values: ``(r,)`` eigenvalues, ascending, ``≥ 0`` (a diagonal factor: its diagonal, in order).
        vectors: ``(d, r)`` orthonormal eigenvectors, or ``None`` for a diagonal factor.
        complement: eigenvalue assumed on the orthogonal complement of ``U``
            (0-d tensor), or ``None`` when ``r == d``.
    """

    values: Tensor
    vectors: Tensor
    complement: Tensor | None = None


def with_complement(values: Tensor, vectors: Tensor, complement: str) -> Eigen:
    """An `Eigen` whose complement eigenvalue is ``min(values)`` or ``0`` (``0`` when nothing is kept).

    ``"min"`` continues the spectrum flat past the kept modes (Puiu); ``"zero"``
    treats the discarded modes as absent. A square ``vectors`` needs none.
    """
    if vectors.shape[1] >= vectors.shape[0]:
        return Eigen(values, vectors, None)
    floor = values.min() if complement == "min" and values.numel() else values.new_zeros(())
    return Eigen(values, vectors, floor)


def damped_inverse_apply(x: Tensor, eigen: Eigen, damping: Tensor | float, side: str) -> Tensor:
    """``x (F + λI)⁻¹`` (``side="right"``, x is ``(n, d)``) or ``(F + λI)⁻¹ x`` (``"left"``, ``(d, n)``).

    ``(F + λI)⁻¹ = U [diag(1/(s+λ)) − 1/(s⊥+λ)] Uᵀ + I/(s⊥+λ)``; with no
    complement the last term is absent and the first has no shift.
    """
    values, vectors, complement = eigen
    inverse = 1.0 / (values + damping)
    if vectors is None:  # diagonal factor
        return x * inverse if side == "right" else inverse.unsqueeze(1) * x
    if complement is None:
        if side == "right":
            return ((x @ vectors) * inverse) @ vectors.T
        return vectors @ (inverse.unsqueeze(1) * (vectors.T @ x))
    floor = 1.0 / (complement + damping)
    inverse = inverse - floor
    if side == "right":
        return torch.addmm(x * floor, (x @ vectors) * inverse, vectors.T)
    return torch.addmm(x * floor, vectors, inverse.unsqueeze(1) * (vectors.T @ x))


def _split(x: Tensor, vectors: Tensor, side: str) -> tuple[Tensor, Tensor]:
    """Coordinates of ``x`` in ``U`` and its part outside ``U``'s span, along one side."""
    if side == "right":  # x (n, d): x = coords Uᵀ + rest
        coords = x @ vectors
        return coords, x - coords @ vectors.T
    coords = vectors.T @ x  # x (d, n): x = U coords + rest
    return coords, x - vectors @ coords


def exact_damped_solve(grad: Tensor, eig_g: Eigen, eig_a: Eigen, damping: float) -> Tensor:
    """``(A ⊗ G + λI)⁻¹ vec(grad)`` for a ``(d_g, d_a)`` gradient, from (low-rank) eigens.

    In the eigenbases of both factors (kept modes plus complement) the
    operator is diagonal: each block of ``grad`` is divided by
    ``s_G s_Aᵀ + λ`` with the complement eigenvalue standing in for discarded
    modes. Cost O(d_g·d_a·(r_A + r_G)); dense eigens reduce to
    ``Q_G [(Q_Gᵀ ∇ Q_A) / (s_G s_Aᵀ + λ)] Q_Aᵀ``. A diagonal factor
    (``vectors is None``) has ``Q = I``; a diagonal ``G`` is solved as the
    transposed problem (``A`` and ``G`` swap roles).
    """
    s_g, u_g, c_g = eig_g
    s_a, u_a, c_a = eig_a
    if u_g is None and u_a is None:
        return grad / (s_g.unsqueeze(1) * s_a.unsqueeze(0) + damping)
    if u_g is None:
        return _solve_diagonal_a(grad.T, eig_a, s_g, damping).T
    if u_a is None:
        return _solve_diagonal_a(grad, eig_g, s_a, damping)
    if c_a is None:
        kept_a, rest_a = grad @ u_a, None
    else:
        kept_a, rest_a = _split(grad, u_a, "right")
    if c_g is None:
        core = (u_g.T @ kept_a) / (s_g.unsqueeze(1) * s_a.unsqueeze(0) + damping)
        result = (u_g @ core) @ u_a.T
        if rest_a is not None:
            result += u_g @ ((u_g.T @ rest_a) / (s_g * c_a + damping).unsqueeze(1))
        return result
    kept_kept, rest_kept = _split(kept_a, u_g, "left")
    result = u_g @ (kept_kept / (s_g.unsqueeze(1) * s_a.unsqueeze(0) + damping)) @ u_a.T
    result += (rest_kept / (c_g * s_a + damping)) @ u_a.T
    if rest_a is not None:
        kept_rest, rest_rest = _split(rest_a, u_g, "left")
        result += u_g @ (kept_rest / (s_g * c_a + damping).unsqueeze(1))
        result += rest_rest / (c_g * c_a + damping)
    return result


def _solve_diagonal_a(grad: Tensor, eig_g: Eigen, s_a: Tensor, damping: float) -> Tensor:
    """`exact_damped_solve` for ``A = diag(s_a)``: column ``j`` of ``grad`` is solved by ``(s_a[j]·G + λI)⁻¹``."""
    s_g, u_g, c_g = eig_g
    coords = u_g.T @ grad
    result = u_g @ (coords / (s_g.unsqueeze(1) * s_a.unsqueeze(0) + damping))
    if c_g is not None:  # G's discarded modes carry its complement eigenvalue
        result += (grad - u_g @ coords) / (c_g * s_a + damping)
    return result
