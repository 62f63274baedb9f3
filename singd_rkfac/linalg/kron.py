"""Applying damped inverses of Kronecker factors to gradient matrices."""

from __future__ import annotations

from torch import Tensor

__all__ = ["inverse_from_eigh", "exact_damped_solve"]


def inverse_from_eigh(eigenvalues: Tensor, eigenvectors: Tensor, damping: Tensor | float) -> Tensor:
    """``(F + λI)⁻¹ = Q diag(1/(s+λ)) Qᵀ`` from ``F = Q diag(s) Qᵀ``; ``(d, d)``."""
    return (eigenvectors / (eigenvalues + damping)) @ eigenvectors.T


def exact_damped_solve(
    grad: Tensor,
    eig_g: tuple[Tensor, Tensor],
    eig_a: tuple[Tensor, Tensor],
    damping: float,
) -> Tensor:
    """``(A ⊗ G + λI)⁻¹ vec(grad)`` for a ``(d_g, d_a)`` gradient matrix.

    ``Q_G [(Q_Gᵀ ∇ Q_A) / (s_G s_Aᵀ + λ)] Q_Aᵀ`` with ``eig_* = (s, Q)``.
    """
    s_g, q_g = eig_g
    s_a, q_a = eig_a
    rotated = q_g.T @ grad @ q_a
    rotated = rotated / (s_g.unsqueeze(1) * s_a.unsqueeze(0) + damping)
    return q_g @ rotated @ q_a.T
