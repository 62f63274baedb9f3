"""How accurate are the low-rank damped inverses on real factors, and how fast do the factor spectra decay?

A digits MLP 64 → h → h → 10 (ReLU, scikit-learn's 8×8 digits, batch 128)
trains with plain K-FAC (``sr.KFAC``, lr 0.1, its default clip, damping 1e-3,
EA ρ = 0.95, inverses every 10 steps) and the exponentially averaged factors A
and G of every layer are captured at the end, together with every row the
optimizer folded into them and the last raw gradient.

Error (width ``--width``): for each factor F, rank r below its dimension and
representation, the relative error of the damped inverse application
``‖(F̃+λI)⁻¹X − (F+λI)⁻¹X‖ / ‖(F+λI)⁻¹X‖`` against the exact fp64 ``eigh``
oracle, with λ the π-damped factor damping the optimizer uses (λ_A = π√λ,
λ_G = √λ/π), X a Gaussian matrix (64 columns) or the layer's gradient, and
the complement eigenvalue ``"min"`` or ``"zero"``. Representations: exact top-r
eigenpairs of the oracle (the best any rank-r method can do), the randomized
sketches ``rsvd`` (R-KFAC), ``sre`` (SRE-KFAC) and ``nystrom`` with 0 and 2
power iterations (oversampling 10, median over ``--seeds`` test matrices),
and Brand's online update (B-KFAC): the rows the optimizer folded, replayed
step by step through ``sr.linalg.brand_update`` with truncation to r after
every step, exactly as ``BrandFactor`` does, compared with the dense EA of the
same rows (its equality with the optimizer's factor is checked and recorded);
also with B-R-KFAC's periodic SRE refresh and B-KFAC-c's periodic partial
correction from the dense EA (every 10 folds).

Training runs on ``--device``; the error study and the spectra are fp64
linear algebra on the CPU. Spectra (widths ``--spectrum-widths``, same
steps, seed and batch order):
normalised eigenvalues s_i/s_1 of every factor and the number of them above
1e-2 and 1e-3 — the seed claim is fast, width-independent decay.

    python benchmarks/lowrank.py [--width 512] [--spectrum-widths 128 256 512 1024] [--steps 100]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import Tensor, nn

import common
import singd_rkfac as sr
from singd_rkfac.data import batch_order, load_digits
from singd_rkfac.linalg import brand_update, corrected, damped_inverse_apply, sketch_eigen, top, with_complement

NAME = "lowrank"
WIDTH, QUICK_WIDTH = 512, 48
SPECTRUM_WIDTHS, QUICK_SPECTRUM_WIDTHS = (128, 256, 512, 1024), (32, 48)
STEPS, QUICK_STEPS = 100, 12
RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUICK_RANKS = (1, 4, 16)
SEEDS, QUICK_SEEDS = 3, 1
BATCH, QUICK_BATCH = 128, 16  # quick: small enough for Brand (rank + rows < dim) at the quick width
LR = 0.1
DAMPING = 1e-3
OVERSAMPLE = 10
POWER_ITERS = (0, 2)
SKETCHES = ("rsvd", "sre", "nystrom")
COMPLEMENTS = ("min", "zero")
RANDOM_COLUMNS = 64
THRESHOLDS = (1e-2, 1e-3)
ERROR_LEVELS = (0.1, 0.01)
SIDES = {"a": "A", "g": "G"}
#: B-R-KFAC's refresh and B-KFAC-c's correction period (folds), and B-KFAC-c's corrected share of columns.
PERIOD = 10
CORRECT_FRACTION = 0.2


def parser() -> common.BenchParser:
    p = common.make_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--width", type=common.positive_int, default=None, metavar="H",
                   help=f"hidden width of the error study (default: {WIDTH}; quick: {QUICK_WIDTH})")
    p.add_argument("--spectrum-widths", type=common.positive_int, nargs="+", metavar="H",
                   help=f"hidden widths of the spectra (default: {' '.join(map(str, SPECTRUM_WIDTHS))})")
    p.add_argument("--steps", type=common.positive_int, default=None, metavar="N",
                   help=f"K-FAC training steps before the factors are captured (default: {STEPS}; quick: {QUICK_STEPS})")
    p.add_argument("--ranks", type=common.positive_int, nargs="+", metavar="R",
                   help=f"ranks (those below a factor's dimension are used; default: {' '.join(map(str, RANKS))})")
    p.add_argument("--batch", type=common.positive_int, default=None, metavar="N",
                   help=f"minibatch size = rows per statistics step (default: {BATCH}; quick: {QUICK_BATCH})")
    p.add_argument("--seeds", type=common.positive_int, default=None, metavar="N",
                   help=f"sketch test matrices per point, median reported (default: {SEEDS}; quick: {QUICK_SEEDS})")
    return p


# -- training and capture ---------------------------------------------------------------------------
def digits_mlp(width: int) -> nn.Sequential:
    """MLP 64 → width → width → 10 with ReLU; layers ``fc1``, ``fc2``, ``head``."""
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(64, width), act1=nn.ReLU(), fc2=nn.Linear(width, width), act2=nn.ReLU(),
        head=nn.Linear(width, 10),
    ))


def _record_folds(factor: Any, log: list[tuple[Tensor, float, float]]) -> None:
    """Wrap one dense factor's ``accumulate``/``fold`` (instance attributes) to log the rows it folds."""
    staged: list[Tensor] = []
    accumulate, fold = factor.accumulate, factor.fold

    def logged_accumulate(rows: Tensor) -> None:
        staged.append(rows.detach().to("cpu", copy=True))
        accumulate(rows)

    def logged_fold(scale: float, ema: float, *args: Any, **kwargs: Any) -> None:
        if staged:
            log.append((torch.cat(staged), float(scale), float(ema)))
            staged.clear()
        fold(scale, ema, *args, **kwargs)

    factor.accumulate, factor.fold = logged_accumulate, logged_fold


