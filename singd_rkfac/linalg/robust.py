"""Decompositions that do not break: finiteness check, fp64 retry, jitter.

DESIGN §5: check the input is finite; try the decomposition in its own dtype
(at least fp32); on failure retry in fp64, then with growing diagonal jitter.
A caller that still gets ``None`` keeps its previous decomposition and reports
the failure to a `FailureTracker`, which warns once per layer and raises
after a configurable number of consecutive failures.

These run only on decomposition steps (every ``inverse_every`` steps), never on
the per-step hot path, so their host synchronisations are deliberate.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["all_finite", "robust_eigh", "robust_cholesky", "robust_decompose", "FailureTracker", "DecompositionError"]

#: Diagonal jitter, relative to the mean |diagonal|, tried after the fp64 retry.
JITTERS = (1e-6, 1e-4, 1e-2)


class DecompositionError(RuntimeError):
    """A layer's factor decomposition failed too many times in a row."""


def all_finite(*tensors: Tensor) -> bool:
    """Whether every entry of ``tensors`` is finite: one reduction pass over each, one host sync in all.

    inf/NaN propagate through a sum, so a finite sum of the sums proves every
    entry finite; only when it is not (a non-finite entry, or finite entries
    whose sum overflows) does the exact ``isfinite(t).all()`` decide. Cheaper
    than ``isfinite(t).all()``, which makes several passes over each tensor.
    """
    present = [t for t in tensors if t.numel()]
    if not present or bool(torch.isfinite(torch.stack([t.sum() for t in present]).sum())):
        return True
    return all(bool(torch.isfinite(t).all()) for t in present)


def _attempt(decompose: Callable[[Tensor], tuple[Tensor, ...]], matrix: Tensor) -> tuple[Tensor, ...] | None:
    try:
        result = decompose(matrix)
    except (RuntimeError, torch.linalg.LinAlgError):
        return None
    return result if all_finite(*result) else None


def _retries(wide: Tensor, *, plain: bool, jitter: bool) -> Iterator[Tensor]:
    """The fp64 matrix (unless it already had its plain try), then with growing jitter."""
    if plain:
        yield wide
    if jitter:
        scale = wide.diagonal().abs().mean().clamp_min(torch.finfo(torch.float64).tiny)
        eye = torch.eye(wide.shape[0], dtype=wide.dtype, device=wide.device)
        for shift in JITTERS:
            yield wide + (shift * scale) * eye


def robust_decompose(
    decompose: Callable[[Tensor], tuple[Tensor, ...]], matrix: Tensor, *, jitter: bool = True
) -> tuple[Tensor, ...] | None:
    """Run ``decompose`` through the retry chain; results come back in ``matrix.dtype``.

    ``None`` when the input is not finite or every attempt raised or returned
    a non-finite result. ``jitter=False`` stops after the fp64 retry (for
    inputs that are not a square matrix to shift).
    """
    if not all_finite(matrix):
        return None
    result = _attempt(decompose, matrix)
    if result is not None:
        return result
    wide = matrix.double()
    for attempt in _retries(wide, plain=matrix.dtype != torch.float64, jitter=jitter):
        result = _attempt(decompose, attempt)
        if result is not None:
            return tuple(t.to(matrix.dtype) for t in result)
    return None


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return eigenvalues.clamp_min(0.0), eigenvectors


def _cholesky(matrix: Tensor) -> tuple[Tensor]:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if bool(info != 0):
        raise torch.linalg.LinAlgError("matrix is not positive definite")
    return (factor,)


def robust_eigh(matrix: Tensor) -> tuple[Tensor, Tensor] | None:
    """Eigenvalues (ascending, clamped at ≥ 0) and eigenvectors of a symmetric PSD matrix.

    Returns ``None`` if every attempt failed. Shapes: ``(d,)`` and ``(d, d)``.
    """
    return robust_decompose(_eigh, matrix)  # type: ignore[return-value]


def robust_cholesky(matrix: Tensor) -> Tensor | None:
    """Lower Cholesky factor ``L`` (d × d) of a symmetric positive definite matrix, or ``None``."""
    result = robust_decompose(_cholesky, matrix)
    return None if result is None else result[0]


class FailureTracker:
    """Counts consecutive decomposition failures of one layer.

    Warns once per layer on the first failure and raises
    `DecompositionError` once ``max_failures`` happen in a row.
    """

    def __init__(self, layer_name: str, max_failures: int) -> None:
        self.layer_name = layer_name
        self.max_failures = max_failures
        self.consecutive = 0
        self.total = 0
        self._warned = False

    def record(self, ok: bool) -> None:
        """Note one decomposition attempt's outcome."""
        if ok:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_failures:
            raise DecompositionError(
                f"layer {self.layer_name!r}: curvature decomposition failed "
                f"{self.consecutive} times in a row (non-finite or indefinite factors); "
                "check the loss for NaN/inf or raise the damping"
            )
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"layer {self.layer_name!r}: curvature decomposition failed; keeping the "
                "previous one (warned once per layer)",
                RuntimeWarning,
                stacklevel=3,
            )
