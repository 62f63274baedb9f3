"""Triangular Toeplitz structure: ``d`` numbers, products by FFT in ``O(d log d)`` per column.

A lower-triangular Toeplitz matrix has ``L_ij = t_{i−j}`` for ``i ≥ j``; the
upper one is its transpose. Both are closed under multiplication (the product's
coefficients are the truncated convolution of the two coefficient vectors).
Products with dense columns are causal convolutions, done by FFT in at least
float32 (``torch.fft`` has no bf16 CPU kernels) and cast back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Scalar, Structure, StructuredMatrix

__all__ = ["Toeplitz", "ToeplitzMatrix"]


def _fft_size(dim: int) -> int:
    """A power of two ≥ ``2 dim − 1``: linear (not circular) convolution of length-``dim`` signals."""
    return 1 << max(2 * dim - 2, 1).bit_length()


def causal_convolution(coeffs: Tensor, x: Tensor) -> Tensor:
    """``L x`` for the lower Toeplitz ``L`` of ``coeffs`` ``(d,)`` and ``x`` ``(d, n)``: ``Σ_{j≤i} t_{i−j} x_j``."""
    dim = coeffs.shape[0]
    size = _fft_size(dim)
    work = torch.promote_types(x.dtype, torch.float32)
    spectrum = torch.fft.rfft(coeffs.to(work), size).unsqueeze(1) * torch.fft.rfft(x.to(work), size, dim=0)
    return torch.fft.irfft(spectrum, size, dim=0)[:dim].to(x.dtype)


def anticausal_convolution(coeffs: Tensor, x: Tensor) -> Tensor:
    """``Lᵀ x``: ``Σ_{j≥i} t_{j−i} x_j`` (the causal one on reversed rows)."""
    return causal_convolution(coeffs, x.flip(0)).flip(0)


def _diagonal_means(lag_sums: Tensor) -> Tensor:
    """Coefficients of the projection from ``r_k = Σ_i M_{i+k,i}`` of a symmetric ``M``.

    ``t_0 = r_0 / d`` and ``t_k = 2 r_k / (d − k)``: the lower and upper ``k``-th
    diagonals both fold onto the one coefficient.
    """
    dim = lag_sums.shape[0]
    counts = torch.arange(dim, 0, -1, dtype=lag_sums.dtype, device=lag_sums.device)
    doubled = torch.full_like(lag_sums, 2.0)
    doubled[0] = 1.0
    return lag_sums * doubled / counts


class ToeplitzMatrix(StructuredMatrix):
    """Triangular Toeplitz matrix of ``coeffs`` ``(d,)`` (``t_0`` on the diagonal)."""

    parts = ("coeffs",)

    def __init__(self, coeffs: Tensor, lower: bool) -> None:
        super().__init__(coeffs.shape[0])
        self.coeffs = coeffs
        self.lower = lower

    def matmul(self, other: ToeplitzMatrix) -> ToeplitzMatrix:
        return self._with({"coeffs": causal_convolution(self.coeffs, other.coeffs.unsqueeze(1)).squeeze(1)})

    def mv(self, x: Tensor) -> Tensor:
        return (causal_convolution if self.lower else anticausal_convolution)(self.coeffs, x)

    def rmatmat(self, x: Tensor) -> Tensor:
        return (anticausal_convolution if self.lower else causal_convolution)(self.coeffs, x)

    def project_gram(self, s: Tensor) -> ToeplitzMatrix:
        # r_k = Σ_i (S Sᵀ)_{i+k,i}: the column autocorrelations of S, summed, by FFT.
        work = torch.promote_types(s.dtype, torch.float32)
        size = _fft_size(self.dim)
        power = torch.fft.rfft(s.to(work), size, dim=0).abs().square().sum(1)
        lag_sums = torch.fft.irfft(power, size)[: self.dim]
        return self._with({"coeffs": _diagonal_means(lag_sums).to(s.dtype)})

    def inner_self(self) -> ToeplitzMatrix:
        # Σ_i (SᵀS)_{i+k,i} = Σ_j (d − j − k) t_j t_{j+k} for lower and upper alike.
        t = self.coeffs
        weights = torch.arange(self.dim, 0, -1, dtype=t.dtype, device=t.device)
        lag_sums = anticausal_convolution(t, (weights * t).unsqueeze(1)).squeeze(1)
        return self._with({"coeffs": _diagonal_means(lag_sums)})

    def diag_add_(self, value: Scalar) -> ToeplitzMatrix:
        self.coeffs[0].add_(value)
        return self

    def trace(self) -> Tensor:
        return self.dim * self.coeffs[0]

    def frobenius_norm(self) -> Tensor:
        work = torch.promote_types(self.dtype, torch.float32)
        counts = torch.arange(self.dim, 0, -1, dtype=work, device=self.coeffs.device)
        return torch.sqrt((counts * self.coeffs.to(work).square()).sum()).to(self.dtype)

    def to_dense(self) -> Tensor:
        i = torch.arange(self.dim, device=self.coeffs.device)
        lag = i.unsqueeze(1) - i.unsqueeze(0)
        lower = torch.where(lag >= 0, self.coeffs[lag.clamp_min(0)], torch.zeros((), dtype=self.dtype))
        return lower if self.lower else lower.T


@dataclass(frozen=True)
class Toeplitz(Structure):
    """Lower (or upper) triangular Toeplitz factor: ``d`` numbers, FFT products."""

    name: ClassVar[str] = "toeplitz"
    lower: bool = True

    def validate(self) -> None:
        if not isinstance(self.lower, bool):
            raise ValueError(f"Toeplitz.lower must be a bool (got {self.lower!r})")

    def zeros(self, dim: int, *, dtype: torch.dtype, device: torch.device | str) -> ToeplitzMatrix:
        return ToeplitzMatrix(torch.zeros(dim, dtype=dtype, device=device), self.lower)

    def project(self, mat: Tensor) -> ToeplitzMatrix:
        dim = mat.shape[0]
        both = mat + mat.T
        lag_sums = torch.stack([both.diagonal(-k).sum() / 2 for k in range(dim)])
        return ToeplitzMatrix(_diagonal_means(lag_sums), self.lower)