def train_and_capture(width: int, steps: int, args: argparse.Namespace, *, record_rows: bool) -> dict[str, Any]:
    """Train the digits MLP with K-FAC; the EA factors, their π-dampings, the last gradient and (optionally) the folded rows."""
    data = load_digits(device=args.device, seed=args.seed)
    torch.manual_seed(args.seed)
    model = digits_mlp(width).to(args.device)
    opt = sr.Optimizer(model, sr.Policy(default=sr.KFAC(damping=DAMPING)), lr=LR, momentum=0.9)
    layers = opt.preconditioner.layers
    logs: dict[tuple[str, str], list] = {}
    if record_rows:
        for name, managed in layers.items():
            for side in SIDES:
                logs[name, side] = []
                _record_folds(managed.curvature.factors[side], logs[name, side])
    losses = []
    gradients: dict[str, Tensor] = {}
    start = time.perf_counter()
    batches = batch_order(len(data.y_train), steps, args.batch, args.seed)
    for index, batch in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
        loss.backward()
        if index == len(batches) - 1:  # the raw gradients (the step overwrites .grad with directions)
            gradients = {name: m.layer.grad_matrix().detach().to("cpu", copy=True) for name, m in layers.items()}
        opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    factors: dict[str, dict[str, Any]] = {}
    for name, managed in layers.items():
        curvature = managed.curvature
        values = {side: curvature.factors[side].value.detach().to("cpu", copy=True) for side in SIDES}
        # π-damping as the optimizer applies it (DESIGN §3.1)
        mean = {side: float(values[side].diagonal().mean()) for side in SIDES}
        pi = math.sqrt(mean["a"] / mean["g"])
        root = math.sqrt(DAMPING)
        damping = {"a": pi * root, "g": root / pi}
        for side in SIDES:
            factors[f"{name}.{SIDES[side]}"] = {
                "value": values[side], "damping": damping[side], "side": side,
                # X as the left operand of (F + λI)⁻¹: the gradient (d_g × d_a) for G, its transpose for A
                "gradient": gradients[name] if side == "g" else gradients[name].T,
                "folds": logs.get((name, side)),
            }
    return {
        "factors": factors,
        "train_loss_first_last": [losses[0], losses[-1]],
        "train_loss_last10_mean": statistics.fmean(losses[-10:]),
        "test_accuracy": accuracy,
        "seconds": seconds,
        "epochs": steps * args.batch / len(data.y_train),
    }


