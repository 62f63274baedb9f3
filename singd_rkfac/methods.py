"""Per-layer curvature methods: frozen, validated configuration dataclasses.

A method says *how* one layer is preconditioned; the `Policy`
says *which* layer gets which method. `TwoLevel` configures the optimizer-wide
coarse correction of two-level K-FAC. Every config is immutable and checks its
fields at construction, so a bad value fails where it is written, with a
``ValueError`` that names the field and the allowed range.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar

import torch

from .linalg.kron import COMPLEMENTS
from .structures import STRUCTURES, Block, Hierarchical, LowRank, Structure, Toeplitz

__all__ = [
    "Method", "Skip", "CurvatureMethod", "KroneckerMethod", "KFAC", "DiagonalKFAC", "LowRankKFAC", "SketchedKFAC", "RKFAC", "SREKFAC",
    "NystromKFAC", "BKFAC", "BRKFAC", "BKFACC", "SINGD", "SENG", "TwoLevel", "COARSE_SPACES", "METHODS",
]

KFAC_APPROX = ("expand", "reduce")
LOSS_AVERAGE = ("batch", None)
DAMPING_MODES = ("pi", "exact")
DENSE_INVERSES = ("eigh", "cholesky")
#: Representation names a K-FAC side takes besides the dense inverses and the low-rank method names.
AUTO, DIAGONAL = "auto", "diagonal"

#: The width rule of ``a="auto"`` / ``g="auto"`` (and `Policy.auto`, the default policy): a factor at
#: most `AUTO_DENSE_MAX` wide is dense (exact; its O(d³) decomposition is cheap there), one wider than
#: `AUTO_DIAGONAL_MIN` is diagonal (O(d): vocabulary-sized sides, where even the d² EA factor of a
#: low-rank sketch does not fit), and in between SRE-KFAC of rank `AUTO_RANK` (O(d²·r)).
AUTO_DENSE_MAX = 1024
AUTO_DIAGONAL_MIN = 8192
AUTO_RANK = 64


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
    if isinstance(value, Method):
        return value.summary()
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
        def plain(value: Any) -> Any:
            return value.to_dict() if isinstance(value, Method) else value

        return {"method": self.name, **{f.name: plain(getattr(self, f.name)) for f in fields(self)}}


@dataclass(frozen=True, kw_only=True)
class Skip(Method):
    """Leave the layer's parameters to the optimizer's fallback rule."""

    name: ClassVar[str] = "skip"


@dataclass(frozen=True, kw_only=True)
class CurvatureMethod(Method, ABC):
    """Fields shared by every method that preconditions a layer.

    Attributes:
        damping: Tikhonov damping λ > 0 added to the curvature before inversion.
        loss_average: ``"batch"`` when the loss is a mean over the batch (output
            gradients are multiplied by the batch size to recover per-sample
            gradients); ``None`` for a sum-reduced loss.
    """

    damping: float = 1e-3
    loss_average: str | None = "batch"

    def validate(self) -> None:
        check_float(self, "damping", 0.0, low_open=True)
        check_choice(self, "loss_average", LOSS_AVERAGE)

    @property
    @abstractmethod
    def statistics_every(self) -> int:
        """Capture layer statistics on steps that are multiples of this."""

    @property
    @abstractmethod
    def row_layout(self) -> str:
        """How captured rows keep weight-shared positions (`singd_rkfac.layers.share_weights`)."""


@dataclass(frozen=True, kw_only=True)
class KroneckerMethod(CurvatureMethod):
    """Fields of the Kronecker-factored methods (K-FAC family, SINGD).

    Attributes:
        kfac_approx: weight-sharing treatment (sequences, conv patches):
            ``"expand"`` makes every (sample, position) a row; ``"reduce"``
            averages inputs and sums output gradients over positions first
            (Eschenhagen et al. 2023).
    """

    kfac_approx: str = "expand"

    def validate(self) -> None:
        super().validate()
        check_choice(self, "kfac_approx", KFAC_APPROX)

    @property
    def row_layout(self) -> str:
        return self.kfac_approx


@dataclass(frozen=True, kw_only=True)
class KFAC(KroneckerMethod):
    """Classic K-FAC: exponential averages of the Kronecker factors, inverted in fp32.

    The preconditioned gradient is ``(G + λ_G I)⁻¹ ∇W (A + λ_A I)⁻¹`` with
    π-damping, or ``(A ⊗ G + λ I)⁻¹ vec ∇W`` with exact damping. The low-rank
    members of the family (`RKFAC`, `SREKFAC`, `NystromKFAC`, `BKFAC`,
    `BRKFAC`, `BKFACC`) share every field and differ only in how each factor's
    inverse is represented.

    Attributes:
        ema: running-average weight ρ in ``F ← ρ F + (1−ρ) F_batch``; the first
            statistics step sets ``F = F_batch``. In ``[0, 1)``.
        stats_every: capture statistics every this many steps (≥ 1).
        inverse_every: refresh the decompositions every this many steps (≥ 1).
        damping_mode: ``"pi"`` (factored, Martens & Grosse 2015) or ``"exact"``
            (eigen-decomposition of both factors).
        inverse: ``"eigh"`` or ``"cholesky"`` (π-damping only) — how dense
            factors are inverted (low-rank methods use it for factors they
            represent exactly, e.g. a rank at or above the dimension).
        a: representation of the input-side factor A: ``None`` (this
            method's), ``"eigh"``, ``"cholesky"``, ``"diagonal"`` (only the
            diagonal of ``A``: ``d`` numbers), a low-rank method name
            (``"rkfac"``, ``"bkfac"``, ...), a K-FAC-family config such as
            ``sr.BKFAC(rank=128)`` (only its representation fields are used),
            or ``"auto"``: chosen by the factor's width (`by_width`: dense up
            to 1024, SRE-KFAC rank 64 up to 8192, diagonal above) — what the
            default policy uses.
        g: the same for the output-gradient factor G.
    """

    name: ClassVar[str] = "kfac"
    #: How this config represents a factor (see `KFAC.factor`).
    representation: ClassVar[str] = "dense"

    ema: float = 0.95
    stats_every: int = 1
    inverse_every: int = 10
    damping_mode: str = "pi"
    inverse: str = "eigh"
    a: "str | KFAC | None" = None
    g: "str | KFAC | None" = None

    def validate(self) -> None:
        super().validate()
        check_float(self, "ema", 0.0, 1.0, high_open=True)
        check_int(self, "stats_every", 1)
        check_int(self, "inverse_every", 1)
        check_choice(self, "damping_mode", DAMPING_MODES)
        check_choice(self, "inverse", DENSE_INVERSES)
        names = (AUTO, DIAGONAL, *DENSE_INVERSES, *sorted(n for n, c in METHODS.items() if issubclass(c, LowRankKFAC)))
        for side in ("a", "g"):
            value = getattr(self, side)
            if isinstance(value, KFAC):
                if value.a is not None or value.g is not None:
                    _fail(self, side, "a config without its own a=/g=", value)
            elif not (value is None or value in names):
                _fail(self, side, "None, one of " + ", ".join(map(repr, names)) + " or a K-FAC-family config", value)
        if self.damping_mode == "exact":
            for side in ("a", "g"):
                if self.factor(side).uses_cholesky:
                    _fail(self, side if getattr(self, side) is not None else "inverse",
                          "'eigh' when damping_mode='exact' (needs eigenpairs)", "cholesky")

    @property
    def uses_cholesky(self) -> bool:
        """Whether dense factors of this config are inverted by Cholesky."""
        return self.representation == "dense" and self.inverse == "cholesky"

    def factor(self, side: str, dim: int | None = None) -> "KFAC":
        """The config whose representation serves factor ``side`` (``"a"`` or ``"g"``) of width ``dim``.

        ``"auto"`` needs the width (`by_width`); without it (validation) it
        stands for its dense choice.
        """
        value = getattr(self, side)
        if value is None:
            return self
        if isinstance(value, KFAC):
            return value
        if value == AUTO:
            return by_width(dim, self.inverse) if dim is not None else KFAC(inverse=self.inverse)
        if value in DENSE_INVERSES:
            return KFAC(inverse=value)
        if value == DIAGONAL:
            return DiagonalKFAC()
        return METHODS[value]()

    def chooses_by_width(self, side: str) -> bool:
        """Whether factor ``side`` is ``"auto"`` (its representation depends on its width)."""
        return getattr(self, side) == AUTO

    @property
    def statistics_every(self) -> int:
        return self.stats_every


@dataclass(frozen=True, kw_only=True)
class DiagonalKFAC(KFAC):
    """Diagonal K-FAC: each factor keeps only its diagonal (``d`` numbers, O(d·rows) statistics).

    ``V = (diag G + λ_G)⁻¹ ∇W (diag A + λ_A)⁻¹``: an elementwise scaling, as
    cheap as Adam's, that still follows the Kronecker structure. As one side's
    representation (``g="diagonal"``) it is what the default policy gives
    vocabulary-sized factors.
    """

    name: ClassVar[str] = "diagonalkfac"
    representation: ClassVar[str] = "diagonal"


def by_width(
    dim: int,
    inverse: str = "eigh",
    *,
    dense_max: int = AUTO_DENSE_MAX,
    diagonal_min: int = AUTO_DIAGONAL_MIN,
    rank: int = AUTO_RANK,
) -> KFAC:
    """The representation ``"auto"`` picks for a ``dim``-wide factor: dense, SRE-KFAC or diagonal by width."""
    if dim <= dense_max:
        return KFAC(inverse=inverse)
    if dim <= diagonal_min:
        return SREKFAC(rank=rank)
    return DiagonalKFAC()


def _check_adaptive_rank(method: "LowRankKFAC") -> None:
    value = method.adaptive_rank
    if isinstance(value, bool):
        return
    ok = (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 1 <= value[0] <= method.rank <= value[1]
    )
    if not ok:
        _fail(method, "adaptive_rank", f"a bool or integer bounds (low, high) with 1 <= low <= rank={method.rank} <= high", value)


@dataclass(frozen=True, kw_only=True)
class LowRankKFAC(KFAC):
    """Fields shared by the low-rank K-FAC methods (DESIGN §3.2).

    Each factor keeps its top-``rank`` eigenpairs ``F ≈ U diag(s) Uᵀ``; the
    damped inverse is applied in O(d·r) per gradient column, never forming
    ``d × d``.

    Attributes:
        rank: eigenpairs kept per factor; at or above a factor's dimension the
            factor is represented exactly (``describe()`` says so).
        complement: eigenvalue assumed on the discarded modes: ``"min"`` (the
            smallest kept one — continue the spectrum) or ``"zero"``.
        adaptive_rank: ``False`` (fixed rank), ``True`` (bounds
            ``(max(1, rank // 4), 4 * rank)``) or ``(low, high)``. After each
            decomposition the rank becomes ``⌈1.5·n⌉`` clipped to the bounds,
            where ``n`` counts kept eigenvalues ``≥ rank_target · max(s)``: it
            grows while every kept mode is significant and shrinks otherwise.
        rank_target: relative eigenvalue threshold of the adaptive rule, in (0, 1).
    """

    rank: int = 64
    complement: str = "min"
    adaptive_rank: bool | tuple[int, int] = False
    rank_target: float = 1e-2

    def validate(self) -> None:
        super().validate()
        check_int(self, "rank", 1)
        check_choice(self, "complement", COMPLEMENTS)
        _check_adaptive_rank(self)
        check_float(self, "rank_target", 0.0, 1.0, low_open=True, high_open=True)

    @property
    def rank_bounds(self) -> tuple[int, int] | None:
        """``(low, high)`` of the adaptive rank, ``None`` when the rank is fixed."""
        if self.adaptive_rank is False:
            return None
        if self.adaptive_rank is True:
            return max(1, self.rank // 4), 4 * self.rank
        return self.adaptive_rank


@dataclass(frozen=True, kw_only=True)
class SketchedKFAC(LowRankKFAC):
    """Fields of the randomized sketches (Halko–Martinsson–Tropp range finder).

    Attributes:
        oversample: extra sketch columns p beyond the rank (≥ 0).
        power_iters: power iterations q, re-orthonormalised by QR (≥ 0).
    """

    oversample: int = 10
    power_iters: int = 2

    def validate(self) -> None:
        super().validate()
        check_int(self, "oversample", 0)
        check_int(self, "power_iters", 0)


@dataclass(frozen=True, kw_only=True)
class RKFAC(SketchedKFAC):
    """R-KFAC: randomized SVD of each EA factor every ``inverse_every`` steps.

    Keeps the dense EA factor (``d²``) but decomposes it in O(d²·(r+p)·(q+1))
    instead of O(d³); applying the inverse costs O(d_g·d_a·r).
    """

    name: ClassVar[str] = "rkfac"
    representation: ClassVar[str] = "rsvd"


@dataclass(frozen=True, kw_only=True)
class SREKFAC(SketchedKFAC):
    """SRE-KFAC: symmetric randomized eigendecomposition ``eigh(Qᵀ F Q)`` (Puiu 2022)."""

    name: ClassVar[str] = "srekfac"
    representation: ClassVar[str] = "sre"


@dataclass(frozen=True, kw_only=True)
class NystromKFAC(SketchedKFAC):
    """Nyström sketch of the PSD factor (Tropp et al. 2017): more accurate at the same cost."""

    name: ClassVar[str] = "nystromkfac"
    representation: ClassVar[str] = "nystrom"


@dataclass(frozen=True, kw_only=True)
class BKFAC(LowRankKFAC):
    """B-KFAC: Brand's online update of a truncated eigendecomposition; no ``d × d`` state.

    Each statistics step folds the new rows straight into ``(U, s)`` in
    O(d·(r+m)²): memory and time linear in the width. Valid while
    ``rank + rows < d``; a factor where it is not uses the exact dense
    representation (decided at the first statistics step, noted by
    ``describe()``). ``inverse_every`` (default 1) is how often the
    preconditioner takes the current ``(U, s)``; above 1 the previous basis is
    kept meanwhile (twice the state).
    """

    name: ClassVar[str] = "bkfac"
    representation: ClassVar[str] = "brand"

    inverse_every: int = 1


@dataclass(frozen=True, kw_only=True)
class BRKFAC(BKFAC, SketchedKFAC):
    """B-R-KFAC: Brand updates plus the dense EA factor, re-sketched (SRE) every ``refresh_every`` steps.

    Attributes:
        refresh_every: replace the Brand state by a fresh sketch of the dense
            factor every this many steps (≥ 1).
    """

    name: ClassVar[str] = "brkfac"
    representation: ClassVar[str] = "brand_refresh"

    refresh_every: int = 10

    def validate(self) -> None:
        super().validate()
        check_int(self, "refresh_every", 1)


@dataclass(frozen=True, kw_only=True)
class BKFACC(BKFAC):
    """B-KFAC-c: Brand updates plus a periodic partial correction from the dense EA factor.

    Attributes:
        correct_every: correct every this many steps (≥ 1).
        correct_fraction: share of the kept columns re-diagonalised against the
            dense factor at each correction, in (0, 1].
    """

    name: ClassVar[str] = "bkfacc"
    representation: ClassVar[str] = "brand_correct"

    correct_every: int = 10
    correct_fraction: float = 0.2

    def validate(self) -> None:
        super().validate()
        check_int(self, "correct_every", 1)
        check_float(self, "correct_fraction", 0.0, 1.0, low_open=True)


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
class SINGD(KroneckerMethod):
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


@dataclass(frozen=True, kw_only=True)
class SENG(CurvatureMethod):
    """SENG: the empirical-Fisher natural gradient solved in the N × N sample space (Yang et al. 2021).

    With per-sample gradient rows ``U = [∇ℓ_i / √N]`` (N × p) the direction is
    ``(UᵀU + λI)⁻¹ ∇ = (∇ − Uᵀ (λI + UUᵀ)⁻¹ U ∇) / λ`` (Sherman–Morrison–Woodbury),
    built from the layer's ``(a, g)`` rows without forming ``U`` when that is
    cheaper (exact for Linear and for weight-shared layers). DESIGN §3.4.

    Attributes:
        damping: λ; off the span of the batch's per-sample gradients the
            direction is ``∇ / λ``, so λ sets the step scale there (default 1).
        update_every: capture the batch's rows and refactor the ``N × N``
            system every this many steps; every step preconditions its fresh
            gradient with the kept rows and factor.
        sketch_size: ``None`` (exact) or the number of gradient columns (input
            coordinates) sampled, uniformly without replacement and rescaled,
            in each of the two per-step products with ``U``. The two draws are
            independent and the ``N × N`` system stays exact, so the direction
            is an unbiased estimate of the exact one at a fraction
            ``sketch_size / d_in`` of those products' cost. At or above the
            layer's column count it is exact.
    """

    name: ClassVar[str] = "seng"

    damping: float = 1.0
    update_every: int = 1
    sketch_size: int | None = None

    def validate(self) -> None:
        super().validate()
        check_int(self, "update_every", 1)
        if self.sketch_size is not None:
            check_int(self, "sketch_size", 1)

    @property
    def statistics_every(self) -> int:
        return self.update_every

    @property
    def row_layout(self) -> str:
        return "sample"


COARSE_SPACES = ("nicolaides", "spectral", "residual")


@dataclass(frozen=True, kw_only=True)
class TwoLevel:
    """Two-level K-FAC: a cross-layer coarse correction on top of every layer's own method (Koroko et al. 2023).

    Not a per-layer method: pass it as ``sr.Optimizer(..., two_level=sr.TwoLevel())``.
    Each managed layer ``i`` contributes one coarse vector ``r_i`` (its
    parameters' shape); with ``R0`` the ``L × n`` block matrix of those vectors
    and ``F`` the empirical Fisher of all managed parameters, the direction is
    ``M⁻¹∇ + R0ᵀ (R0 F R0ᵀ + λ·diag(‖r_i‖²))⁻¹ R0 ∇``, where ``M⁻¹∇`` is the
    layers' own preconditioned gradients. The ``L × L`` system is built from
    per-sample projections ``(R0 ∇ℓ_n)_i`` (an ``N × L`` matrix; no full
    Fisher). DESIGN §3.5.

    Attributes:
        coarse: the coarse space: ``"nicolaides"`` (``r_i`` all ones),
            ``"spectral"`` (``u_G v_Aᵀ``, the leading eigenvectors of the
            layer's batch factors ``G`` and ``A``) or ``"residual"`` (the
            layer's block of the fine level's residual ``∇ − (F + λI) M⁻¹∇``).
        damping: λ of the coarse system (``λ·‖r_i‖²`` on its diagonal: the
            Galerkin projection of ``F + λI``).
        update_every: rebuild the coarse vectors and system every this many
            steps (with the rows of that step's batch); in between the kept
            ones correct each step's fresh gradient.
        power_iters: power iterations for the ``"spectral"`` eigenvectors
            (warm-started from the previous refresh).
        loss_average: ``"batch"`` (mean-reduced loss) or ``None`` (summed), as
            for the per-layer methods.
    """

    coarse: str = "nicolaides"
    damping: float = 1e-3
    update_every: int = 10
    power_iters: int = 20
    loss_average: str | None = "batch"

    def __post_init__(self) -> None:
        check_choice(self, "coarse", COARSE_SPACES)
        check_float(self, "damping", 0.0, low_open=True)
        check_int(self, "update_every", 1)
        check_int(self, "power_iters", 1)
        check_choice(self, "loss_average", LOSS_AVERAGE)

    def summary(self) -> str:
        """Short text for ``describe()``."""
        return f"two-level({self.coarse}, damping={self.damping}, update_every={self.update_every})"


#: Every method config by its lowercase name (the ``from_dict`` / TOML form).
METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (KFAC, DiagonalKFAC, RKFAC, SREKFAC, NystromKFAC, BKFAC, BRKFAC, BKFACC, SINGD, SENG, Skip)
}
