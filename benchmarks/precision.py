"""fp32 vs bf16 autocast (bf16 SINGD state) vs fp16 autocast + GradScaler, per method, on real data.

Models: the digits MLP (64 → 128 → 128 → 10) and the digits CNN (two 3×3
convs, max-pool, linear head) of `singd_rkfac.data`, trained from the same
initial weights on the same minibatches in every regime:

* ``fp32``: no autocast; SINGD state in fp32;
* ``bf16``: ``torch.autocast(device, dtype=torch.bfloat16)``, no loss scaling;
  SINGD state (K, C, momenta, statistics) in bf16;
* ``fp16``: ``torch.autocast(device, dtype=torch.float16)`` with a
  ``torch.amp.GradScaler`` (``scaler.step(opt)``); SINGD state in fp16. A
  device without fp16 autocast records ``unsupported``;
* ``bf16-fp32state`` (SINGD only, a diagnostic): bf16 autocast with fp32
  SINGD state. Comparing it with ``bf16`` separates what the bf16 forward and
  backward passes change from what the bf16 state changes.

The K-FAC family (K-FAC, B-KFAC, SRE-KFAC) keeps its factors and
decompositions in fp32 in every regime, as the package always does. Every
method runs with the package's defaults and the learning rates of
``singd-rkfac demo``. Reported per run: the final loss on the whole training
set and the test accuracy (both evaluated in fp32, without autocast); skipped
steps (gradients with inf/NaN: ``opt.preconditioner.skipped_steps``, and
GradScaler back-offs for AdamW); non-finite minibatch losses; the dtypes of
the curvature state; and the ratio of the final loss to the same method's fp32
run. Target (BENCHMARKS.md): bf16 SINGD within 5 % of fp32, with no non-finite
step. For scale, every method also reruns fp32 with another minibatch order
(same initial weights). That ratio shows how much the final loss moves when
nothing but the data order changes.

Negative control: K-FAC whose factors are stored, averaged and inverted in the
regime's half dtype (bf16 or fp16), the set-up that the literature reports
failing. ``KFAC-lowprec`` emulates a half-precision eigendecomposition by
rounding, and ``KFAC-lowprec-NS`` computes a Newton–Schulz inverse entirely in
the half dtype (see `LowPrecisionKFAC`). Their fp32 reference is the K-FAC fp32
run, so the precision of the factors is the only difference.

    python benchmarks/precision.py [--models mlp] [--methods SINGD-diagonal KFAC] [--steps 200]
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

import common
import singd_rkfac as sr
from singd_rkfac.curvature import CURVATURE_CLASSES, KFACCurvature, register
from singd_rkfac.curvature.factors import DenseFactor, Inverse
from singd_rkfac.data import MODELS, batch_order, load_digits
from singd_rkfac.linalg import Eigen

NAME = "precision"
STEPS = 200
QUICK_STEPS = 8
BATCH = 64
MODEL_NAMES = ("mlp", "cnn")
QUICK_MODELS = ("mlp",)
#: Update-rule hyperparameters: those of ``singd-rkfac demo`` (same data, same model family).
ADAMW_LR = 3e-3
KFAC_LR = 0.1  # with the optimizer's default KL clip
SINGD_LR = 0.01
SINGD_MOMENTUM = 0.9
LOWRANK_RANK = 32
BLOCK_SIZE = 16
#: bf16 SINGD's final loss should be within this factor of its fp32 run's, |ratio − 1| ≤ 5 % (BENCHMARKS.md).
TARGET_RATIO = 1.05
#: Moving-average window of the plotted minibatch losses.
SMOOTH = 10
#: How the negative control inverts its half-precision factors (see `LowPrecisionKFAC`).
INVERSIONS = ("eigh", "newton-schulz")
#: Newton–Schulz iterations: in exact arithmetic enough for ‖M‖_F / λ_min up to ~1e8.
NEWTON_SCHULZ_STEPS = 30


# -- the negative control -------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LowPrecisionKFAC(sr.KFAC):
    """K-FAC with its factors stored and inverted in ``factor_dtype`` (bf16 or fp16): the negative control.

    The package never does this (`KFACCurvature.state_dtype` is fp32 at
    least). Here the running averages ``A``, ``G`` live in the half dtype,
    and so do their eigenpairs, the damped inverses and the preconditioning
    products. CPUs (and torch on GPUs) have no half-precision ``eigh``, so
    the inversion is *emulated by rounding*, the standard model of a
    backward-stable algorithm run at the half dtype's unit roundoff:

    1. the factor is already rounded to the half dtype (it is stored there);
    2. ``eigh`` of that rounded factor is computed in fp32 (the one step done
       in higher precision — a stand-in for a half-precision eigensolver,
       which would be at least this inaccurate);
    3. eigenvalues and eigenvectors are rounded to the half dtype, and the
       damped inverse ``Q diag(1/(s + λ)) Qᵀ`` is assembled in the half dtype.

    ``inversion="newton-schulz"`` instead computes the damped inverse entirely
    in the half dtype, with no higher-precision step at all: the Newton–Schulz
    iteration ``X ← X (2I − M X)`` on ``M = F + λI`` from ``X₀ = I / ‖M‖_F``
    (which makes ``‖I − M X₀‖ < 1``), `NEWTON_SCHULZ_STEPS` iterations, every
    product rounded to the half dtype — the inverse a half-precision GPU
    kernel would compute. Its accuracy is limited to about ``κ(M)·u`` (``u``
    the unit roundoff: 2⁻⁸ for bf16, 2⁻¹¹ for fp16).

    Statistics are staged in fp32 and rounded when they are folded into the
    average, as the package does for fp16 SINGD state: the control is not
    failing merely from overflow in the batch's sum of squares. It isolates the
    storage and the inversion. Everything else (π-damping, EMA, update periods,
    the optimizer's KL clip, the fp64/jitter retry when a decomposition fails)
    is K-FAC's.
    """

    name: ClassVar[str] = "kfac_lowprec"

    factor_dtype: torch.dtype = torch.bfloat16
    inversion: str = "eigh"

    def validate(self) -> None:
        super().validate()
        if self.factor_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"kfac_lowprec: factor_dtype must be torch.bfloat16 or torch.float16 (got {self.factor_dtype!r})")
        if self.inversion not in INVERSIONS:
            raise ValueError(f"kfac_lowprec: inversion must be one of {INVERSIONS} (got {self.inversion!r})")


class LowPrecisionFactor(DenseFactor):
    """A dense factor in a half dtype: fp32 staging, half storage, inversion emulated by rounding."""

    def accumulate(self, rows: Tensor) -> None:
        rows = rows.float()
        gram = rows.T @ rows
        self.staged = gram if self.staged is None else self.staged.add_(gram)

    def fold(self, scale: float | Tensor, ema: float, *, compute: bool = True) -> None:
        if self.staged is None:
            return
        batch = (self.staged * scale).to(self.dtype)  # the batch factor rounded to the half dtype
        self.staged = None
        finite = torch.isfinite(batch).all()
        weight = self.initialized.to(batch.dtype) * ema
        self.value = torch.where(finite, torch.lerp(batch, self.value, weight), self.value)
        self.initialized = self.initialized | finite

    def decompose(self, damping: Tensor | None, step: int) -> Inverse | None:
        if not bool(torch.isfinite(self.value).all()):
            return None
        if self.config.inversion == "newton-schulz" and damping is not None:
            return self._newton_schulz(damping.to(self.dtype))
        try:
            values, vectors = torch.linalg.eigh(self.value.float())  # stands in for a half-precision eigh
        except torch.linalg.LinAlgError:
            return None
        values, vectors = values.clamp_min(0.0).to(self.dtype), vectors.to(self.dtype)
        if damping is None:
            return Inverse(eigen=Eigen(values, vectors))
        inverse = (vectors / (values + damping.to(self.dtype))) @ vectors.T  # assembled in the half dtype
        if not bool(torch.isfinite(inverse).all()):
            return None
        return Inverse(matrix=inverse)

    def _newton_schulz(self, damping: Tensor) -> Inverse | None:
        eye = torch.eye(self.dim, device=self.device, dtype=self.dtype)
        matrix = self.value + damping * eye
        inverse = eye / matrix.float().norm().clamp_min(torch.finfo(self.dtype).tiny).to(self.dtype)
        for _ in range(NEWTON_SCHULZ_STEPS):
            inverse = inverse @ (2.0 * eye - matrix @ inverse)
        inverse = (inverse + inverse.T) / 2.0
        if not bool(torch.isfinite(inverse).all()):
            return None
        return Inverse(matrix=inverse)


class LowPrecisionKFACCurvature(KFACCurvature):
    """`KFACCurvature` with `LowPrecisionFactor` on both sides, state in ``method.factor_dtype``."""

    method_types = (LowPrecisionKFAC,)
    method: LowPrecisionKFAC

    def __init__(self, method: LowPrecisionKFAC, dims: Any, **kwargs: Any) -> None:
        super().__init__(method, dims, **kwargs)
        self.factors = {
            side: LowPrecisionFactor(dim, method, device=self.device, dtype=self.dtype)
            for side, dim in (("a", dims.d_a), ("g", dims.d_g))
        }

    @classmethod
    def state_dtype(cls, method: LowPrecisionKFAC, param_dtype: torch.dtype) -> torch.dtype:
        return method.factor_dtype


if LowPrecisionKFACCurvature not in CURVATURE_CLASSES:
    register(LowPrecisionKFACCurvature)


# -- regimes and contenders -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Regime:
    """How one run computes: autocast dtype (``None``: none), loss scaling, the half dtype of the state.

    ``state`` is SINGD's ``dtype`` and the negative control's factor dtype
    (``None``: fp32). ``families``: the method families that run in it (``None``: all).
    """

    name: str
    title: str
    autocast: torch.dtype | None
    scaler: bool
    state: torch.dtype | None
    families: tuple[str, ...] | None = None


REGIMES = {
    "fp32": Regime("fp32", "fp32", None, False, None, ("baseline", "kfac", "singd")),
    "bf16": Regime("bf16", "bf16 autocast, bf16 state", torch.bfloat16, False, torch.bfloat16),
    "fp16": Regime("fp16", "fp16 autocast + GradScaler, fp16 state", torch.float16, True, torch.float16),
    # diagnostic: bf16 arithmetic in forward/backward only, so a bf16 deviation can be attributed
    "bf16-fp32state": Regime("bf16-fp32state", "bf16 autocast, fp32 SINGD state", torch.bfloat16, False, None,
                             ("singd",)),
}
HALF_REGIMES = ("bf16", "fp16", "bf16-fp32state")
#: Ratios above this are drawn cut off (hatched) in the figure.
FIGURE_RATIO_CAP = 3.0
REGIME_COLOURS = {"bf16": "tab:purple", "fp16": "tab:olive", "bf16-fp32state": "lightgrey"}


@dataclass(frozen=True)
class Contender:
    """A method: how to build its optimizer given the regime's half dtype; ``reference`` is whose fp32 run it is compared with."""

    label: str
    family: str  # "baseline", "kfac", "singd" or "control"
    build: Callable[[nn.Module, torch.dtype | None], torch.optim.Optimizer]
    reference: str

    def runs_in(self, regime: Regime) -> bool:
        return regime.families is None or self.family in regime.families


def _ours(method: sr.Method, lr: float, momentum: float = 0.0) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda model: sr.Optimizer(model, sr.Policy(default=method), lr=lr, momentum=momentum)


def _singd(**fields: Any) -> Callable[[nn.Module, torch.dtype | None], torch.optim.Optimizer]:
    return lambda model, dtype: _ours(sr.SINGD(dtype=dtype, **fields), SINGD_LR, SINGD_MOMENTUM)(model)


def _kfac(method: sr.KFAC) -> Callable[[nn.Module, torch.dtype | None], torch.optim.Optimizer]:
    return lambda model, dtype: _ours(method, KFAC_LR)(model)  # factors fp32 in every regime


def _control(inversion: str) -> Callable[[nn.Module, torch.dtype | None], torch.optim.Optimizer]:
    return lambda model, dtype: _ours(LowPrecisionKFAC(factor_dtype=dtype, inversion=inversion), KFAC_LR)(model)


def contenders() -> dict[str, Contender]:
    """Every method by label, the negative control last."""
    items = [
        Contender("AdamW", "baseline", lambda model, dtype: torch.optim.AdamW(model.parameters(), lr=ADAMW_LR), "AdamW"),
        Contender("KFAC", "kfac", _kfac(sr.KFAC()), "KFAC"),
        Contender("BKFAC", "kfac", _kfac(sr.BKFAC(rank=LOWRANK_RANK)), "BKFAC"),
        Contender("SREKFAC", "kfac", _kfac(sr.SREKFAC(rank=LOWRANK_RANK)), "SREKFAC"),
        Contender("SINGD-diagonal", "singd", _singd(structure="diagonal"), "SINGD-diagonal"),
        Contender("SINGD-dense", "singd", _singd(structure="dense"), "SINGD-dense"),
        Contender(f"SINGD-block{BLOCK_SIZE}", "singd", _singd(structure="block", block_size=BLOCK_SIZE),
                  f"SINGD-block{BLOCK_SIZE}"),
        Contender("KFAC-lowprec", "control", _control("eigh"), "KFAC"),
        Contender("KFAC-lowprec-NS", "control", _control("newton-schulz"), "KFAC"),
    ]
    return {c.label: c for c in items}


def regime_unsupported(regime: Regime, device: torch.device) -> str | None:
    """Why ``regime`` cannot run on ``device`` (``None`` when it can): autocast to its dtype must work."""
    if regime.autocast is None:
        return None
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        return f"no autocast on {device.type}"
    try:
        probe = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).to(device)
        with torch.autocast(device.type, dtype=regime.autocast):
            out = probe(torch.randn(2, 1, 6, 6, device=device))
        out.float().sum().backward()
        if regime.scaler:
            torch.amp.GradScaler(device.type)
    except (RuntimeError, TypeError, ValueError) as error:
        return f"{type(error).__name__}: {error}".splitlines()[0]
    if out.dtype != regime.autocast:
        return f"autocast to {regime.autocast} on {device.type} computes in {out.dtype}"
    return None