# -- spectra ----------------------------------------------------------------------------------------
def spectrum(matrix: Tensor) -> Tensor:
    """Eigenvalues of a PSD factor, descending, in fp64 (negatives from rounding clipped to 0)."""
    return torch.linalg.eigvalsh(matrix.double()).flip(0).clamp_min(0.0)


def spectrum_record(matrix: Tensor) -> dict[str, Any]:
    values = spectrum(matrix)
    top_value = float(values[0])
    normalised = values / top_value if top_value > 0 else values
    record: dict[str, Any] = {
        "dim": matrix.shape[0],
        "s1": top_value,
        "trace": float(values.sum()),
        # participation ratio (Σs)² / Σs²: an effective number of modes
        "effective_rank": float(values.sum() ** 2 / values.square().sum()) if top_value > 0 else 0.0,
        "normalised": [float(f"{v:.3g}") for v in normalised.tolist()],
    }
    for threshold in THRESHOLDS:
        record[f"count_above_{threshold:g}"] = int((normalised > threshold).sum())
    return record


# -- error of the damped inverse -----------------------------------------------------------------
def relative_error(approx: Tensor, exact: Tensor) -> float:
    return float(torch.linalg.norm(approx.double() - exact) / torch.linalg.norm(exact))


def brand_replay(
    folds: Sequence[tuple[Tensor, float, float]], dim: int, rank: int, periodic: str | None = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Brand's truncated EA of the logged rows: the update ``BrandFactor.fold`` performs, step by step.

    ``periodic="refresh"`` (B-R-KFAC) replaces the Brand state by an SRE sketch
    of the dense EA every `PERIOD` folds; ``"correct"`` (B-KFAC-c)
    re-diagonalises a `CORRECT_FRACTION` of the kept columns against it.
    Both run after the fold of the step, as the optimizer's ``decompose`` does.
    """
    values = torch.zeros(0, dtype=torch.float32)
    vectors = torch.zeros(dim, 0, dtype=torch.float32)
    dense = torch.zeros(dim, dim, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    initialized = False
    chunk = dim - rank
    for index, (rows, scale, ema) in enumerate(folds):
        weight = ema if initialized else 0.0
        columns = rows.T.float() * math.sqrt((1.0 - weight) * scale)
        decay = weight
        for start in range(0, columns.shape[1], chunk):
            values, vectors = top(*brand_update(values, vectors, columns[:, start : start + chunk], decay), rank)
            decay = 1.0
        initialized = True
        if periodic is None:
            continue
        dense = torch.lerp(scale * rows.T.float() @ rows.float(), dense, weight)
        if index % PERIOD == 0:
            if periodic == "refresh":
                values, vectors = sketch_eigen(dense, "sre", rank, OVERSAMPLE, 2, generator)
            else:
                values, vectors = corrected(values, vectors, dense, CORRECT_FRACTION, generator)
    return values, vectors


def dense_replay(folds: Sequence[tuple[Tensor, float, float]], dim: int) -> Tensor:
    """The dense EA of the logged rows in fp64 (the optimizer's factor, recomputed)."""
    value = torch.zeros(dim, dim, dtype=torch.float64)
    for index, (rows, scale, ema) in enumerate(folds):
        rows = rows.double()
        batch = scale * rows.T @ rows
        value = batch if index == 0 else ema * value + (1.0 - ema) * batch
    return value


def factor_errors(factor: dict[str, Any], ranks: Sequence[int], seeds: int, seed: int) -> dict[str, Any]:
    """Relative errors of every representation, complement, X and rank for one factor."""
    matrix = factor["value"].float()
    dim = matrix.shape[0]
    damping = factor["damping"]
    values64, vectors64 = torch.linalg.eigh(matrix.double())
    values64 = values64.clamp_min(0.0)
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "random": torch.randn(dim, RANDOM_COLUMNS, generator=generator, dtype=torch.float64),
        "gradient": factor["gradient"].double(),
    }
    exact = {key: vectors64 @ ((vectors64.T @ x) / (values64 + damping).unsqueeze(1)) for key, x in inputs.items()}
    used = [r for r in ranks if r < dim]
    folds = factor["folds"]
    rows = max((f[0].shape[0] for f in folds), default=0) if folds else 0
    errors: dict[str, Any] = {}  # representation → complement → X → [error per rank]

    def add(label: str, eigen_pairs: list[tuple[Tensor, Tensor]] | None) -> None:
        """Record the errors of ``eigen_pairs`` (one per seed; ``None`` = not applicable) at the next rank."""
        for complement in COMPLEMENTS:
            for key, x in inputs.items():
                slot = errors.setdefault(label, {}).setdefault(complement, {}).setdefault(key, [])
                if eigen_pairs is None:
                    slot.append(None)
                    continue
                samples = []
                for values, vectors in eigen_pairs:
                    eigen = with_complement(values.double(), vectors.double(), complement)
                    samples.append(relative_error(damped_inverse_apply(x, eigen, damping, "left"), exact[key]))
                slot.append(statistics.median(samples))

    for rank in used:
        add("eigh-top-r", [top(values64, vectors64, rank)])
        for kind in SKETCHES:
            for q in POWER_ITERS:
                generator = torch.Generator().manual_seed(seed + 1000 * rank + q)
                pairs = [sketch_eigen(matrix, kind, rank, OVERSAMPLE, q, generator) for _ in range(seeds)]
                add(f"{kind}-q{q}", pairs)
        # Brand is valid only while rank + rows < dim (the optimizer falls back to dense otherwise)
        valid = folds is not None and rank + rows < dim
        for label, periodic in (("brand", None), ("brand-refresh", "refresh"), ("brand-correct", "correct")):
            add(label, [brand_replay(folds, dim, rank, periodic, seed + rank)] if valid else None)
    record: dict[str, Any] = {"dim": dim, "damping": damping, "ranks": used, "errors": errors,
                              "lambda_over_s1": damping / float(values64[-1]) if float(values64[-1]) > 0 else None}
    if folds:
        replayed = dense_replay(folds, dim)
        record["replay_rel_diff"] = float(torch.linalg.norm(replayed - matrix.double()) / torch.linalg.norm(replayed))
        record["rows_per_fold"] = rows
        record["folds"] = len(folds)
    return record


def first_rank_below(ranks: Sequence[int], errors: Sequence[float | None], level: float) -> int | None:
    """The smallest rank whose error is at most ``level`` (``None`` if none)."""
    return next((r for r, e in zip(ranks, errors) if e is not None and e <= level), None)


# -- summary, report, figure ----------------------------------------------------------------------------
def summarize(raw: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    spectra = raw["spectra"]
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for width, run in spectra.items():
        for factor, record in run["factors"].items():
            counts.setdefault(factor, {})[width] = {
                "dim": record["dim"], **{f"above_{t:g}": record[f"count_above_{t:g}"] for t in THRESHOLDS},
                "effective_rank": round(record["effective_rank"], 2),
            }
    reach: dict[str, Any] = {}
    at_64: dict[str, Any] = {}
    for factor, record in raw["errors"].items():
        ranks = record["ranks"]
        for label, by_complement in record["errors"].items():
            for complement, by_x in by_complement.items():
                key = f"{label}/{complement}"
                for x, values in by_x.items():
                    for level in ERROR_LEVELS:
                        reach.setdefault(f"gradient_error_le_{level:g}" if x == "gradient" else f"random_error_le_{level:g}", {}) \
                            .setdefault(factor, {})[key] = first_rank_below(ranks, values, level)
                    if 64 in ranks:
                        at_64.setdefault(x, {}).setdefault(factor, {})[key] = values[ranks.index(64)]
    return {
        "spectrum_counts": counts,
        "smallest_rank_reaching": reach,
        "error_at_rank_64": at_64,
        "training": {w: {k: run[k] for k in ("train_loss_last10_mean", "test_accuracy", "epochs")} for w, run in spectra.items()},
        "replay_rel_diff": {f: r.get("replay_rel_diff") for f, r in raw["errors"].items()},
    }


def report(summary: dict[str, Any], config: dict[str, Any]) -> None:
    counts = summary["spectrum_counts"]
    widths = [str(w) for w in config["spectrum_widths"]]
    headers = ["factor", *[f"h={w} (d)" for w in widths], *[f"#>1e-2 h={w}" for w in widths], *[f"#>1e-3 h={w}" for w in widths]]
    rows = []
    for factor, by_width in counts.items():
        rows.append([
            factor,
            *[by_width[w]["dim"] for w in widths],
            *[by_width[w]["above_0.01"] for w in widths],
            *[by_width[w]["above_0.001"] for w in widths],
        ])
    common.print_table(headers, rows, "eigenvalues above 1e-2·s1 and 1e-3·s1 per factor and hidden width")
    reach = summary["smallest_rank_reaching"].get("gradient_error_le_0.1", {})
    labels = sorted({key for by_key in reach.values() for key in by_key})
    headers = ["representation", *reach]
    rows = [[label, *["-" if reach[f].get(label) is None else reach[f][label] for f in reach]] for label in labels]
    common.print_table(headers, rows, f"smallest rank with relative error ≤ 0.1 on the gradient (h={config['width']})")


#: Plot styles of the representations in the error panel.
_STYLES = {
    "eigh-top-r": {"color": "black", "marker": "o"},
    "rsvd-q0": {"color": "tab:blue", "marker": "v", "alpha": 0.5},
    "rsvd-q2": {"color": "tab:blue", "marker": "v"},
    "sre-q0": {"color": "tab:green", "marker": "^", "alpha": 0.5},
    "sre-q2": {"color": "tab:green", "marker": "^"},
    "nystrom-q0": {"color": "tab:purple", "marker": "s", "alpha": 0.5},
    "nystrom-q2": {"color": "tab:purple", "marker": "s"},
    "brand": {"color": "tab:red", "marker": "D"},
    "brand-refresh": {"color": "darkorange", "marker": "P"},
    "brand-correct": {"color": "olivedrab", "marker": "X"},
}


def figure(raw: dict[str, Any], config: dict[str, Any], focus: str) -> Any:
    fig = common.new_figure(13.0, 5.2)
    if fig is None:
        return None
    left, right = fig.subplots(1, 2)
    record = raw["errors"][focus]
    ranks = record["ranks"]
    for label, by_complement in record["errors"].items():
        for complement, linestyle in (("min", "-"), ("zero", "--")):
            values = by_complement[complement]["gradient"]
            points = [(r, e) for r, e in zip(ranks, values) if e is not None and e > 0]
            if points:
                style = dict(_STYLES.get(label, {}))
                left.plot(*zip(*points), linestyle=linestyle, markersize=4,
                          label=f"{label}" if complement == "min" else None, **style)
    left.plot([], [], color="grey", linestyle="-", label='complement "min"')
    left.plot([], [], color="grey", linestyle="--", label='complement "zero"')
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xticks(ranks, [str(r) for r in ranks])
    left.set_xlabel("rank r")
    left.set_ylabel("‖(F̃+λI)⁻¹X − (F+λI)⁻¹X‖ / ‖(F+λI)⁻¹X‖")
    left.set_title(f"Damped-inverse error, {focus} (d={record['dim']}, h={config['width']}), X = gradient", fontsize="medium")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize="x-small", ncol=2)

    widths = list(raw["spectra"])
    colours = dict(zip(widths, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")))
    styles = {"A": "-", "G": "--"}
    for width, run in raw["spectra"].items():
        for factor, spec in run["factors"].items():
            if spec["dim"] < 32:
                continue
            values = [v for v in spec["normalised"] if v > 0]
            right.plot(range(1, len(values) + 1), values, color=colours.get(width, "grey"),
                       linestyle=styles[factor[-1]], linewidth=1.0, alpha=0.8)
    for width in widths:
        right.plot([], [], color=colours.get(width, "grey"), label=f"h = {width}")
    right.plot([], [], color="grey", linestyle="-", label="A factors")
    right.plot([], [], color="grey", linestyle="--", label="G factors")
    for threshold in THRESHOLDS:
        right.axhline(threshold, color="grey", linewidth=0.7, linestyle=":")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_ylim(1e-7, 2)
    right.set_xlabel("index i")
    right.set_ylabel("s_i / s_1")
    right.set_title("Normalised spectra of every factor (dim ≥ 32) after K-FAC training", fontsize="medium")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize="x-small")
    fig.suptitle(f"Digits MLP 64→h→h→10, {config['steps']} K-FAC steps, batch {config['batch_size']}")
    return fig


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = common.parse_args(p, argv)
    width = args.width or (QUICK_WIDTH if args.quick else WIDTH)
    spectrum_widths = sorted(set(args.spectrum_widths or (QUICK_SPECTRUM_WIDTHS if args.quick else SPECTRUM_WIDTHS)) | {width})
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    ranks = sorted(set(args.ranks or (QUICK_RANKS if args.quick else RANKS)))
    seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    args.batch = args.batch or (QUICK_BATCH if args.quick else BATCH)
    config = {
        "model": "digits MLP 64→h→h→10, ReLU", "data": "scikit-learn digits, standardised, 75 % train split",
        "width": width, "spectrum_widths": spectrum_widths, "steps": steps, "batch_size": args.batch,
        "optimizer": f"sr.Optimizer(sr.Policy(default=sr.KFAC(damping={DAMPING})), lr={LR}, momentum=0.9), default clip",
        "damping": DAMPING, "damping_of_a_factor": "π-damping: λ_A = π√λ, λ_G = √λ/π (as the optimizer)",
        "ranks": ranks, "seeds": seeds, "oversample": OVERSAMPLE, "power_iters": list(POWER_ITERS),
        "sketches": list(SKETCHES), "complements": list(COMPLEMENTS),
        "inputs": {"random": f"Gaussian d × {RANDOM_COLUMNS}", "gradient": "the layer's last raw gradient [W b] (d_g × d_a; transposed for A)"},
        "oracle": "fp64 eigh of the fp32 EA factor", "sketch_dtype": "fp32 (as the optimizer)",
        "brand": "rows folded by the optimizer replayed through brand_update (fp32), truncated to r after every step",
        "brand-refresh": f"brand + SRE sketch (q=2, p={OVERSAMPLE}) of the dense EA every {PERIOD} folds (B-R-KFAC)",
        "brand-correct": f"brand + correction of {CORRECT_FRACTION:g} of the columns against the dense EA every {PERIOD} folds (B-KFAC-c)",
        "thresholds": list(THRESHOLDS),
    }
    payload = common.new_payload(NAME, args, config)
    errors: dict[str, Any] = {}
    with common.configured(args), common.Progress(len(spectrum_widths), NAME) as progress:
        for h in spectrum_widths:
            progress.next(f"h={h}: training {steps} K-FAC steps")
            run = train_and_capture(h, steps, args, record_rows=h == width)
            payload["raw"].setdefault("spectra", {})[str(h)] = {
                "train_loss_first_last": run["train_loss_first_last"], "train_loss_last10_mean": run["train_loss_last10_mean"],
                "test_accuracy": run["test_accuracy"],
                "epochs": run["epochs"], "train_seconds": run["seconds"],
                "factors": {name: spectrum_record(f["value"]) for name, f in run["factors"].items()},
            }
            if h == width:
                factors = {name: f for name, f in run["factors"].items() if f["value"].shape[0] >= 2}
                progress.extend(len(factors))
                for name, factor in factors.items():
                    progress.next(f"h={h}: errors of {name} (d={factor['value'].shape[0]})")
                    errors[name] = factor_errors(factor, ranks, seeds, args.seed)
    payload["raw"]["errors"] = errors
    payload["summary"] = summarize(payload["raw"], config)
    focus = max(errors, key=lambda f: (errors[f]["dim"], f.endswith("A")))
    payload["summary"]["figure_error_factor"] = focus
    report(payload["summary"], config)
    common.write_results(NAME, payload, figure(payload["raw"], config, focus), args.out)
    return payload


if __name__ == "__main__":
    main()
