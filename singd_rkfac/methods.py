"""Per-layer curvature methods: frozen, validated configuration dataclasses.

A method says *how* one layer is preconditioned; the `Policy`
says *which* layer gets which method. Every config is immutable and checks its
fields at construction, so a bad value fails where it is written, with a
``ValueError`` that names the field and the allowed range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar

import torch

from .structures import STRUCTURES, Block, Hierarchical, LowRank, Structure, Toeplitz

__all__ = ["Method", "Skip", "CurvatureMethod", "KFAC", "SINGD", "METHODS"]

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


def _show(value: Any) -> str:
    if callable(value) and not isinstance(value, type):
        return getattr(value, "__qualname__", type(value).__name__)
    return repr(value)


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
        """Short text: the name and every field that differs from its default.

        Callables (schedules) show by qualified name, so the text is the same in
        every process (checkpoints compare it).
        """
        changed = [
            f"{f.name}={_show(getattr(self, f.name))}"
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


SINGD_DTYPES = (None, torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: SINGD's size fields and the structure each one sizes when structures are given by name.
_SIZE_FIELDS: dict[str, tuple[str, ...]] = {
    "block_size": ("block",),
    "rank": ("lowrank",),
    "k1": ("hierarchical",),
    "k2": ("hierarchical",),
    "lower": ("lowrank", "toeplitz"),
}
#: How a named structure takes its sizes from SINGD's fields (spec field ← SINGD field).
_SIZE_ARGUMENTS: dict[str, dict[str, str]] = {
    "block": {"size": "block_size"},
    "lowrank": {"rank": "rank", "lower": "lower"},
    "hierarchical": {"k1": "k1", "k2": "k2"},
    "toeplitz": {"lower": "lower"},
}


@dataclass(frozen=True, kw_only=True)
class SINGD(CurvatureMethod):
    """Inverse-free structured K-FAC (SINGD / INGD, or IKFAC with ``kfac_like``).

    Keeps ``K`` (``d_a × d_a``) and ``C`` (``d_g × d_g``) in a structure and
    updates them with products only, so all state can live in bf16/fp16; the
    preconditioned gradient is ``C Cᵀ ∇W K Kᵀ``. DESIGN §3.3.

    Attributes:
        structure: structure of ``K`` (and of ``C`` unless ``structure_g``): a
            name (``"dense"``, ``"diagonal"``, ``"block"``, ``"lowrank"``,
            ``"hierarchical"``, ``"toeplitz"``) or a `sr.structures` object.
        structure_g: structure of ``C`` (``None`` = same as ``structure``).
        block_size, rank, k1, k2, lower: sizes of structures given by name
            (``None`` = the structure's default); a size no named structure
            uses is an error. Sizes above a layer's dimension are clipped
            (``describe()`` notes it).
        dtype: dtype of ``K``, ``C``, their momenta and the statistics
            (``None`` = the parameter's dtype); bf16/fp16 are supported.
        lr_cov: β₁, step size of the ``K``/``C`` updates; a float or a
            callable ``step -> float``.
        alpha1: Riemannian momentum α₁ on ``m_K``/``m_C`` in ``[0, 1)``
            (``None`` = 0.5, or 0 with ``kfac_like``).
        kfac_like: the IKFAC update, whose fixed point is ``K Kᵀ = (A + λI)⁻¹``.
        normalize_lr_cov: normalized updates: ``β₁ / max(1, max|m|)``.
        update_every: capture statistics and update ``K``/``C`` every this many steps (T).
    """

    name: ClassVar[str] = "singd"

    structure: str | Structure = "dense"
    structure_g: str | Structure | None = None
    block_size: int | None = None
    rank: int | None = None
    k1: int | None = None
    k2: int | None = None
    lower: bool | None = None
    dtype: torch.dtype | None = None
    lr_cov: float | Callable[[int], float] = 1e-2
    alpha1: float | None = None
    kfac_like: bool = False
    normalize_lr_cov: bool = True
    update_every: int = 10

    def validate(self) -> None:
        super().validate()
        named = set()
        for side in ("structure", "structure_g"):
            value = getattr(self, side)
            if isinstance(value, str) and value in STRUCTURES:
                named.add(value)
            elif not (isinstance(value, Structure) or (side == "structure_g" and value is None)):
                _fail(self, side, "one of " + ", ".join(map(repr, STRUCTURES)) + " or a sr.structures object", value)
        for size, users in _SIZE_FIELDS.items():
            if getattr(self, size) is not None and not named.intersection(users):
                _fail(self, size, f"None unless a structure is given by name as {' or '.join(map(repr, users))}", getattr(self, size))
        for size, minimum in (("block_size", 1), ("rank", 1), ("k1", 0), ("k2", 0)):
            if getattr(self, size) is not None:
                check_int(self, size, minimum)
        for flag in ("lower", "kfac_like", "normalize_lr_cov"):
            value = getattr(self, flag)
            if not (isinstance(value, bool) or (flag == "lower" and value is None)):
                _fail(self, flag, "a bool", value)
        check_choice(self, "dtype", SINGD_DTYPES)
        if not callable(self.lr_cov):
            check_float(self, "lr_cov", 0.0, low_open=True)
        if self.alpha1 is not None:
            check_float(self, "alpha1", 0.0, 1.0, high_open=True)
            if self.kfac_like and self.alpha1 != 0.0:
                _fail(self, "alpha1", "None or 0 with kfac_like=True (IKFAC has no Riemannian momentum)", self.alpha1)
        check_int(self, "update_every", 1)

    def _named_structure(self, name: str) -> Structure:
        sizes = {arg: getattr(self, field) for arg, field in _SIZE_ARGUMENTS.get(name, {}).items()}
        return STRUCTURES[name](**{arg: value for arg, value in sizes.items() if value is not None})

    def _resolve(self, value: str | Structure) -> Structure:
        return value if isinstance(value, Structure) else self._named_structure(value)

    @property
    def k_structure(self) -> Structure:
        """Structure of ``K`` (input side, ``d_a × d_a``)."""
        return self._resolve(self.structure)

    @property
    def c_structure(self) -> Structure:
        """Structure of ``C`` (output side, ``d_g × d_g``)."""
        return self._resolve(self.structure if self.structure_g is None else self.structure_g)

    @property
    def momentum(self) -> float:
        """α₁ in effect (0.5 by default, 0 for IKFAC)."""
        if self.alpha1 is not None:
            return float(self.alpha1)
        return 0.0 if self.kfac_like else 0.5

    def lr_cov_at(self, step: int) -> float:
        """β₁ at ``step`` (evaluates a schedule)."""
        return float(self.lr_cov(step)) if callable(self.lr_cov) else float(self.lr_cov)

    @property
    def statistics_every(self) -> int:
        return self.update_every


#: Every method config by its lowercase name (the ``from_dict`` / TOML form).
METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (KFAC, SINGD, Skip)}