# -- one run ----------------------------------------------------------------------------------------------


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float | None, float]:
    """Cross-entropy and accuracy in fp32 (no autocast)."""
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return _finite_or_none(loss), accuracy


def _curvature_report(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Dtypes and finiteness of our curvature state; decomposition failures of the K-FAC family."""
    pre = getattr(optimizer, "preconditioner", None)
    if pre is None:
        return {}
    dtypes: set[str] = set()
    finite = True
    for layer in pre.state_dict()["layers"].values():
        for value in layer["curvature"].values():
            if isinstance(value, Tensor) and value.is_floating_point():
                dtypes.add(str(value.dtype).replace("torch.", ""))
                finite = finite and bool(torch.isfinite(value).all())
    failures = sum(getattr(getattr(m.curvature, "failures", None), "total", 0) for m in pre.layers.values())
    report = {"state_dtypes": sorted(dtypes), "state_finite": finite, "decomposition_failures": failures}
    # SINGD: how far K and C moved from the identity (mean of their diagonals; K Kᵀ scales the step)
    scales = {
        name: [float(factor.to_dense().float().diagonal().mean()) for factor in (m.curvature.K, m.curvature.C)]
        for name, m in pre.layers.items() if hasattr(m.curvature, "K")
    }
    if scales:
        report["singd_mean_diagonal_K_C"] = scales
    return report


def train(
    contender: Contender, regime: Regime, model_name: str, data: Any, batches: list[Tensor], args: Any
) -> dict[str, Any]:
    """Train a freshly seeded model with ``contender`` in ``regime``; losses, counts and final figures."""
    device = args.device
    torch.manual_seed(args.seed)
    model = MODELS[model_name]().to(device)
    optimizer = contender.build(model, regime.state)
    scaler = torch.amp.GradScaler(device.type) if regime.scaler else None
    autocast = (
        (lambda: torch.autocast(device.type, dtype=regime.autocast)) if regime.autocast else contextlib.nullcontext
    )
    losses: list[float | None] = []
    backoffs = nonfinite_losses = 0
    error = None
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, index in enumerate(batches):
            x, y = data.x_train[index], data.y_train[index]
            optimizer.zero_grad(set_to_none=True)
            try:
                with autocast():
                    loss = nn.functional.cross_entropy(model(x), y)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    before = scaler.get_scale()
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    backoffs += scaler.get_scale() < before
            except (sr.DecompositionError, RuntimeError) as exc:  # a failing method is a result, not a crash
                error = f"step {step}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                break
            value = float(loss.detach())
            nonfinite_losses += not math.isfinite(value)
            losses.append(_finite_or_none(float(f"{value:.5g}")))  # 5 digits: the curves, not the verdicts
    common.synchronize(device)
    seconds = time.perf_counter() - start
    train_loss, train_accuracy = _evaluate(model, data.x_train, data.y_train)
    test_loss, test_accuracy = _evaluate(model, data.x_test, data.y_test)
    pre = getattr(optimizer, "preconditioner", None)
    skipped = pre.skipped_steps if pre is not None else (backoffs if scaler is not None else 0)
    warned: dict[str, int] = {}
    for w in caught:
        key = f"{w.category.__name__}: {str(w.message)[:90]}"
        warned[key] = warned.get(key, 0) + 1
    return {
        "method": contender.label, "regime": regime.name, "model": model_name,
        "steps_run": len(losses), "losses": losses,
        "final_train_loss": train_loss, "train_accuracy": train_accuracy,
        "test_loss": test_loss, "test_accuracy": test_accuracy,
        "skipped_steps": skipped, "scaler_backoffs": backoffs if scaler is not None else None,
        "nonfinite_losses": nonfinite_losses,
        "parameters_finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "error": error, "warnings": warned, "seconds": seconds,
        "final_scale": scaler.get_scale() if scaler is not None else None,
        **_curvature_report(optimizer),
    }


# -- summary, table, plot ---------------------------------------------------------------------------------
def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def _failed(run: dict[str, Any]) -> bool:
    return run["error"] is not None or run["final_train_loss"] is None or not run["parameters_finite"]


def summarize(raw: dict[str, Any], names: list[str], regimes: list[str], models: list[str]) -> dict[str, Any]:
    table = contenders()
    rows = []
    for model_name in models:
        runs = raw[model_name]
        for name in names:
            contender = table[name]
            reference = runs.get(contender.reference, {}).get("fp32")
            ref_loss = None if reference is None or _failed(reference) else reference["final_train_loss"]
            noise = runs.get(name, {}).get("fp32-reorder")
            for regime in regimes:
                run = runs.get(name, {}).get(regime)
                if run is None:
                    continue
                row = {"model": model_name, "method": name, "regime": regime, "unsupported": run.get("unsupported")}
                if run.get("unsupported") is None:
                    row.update({
                        "final_train_loss": run["final_train_loss"], "test_accuracy": run["test_accuracy"],
                        "skipped_steps": run["skipped_steps"], "nonfinite_losses": run["nonfinite_losses"],
                        "failed": _failed(run), "error": run["error"],
                        "ratio_to_fp32": _ratio(run["final_train_loss"], ref_loss),
                        "test_accuracy_change": (run["test_accuracy"] - reference["test_accuracy"]
                                                 if reference is not None else None),
                        "decomposition_failures": run.get("decomposition_failures"),
                        "state_dtypes": run.get("state_dtypes"),
                    })
                    if regime == "fp32" and noise is not None:
                        row["reorder_ratio"] = _ratio(noise["final_train_loss"], ref_loss)
                rows.append(row)
    bf16_singd = [r for r in rows if r["regime"] == "bf16" and r["method"].startswith("SINGD") and not r["unsupported"]]
    clean = [r for r in bf16_singd if r["ratio_to_fp32"] is not None and r["skipped_steps"] == 0
             and r["nonfinite_losses"] == 0]
    ratios = [r["ratio_to_fp32"] for r in bf16_singd if r["ratio_to_fp32"] is not None]
    target = {
        "criterion": f"bf16 SINGD: final loss within {TARGET_RATIO - 1:.0%} of the fp32 run's, "
                     "no skipped step, no non-finite loss",
        "runs": len(bf16_singd),
        # as worded: |ratio − 1| ≤ 5 %; a lower loss than fp32's counts against it too
        "met_within": sum(1 for r in clean if abs(r["ratio_to_fp32"] - 1.0) <= TARGET_RATIO - 1.0),
        # one-sided: not more than 5 % worse
        "met_not_worse": sum(1 for r in clean if r["ratio_to_fp32"] <= TARGET_RATIO),
        "ratios": ratios,
        "largest_deviation": max((abs(x - 1.0) for x in ratios), default=None),
    }
    return {"rows": rows, "target": target}


def _fmt_loss(value: float | None) -> str:
    return "NaN" if value is None else f"{value:.4g}"


def report(summary: dict[str, Any]) -> None:
    headers = ["model", "method", "regime", "state", "final loss", "× fp32", "test acc", "skipped", "non-finite loss",
               "note"]
    body = []
    for r in summary["rows"]:
        if r["unsupported"]:
            body.append([r["model"], r["method"], r["regime"], "-", "-", "-", "-", "-", "-",
                         f"unsupported: {r['unsupported']}"])
            continue
        note = []
        if r.get("reorder_ratio") is not None:
            note.append(f"reordered data: ×{r['reorder_ratio']:.3f}")
        if r["error"]:
            note.append(r["error"][:60])
        elif r["failed"]:
            note.append("diverged")
        if r.get("decomposition_failures"):
            note.append(f"{r['decomposition_failures']} failed decompositions")
        body.append([
            r["model"], r["method"], r["regime"], "/".join(r["state_dtypes"] or ["-"]), _fmt_loss(r["final_train_loss"]),
            common.fmt_ratio(r["ratio_to_fp32"], 3), f"{100 * r['test_accuracy']:.1f} %",
            r["skipped_steps"], r["nonfinite_losses"], "; ".join(note),
        ])
    common.print_table(headers, body, "final training loss (fp32 evaluation), ratio to the method's fp32 run, "
                       "skipped (inf/NaN) steps")
    t = summary["target"]
    worst = "-" if t["largest_deviation"] is None else f"{t['largest_deviation']:.1%}"
    print(f"target ({t['criterion']}): met by {t['met_within']} of {t['runs']} runs "
          f"({t['met_not_worse']} of {t['runs']} are at most {TARGET_RATIO - 1:.0%} worse); "
          f"largest deviation from fp32 {worst}")


def _smoothed(losses: list[float | None]) -> tuple[list[int], list[float]]:
    xs, ys, window = [], [], []
    for i, value in enumerate(losses):
        window = (window + [value])[-SMOOTH:]
        finite = [v for v in window if v is not None]
        if len(finite) == len(window):
            xs.append(i + 1)
            ys.append(sum(finite) / len(finite))
    return xs, ys


def _style(name: str) -> dict[str, Any]:
    if name.startswith("KFAC-lowprec"):
        return {"color": "magenta" if name == "KFAC-lowprec" else "darkgoldenrod", "linestyle": "--", "linewidth": 2.0}
    style = common.method_style(name.replace(f"block{BLOCK_SIZE}", "block32"))
    style.pop("marker", None)
    return style


def figure(summary: dict[str, Any], raw: dict[str, Any], regimes: list[str], models: list[str]) -> Any:
    half = [r for r in regimes if r in HALF_REGIMES]
    columns = 1 + len(regimes)
    fig = common.new_figure(4.2 * columns, 3.8 * len(models))
    if fig is None:
        return None
    axes = fig.subplots(len(models), columns, squeeze=False)
    for i, model_name in enumerate(models):
        # ratios of the half-precision final losses to fp32, as bars from 1 (failed runs: hatched, to the top)
        ax = axes[i][0]
        rows = [r for r in summary["rows"] if r["model"] == model_name and not r["unsupported"]]
        half_rows = [r for r in rows if r["regime"] in half]
        methods = list(dict.fromkeys(r["method"] for r in half_rows))
        finite = [r["ratio_to_fp32"] for r in half_rows if not r["failed"] and r["ratio_to_fp32"] is not None]
        finite += [r["reorder_ratio"] for r in rows if r.get("reorder_ratio") is not None]
        low = min([0.85, *(0.95 * x for x in finite)])
        high = min(max([1.2, *(1.05 * x for x in finite)]), FIGURE_RATIO_CAP)
        if any(r["failed"] or r["ratio_to_fp32"] is None for r in half_rows):
            high = FIGURE_RATIO_CAP
        width = 0.8 / max(1, len(half))
        labelled: set[str] = set()
        ax.axhspan(2.0 - TARGET_RATIO, TARGET_RATIO, color="tab:green", alpha=0.12, label=f"±{TARGET_RATIO - 1:.0%}")
        for k, regime in enumerate(half):
            for j, name in enumerate(methods):
                row = next((r for r in half_rows if r["method"] == name and r["regime"] == regime), None)
                if row is None:
                    continue
                ratio = row["ratio_to_fp32"]
                broken = row["failed"] or ratio is None
                x = j + (k - (len(half) - 1) / 2) * width
                top = high if broken else min(ratio, high)
                ax.bar(x, top - 1.0, width, bottom=1.0, color=REGIME_COLOURS[regime],
                       hatch="//" if broken or ratio > high else None, edgecolor="black", linewidth=0.4,
                       label=None if regime in labelled else regime)
                labelled.add(regime)
                if broken:
                    ax.text(x, (low + high) / 2, "failed", rotation=90, ha="center", va="center", fontsize="x-small")
        for j, name in enumerate(methods):
            reorder = next((r.get("reorder_ratio") for r in rows if r["method"] == name and r["regime"] == "fp32"), None)
            if reorder is not None:
                ax.plot([j], [reorder], marker="x", color="black", linestyle="none",
                        label=None if "reorder" in labelled else "fp32, other data order")
                labelled.add("reorder")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylim(low, high)
        ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize="x-small")
        ax.set_ylabel("final loss / the method's fp32 run")
        ax.set_title(f"{model_name}: half precision vs fp32", fontsize="small")
        ax.legend(fontsize="x-small")
        # loss curves per regime
        for k, regime in enumerate(regimes):
            ax = axes[i][1 + k]
            for name, per_regime in raw[model_name].items():
                run = per_regime.get(regime)
                if run is None or run.get("unsupported"):
                    continue
                xs, ys = _smoothed(run["losses"])
                if xs:
                    ax.plot(xs, ys, label=name, **_style(name))
            ax.set_yscale("log")
            common.plain_log_ticks(ax)
            ax.set_xlabel("step")
            ax.set_ylabel(f"minibatch loss ({SMOOTH}-step mean, log)")
            ax.set_title(f"{model_name}: {REGIMES[regime].title}", fontsize="small")
            ax.grid(True, which="both", alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in (axes[i][k] for i in range(len(models)) for k in range(1, columns)):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize="small")
    return fig


# -- main -------------------------------------------------------------------------------------------------
def parser() -> common.BenchParser:
    p = common.make_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help=f"models (default: {' '.join(MODEL_NAMES)}; quick: {' '.join(QUICK_MODELS)})")
    p.add_argument("--methods", nargs="+", metavar="NAME", help="methods (default: all, the negative control included)")
    p.add_argument("--regimes", nargs="+", metavar="NAME",
                   help=f"regimes (default: {' '.join(REGIMES)}); fp32 always runs, as the reference")
    p.add_argument("--steps", type=common.positive_int, default=None, metavar="N",
                   help=f"training steps per run (default: {STEPS}; quick: {QUICK_STEPS})")
    p.add_argument("--batch-size", type=common.positive_int, default=BATCH, metavar="N",
                   help=f"minibatch size (default: {BATCH})")
    p.add_argument("--no-reorder", action="store_true",
                   help="skip the fp32 rerun with another minibatch order (the scale of run-to-run differences)")
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = common.parse_args(p, argv)
    table = contenders()
    names = common.select(table, args.methods, p, "--methods")
    models = common.select(MODELS, args.models or list(QUICK_MODELS if args.quick else MODEL_NAMES), p, "--models")
    regimes = common.select(REGIMES, ["fp32", *(args.regimes or REGIMES)], p, "--regimes")
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    # a method's ratio needs its reference's fp32 run
    references = [table[n].reference for n in names if table[n].reference not in names]
    names = common.select(table, [*names, *references], p, "--methods")
    unsupported = {r: regime_unsupported(REGIMES[r], args.device) for r in regimes}
    config = {
        "models": {m: MODELS[m].__doc__.splitlines()[0] for m in models},
        "data": "scikit-learn digits, standardised, 75/25 stratified split (singd_rkfac.data.load_digits)",
        "steps": steps, "batch_size": args.batch_size, "methods": names, "regimes": regimes,
        "regime_definitions": {
            "fp32": "no autocast; SINGD state fp32",
            "bf16": "torch.autocast(device, bfloat16), no scaler; SINGD dtype=bfloat16; KFAC-lowprec factors bfloat16",
            "fp16": "torch.autocast(device, float16) + torch.amp.GradScaler, scaler.step(opt); SINGD dtype=float16; "
                    "KFAC-lowprec factors float16",
            "bf16-fp32state": "SINGD only (diagnostic): torch.autocast(device, bfloat16), SINGD state fp32",
        },
        "hyperparameters": {
            "AdamW": {"lr": ADAMW_LR},
            "K-FAC family": {"lr": KFAC_LR, "clip": "default (1e-3)", "rank": LOWRANK_RANK, "fields": "defaults"},
            "SINGD": {"lr": SINGD_LR, "momentum": SINGD_MOMENTUM, "clip": "default (1e-3)", "block_size": BLOCK_SIZE,
                      "fields": "defaults"},
        },
        "evaluation": "final loss and accuracy on the whole train / test split in fp32 without autocast",
        "skipped_steps": "opt.preconditioner.skipped_steps (ours); GradScaler back-offs (AdamW, fp16 only)",
        "negative_control": LowPrecisionKFAC.__doc__.split("\n\n")[0],
        "reorder_rerun": not args.no_reorder,
        "unsupported_regimes": {r: why for r, why in unsupported.items() if why},
    }
    payload = common.new_payload(NAME, args, config)
    with common.configured(args), common.Progress(len(models) * len(names), NAME) as progress:
        for model_name in models:
            data = load_digits(device=args.device, images=model_name == "cnn", seed=args.seed)
            n = len(data.x_train)
            batches = batch_order(n, steps, args.batch_size, args.seed)
            reordered = batch_order(n, steps, args.batch_size, args.seed + 1)
            runs: dict[str, dict[str, Any]] = {}
            for name in names:
                progress.next(f"{model_name} {name}")
                contender = table[name]
                runs[name] = {}
                for regime in regimes:
                    if not contender.runs_in(REGIMES[regime]):
                        continue
                    if unsupported[regime]:
                        runs[name][regime] = {"unsupported": unsupported[regime], "losses": []}
                        continue
                    runs[name][regime] = train(contender, REGIMES[regime], model_name, data, batches, args)
                if not args.no_reorder and contender.runs_in(REGIMES["fp32"]):
                    runs[name]["fp32-reorder"] = train(contender, REGIMES["fp32"], model_name, data, reordered, args)
            payload["raw"][model_name] = runs
    payload["summary"] = summarize(payload["raw"], names, regimes, models)
    report(payload["summary"])
    common.write_results(NAME, payload, figure(payload["summary"], payload["raw"], regimes, models), args.out)
    return payload


if __name__ == "__main__":
    main()
