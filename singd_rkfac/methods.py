"""Per-layer curvature methods: frozen, validated configuration dataclasses.

A method says *how* one layer is preconditioned; the `Policy`
says *which* layer gets which method. Every config is immutable and checks its
fields at construction, so a bad value fails where it is written, with a
``ValueError`` that names the field and the allowed range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

__all__ = ["Method", "Skip", "CurvatureMethod", "KFAC", "METHODS"]

KFAC_APPROX = ("expand", "reduce")
LOSS_AVERAGE = ("batch", None)
DAMPING_MODES = ("pi", "exact")
DENSE_INVERSES = ("eigh", "cholesky")


def _fail(method: Any, field: str, expected: str, value: Any) -> None:
    raise ValueError(f"{type(method).__name__}.{field} must be {expected} (got {value!r})")


def check_choice(method: Any, field: str, allowed: tuple) -> None:
    """Raise unless ``method.<field>`` is one of ``allowed``."""
    value = getattr(method, field)
    if value not in allowed:
        _fail(method, field, "one of " + ", ".join(map(repr, allowed)), value)


def check_int(method: Any, field: str, minimum: int) -> None:
    """Raise unless ``method.<field>`` is an int (not a bool) ``>= minimum``."""
    value = getattr(method, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(method, field, f"an integer >= {minimum}", value)


def check_float(
    method: Any,
    field: str,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise unless ``method.<field>`` is a finite real in the given interval."""
    value = getattr(method, field)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open or math.isinf(high) else "]"
        _fail(method, field, f"a finite number in {lo}{low}, {high}{hi}", value)


@dataclass(frozen=True, kw_only=True)
class Method:
    """Base class of every per-layer method config."""

    #: Lowercase name used by `Policy.from_dict` and TOML files.
    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the first bad one."""

    def summary(self) -> str:
        """Short text: the name and every field that differs from its default."""
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != f.default
        ]
        return f"{self.name}({', '.join(changed)})" if changed else self.name

    def to_dict(self) -> dict[str, Any]:
        """The config as ``{"method": name, field: value, ...}`` (the ``from_dict`` form)."""
        return {"method": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True, kw_only=True)
class Skip(Method):
    """Leave the layer's parameters to the optimizer's fallback rule."""

    name: ClassVar[str] = "skip"


@dataclass(frozen=True, kw_only=True)
class CurvatureMethod(Method):
    """Fields shared by every method that preconditions a layer.

    Attributes:
        damping: Tikhonov damping λ > 0 added to the curvature before inversion.
        kfac_approx: weight-sharing treatment (sequences, conv patches):
            ``"expand"`` makes every (sample, position) a row; ``"reduce"``
            averages inputs and sums output gradients over positions first
            (Eschenhagen et al. 2023).
        loss_average: ``"batch"`` when the loss is a mean over the batch (output
            gradients are multiplied by the batch size to recover per-sample
            gradients); ``None`` for a sum-reduced loss.
    """

    damping: float = 1e-3
    kfac_approx: str = "expand"
    loss_average: str | None = "batch"

    def validate(self) -> None:
        check_float(self, "damping", 0.0, low_open=True)
        check_choice(self, "kfac_approx", KFAC_APPROX)
        check_choice(self, "loss_average", LOSS_AVERAGE)

    @property
    def statistics_every(self) -> int:
        """Capture layer statistics on steps that are multiples of this."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class KFAC(CurvatureMethod):
    """Classic K-FAC: exponential averages of the Kronecker factors, inverted in fp32.

    The preconditioned gradient is ``(G + λ_G I)⁻¹ ∇W (A + λ_A I)⁻¹`` with
    π-damping, or ``(A ⊗ G + λ I)⁻¹ vec ∇W`` with exact damping.

    Attributes:
        ema: running-average weight ρ in ``F ← ρ F + (1−ρ) F_batch``; the first
            statistics step sets ``F = F_batch``. In ``[0, 1)``.
        stats_every: capture statistics every this many steps (≥ 1).
        inverse_every: refresh the decompositions every this many steps (≥ 1).
        damping_mode: ``"pi"`` (factored, Martens & Grosse 2015) or ``"exact"``
            (eigen-decomposition of both factors).
        inverse: ``"eigh"`` or ``"cholesky"`` (π-damping only) — how both
            factors are inverted unless ``a`` / ``g`` override one side.
        a: inverse representation of the input-side factor A (``None`` = ``inverse``).
        g: inverse representation of the output-gradient factor G (``None`` = ``inverse``).
    """

    name: ClassVar[str] = "kfac"

    ema: float = 0.95
    stats_every: int = 1
    inverse_every: int = 10
    damping_mode: str = "pi"
    inverse: str = "eigh"
    a: str | None = None
    g: str | None = None

    def validate(self) -> None:
        super().validate()
        check_float(self, "ema", 0.0, 1.0, high_open=True)
        check_int(self, "stats_every", 1)
        check_int(self, "inverse_every", 1)
        check_choice(self, "damping_mode", DAMPING_MODES)
        check_choice(self, "inverse", DENSE_INVERSES)
        check_choice(self, "a", (None, *DENSE_INVERSES))
        check_choice(self, "g", (None, *DENSE_INVERSES))
        if self.damping_mode == "exact":
            for side in ("inverse", "a", "g"):
                if getattr(self, side) == "cholesky":
                    _fail(self, side, "'eigh' when damping_mode='exact' (needs eigenpairs)", "cholesky")

    @property
    def statistics_every(self) -> int:
        return self.stats_every

    @property
    def inverse_a(self) -> str:
        """The inverse representation used for the A factor."""
        return self.a or self.inverse

    @property
    def inverse_g(self) -> str:
        """The inverse representation used for the G factor."""
        return self.g or self.inverse


#: Every method config by its lowercase name (the ``from_dict`` / TOML form).
METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (KFAC, Skip)}
