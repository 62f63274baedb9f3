"""Step time against kfac-pytorch and singd, row by row, and every method's step at a small width.

Section ``anchors`` (issue 19's table): for each row and update period T
(steps between decompositions / SINGD updates), four copies of one model —
plain SGD (the floor: forward + backward + the cheapest step), AdamW, the
anchor package and ours — are timed interleaved (A B C D A B C D …) in one
fresh process per configuration; a timed call is whole periods, at least
``MIN_ITERATIONS`` iterations; reported: the median seconds per iteration and
ours / anchor. Rows:

* K-FAC eigen (ours ``damping_mode="exact"``) and K-FAC inverse (ours
  ``inverse="cholesky"``, π-damping) against kfac-pytorch's
  ``KFACPreconditioner(compute_method="eigen" / "inverse")`` + SGD, on an MLP
  784-512-512-10 (batch 128) and Linear 2048→2048→10 (batch 64); both with
  damping 1e-3, factor EMA 0.95, statistics every step, KL clip 1e-3, lr 0.01,
  momentum 0.9;
* SINGD diagonal and dense against singd 0.0.5 on the MLP (the hyperparameters
  of `anchors`).

Section ``profile``: ``torch.profiler``'s self-CPU time per operator over one
period of ours on the ``kfac-inverse-2048`` row at T = 10 (the top operators).

Section ``small``: per-step time of every method with its defaults (T = 10)
beside AdamW and the floor on an MLP 40-256-256-10, batch 128, interleaved in
one process.

kfac-pytorch is not on the package index: install it into the benchmark
environment only, ``pip install --no-deps ../shared/anchors/kfac-pytorch-src.tar.gz``
(``make bench`` does); rows whose anchor is missing are skipped with a note.

    python benchmarks/speed.py [--sections anchors small] [--rows ROW ...] [--periods 1 10]
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Callable

import torch
from torch import nn

import anchors
import common
import singd_rkfac as sr

NAME = "speed"
MLP, WIDE = (784, 512, 512, common.NUM_CLASSES), (2048, 2048, common.NUM_CLASSES)
QUICK_SIZES = (64, 32, common.NUM_CLASSES)
SMALL, QUICK_SMALL = (40, 256, 256, common.NUM_CLASSES), (16, 32, 32, common.NUM_CLASSES)
PERIODS = (1, 10)
MIN_ITERATIONS = 10
REPEATS, QUICK_REPEATS = 5, 2
#: Shared K-FAC hyperparameters of ours and kfac-pytorch.
KFAC_HYPER = {"lr": 0.01, "momentum": 0.9, "damping": 1e-3, "ema": 0.95, "kl_clip": 1e-3}

#: Row label → (model sizes, batch, anchor package, its mode).
ROWS: dict[str, tuple[tuple[int, ...], int, str, str]] = {
    "kfac-eigen-mlp": (MLP, 128, "kfac-pytorch", "eigen"),
    "kfac-inverse-mlp": (MLP, 128, "kfac-pytorch", "inverse"),
    "kfac-eigen-2048": (WIDE, 64, "kfac-pytorch", "eigen"),
    "kfac-inverse-2048": (WIDE, 64, "kfac-pytorch", "inverse"),
    "singd-diagonal-mlp": (MLP, 128, "singd", "diagonal"),
    "singd-dense-mlp": (MLP, 128, "singd", "dense"),
}
SECTIONS = ("anchors", "small", "profile")
#: The row whose step `profile` breaks down (issue 19: K-FAC inverse, 2048 wide, T = 10).
PROFILED_ROW, PROFILED_PERIOD, PROFILE_TOP = "kfac-inverse-2048", 10, 12


def small_methods() -> dict[str, sr.Method | None]:
    """Every method with its defaults (``None``: the default policy); low-rank ones at rank 32."""
    return {
        "KFAC": sr.KFAC(), "KFAC-cholesky": sr.KFAC(inverse="cholesky"), "KFAC-exact": sr.KFAC(damping_mode="exact"),
        "RKFAC": sr.RKFAC(rank=32), "SREKFAC": sr.SREKFAC(rank=32), "NystromKFAC": sr.NystromKFAC(rank=32),
        "BKFAC": sr.BKFAC(rank=32), "BRKFAC": sr.BRKFAC(rank=32), "BKFACC": sr.BKFACC(rank=32),
        "SENG": sr.SENG(), "SINGD-diagonal": sr.SINGD(structure="diagonal"), "SINGD-dense": sr.SINGD(),
        "default policy": None,
    }


def parser() -> common.BenchParser:
    p = common.make_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to run (default: all)")
    p.add_argument("--rows", nargs="+", metavar="ROW", help=f"rows of the anchors section (default: all of {', '.join(ROWS)})")
    p.add_argument("--periods", type=common.positive_int, nargs="+", metavar="T",
                   help=f"update periods T (default: {' '.join(map(str, PERIODS))})")
    return p


def kfac_pytorch() -> type | None:
    """kfac-pytorch's ``KFACPreconditioner`` (its logging silenced), or ``None`` when not installed."""
    try:
        from kfac.preconditioner import KFACPreconditioner
    except ImportError:
        return None
    logging.getLogger("kfac").setLevel(logging.ERROR)
    return KFACPreconditioner


class AnchorKFAC:
    """kfac-pytorch's preconditioner + ``torch.optim.SGD`` behind the optimizer interface `common.Trainer` calls."""

    def __init__(self, model: nn.Module, mode: str, period: int, reference: type) -> None:
        h = KFAC_HYPER
        self.sgd = torch.optim.SGD(model.parameters(), lr=h["lr"], momentum=h["momentum"])
        self.preconditioner = reference(
            model, factor_update_steps=1, inv_update_steps=period, damping=h["damping"], factor_decay=h["ema"],
            kl_clip=h["kl_clip"], lr=h["lr"], compute_method=mode,
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.preconditioner.step()
        self.sgd.step()


def kfac_contenders(base: nn.Module, mode: str, period: int, reference: type) -> dict[str, tuple[nn.Module, Any]]:
    """Floor, AdamW, kfac-pytorch and ours (the same K-FAC configuration) on copies of ``base``."""
    h = KFAC_HYPER
    representation = {"damping_mode": "exact"} if mode == "eigen" else {"inverse": "cholesky"}
    method = sr.KFAC(inverse_every=period, damping=h["damping"], ema=h["ema"], **representation)
    models = {name: copy.deepcopy(base) for name in ("floor", "AdamW", "anchor", "ours")}
    return {
        "floor": (models["floor"], torch.optim.SGD(models["floor"].parameters(), lr=h["lr"])),
        "AdamW": (models["AdamW"], torch.optim.AdamW(models["AdamW"].parameters(), lr=common.ADAMW_LR)),
        "anchor": (models["anchor"], AnchorKFAC(models["anchor"], mode, period, reference)),
        "ours": (models["ours"], sr.Optimizer(models["ours"], sr.Policy(default=method), lr=h["lr"],
                                              momentum=h["momentum"], clip=h["kl_clip"])),
    }


def singd_contenders(base: nn.Module, structure: str, period: int) -> dict[str, tuple[nn.Module, Any]]:
    """Floor, AdamW, singd and ours with `anchors`' hyperparameters."""
    built = anchors.build(structure, period, base, anchors.reference_class())
    return {"floor": built[anchors.FLOOR], "AdamW": built["AdamW"], "anchor": built["singd"], "ours": built["ours"]}


def measure_row(row: str, period: int, quick: bool, args: Any) -> dict[str, Any]:
    """Interleaved seconds per iteration of the four contenders of one row at period ``period``."""
    sizes, batch, package, mode = ROWS[row]
    if quick:
        sizes, batch = QUICK_SIZES, 32
    with common.configured(args):
        base = common.mlp(sizes).to(args.device)
        if package == "kfac-pytorch":
            contenders = kfac_contenders(base, mode, period, kfac_pytorch())
        else:
            contenders = singd_contenders(base, mode, period)
        per_call = period * -(-MIN_ITERATIONS // period)
        batches = common.random_batches(per_call, sizes[0], args.device, batch_size=batch, seed=args.seed)
        trainers = {name: common.Trainer(model, opt, batches, iterations=per_call) for name, (model, opt) in contenders.items()}
        calls = {name: anchors.quiet(trainer) for name, trainer in trainers.items()}
        times = common.time_interleaved(calls, warmup=1, repeats=args.repeats, device=args.device)
        return {
            "row": row, "T": period, "model": "MLP " + "→".join(map(str, sizes)), "batch": batch, "anchor": package,
            "mode": mode, "iterations_per_call": per_call,
            "seconds_per_iteration": {name: [t / per_call for t in ts] for name, ts in times.items()},
            "finite": {name: trainer.finite() for name, trainer in trainers.items()},
        }


def measure_small(quick: bool, args: Any) -> dict[str, Any]:
    """Interleaved seconds per step of every method (defaults, T = 10), AdamW and the floor at a small width."""
    sizes = QUICK_SMALL if quick else SMALL
    per_call = 2 * common.UPDATE_EVERY
    with common.configured(args):
        base = common.mlp(sizes).to(args.device)
        batches = common.random_batches(per_call, sizes[0], args.device, seed=args.seed)
        optimizers: dict[str, Callable[[nn.Module], Any]] = {
            "floor": lambda m: torch.optim.SGD(m.parameters(), lr=common.SGD_LR),
            "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=common.ADAMW_LR),
        }
        for label, method in small_methods().items():
            policy = sr.Policy() if method is None else sr.Policy(default=method)
            optimizers[label] = lambda m, policy=policy: sr.Optimizer(m, policy, lr=common.SGD_LR, momentum=common.MOMENTUM)
        trainers = {}
        for label, make in optimizers.items():
            model = copy.deepcopy(base)
            trainers[label] = common.Trainer(model, make(model), batches, iterations=per_call)
        times = common.time_interleaved({k: anchors.quiet(t) for k, t in trainers.items()}, warmup=1, repeats=args.repeats,
                                        device=args.device)
        return {"model": "MLP " + "→".join(map(str, sizes)), "batch": common.BATCH_SIZE, "iterations_per_call": per_call,
                "seconds_per_step": {name: [t / per_call for t in ts] for name, ts in times.items()}}


def measure_profile(quick: bool, args: Any) -> dict[str, Any]:
    """Self-CPU milliseconds per iteration of ours' top operators over one period of `PROFILED_ROW`."""
    from torch.profiler import profile

    sizes, batch, _, mode = ROWS[PROFILED_ROW]
    if quick:
        sizes, batch = QUICK_SIZES, 32
    with common.configured(args):
        model = common.mlp(sizes).to(args.device)
        h = KFAC_HYPER
        method = sr.KFAC(inverse_every=PROFILED_PERIOD, damping=h["damping"], ema=h["ema"], inverse="cholesky")
        optimizer = sr.Optimizer(model, sr.Policy(default=method), lr=h["lr"], momentum=h["momentum"], clip=h["kl_clip"])
        batches = common.random_batches(PROFILED_PERIOD, sizes[0], args.device, batch_size=batch, seed=args.seed)
        trainer = common.Trainer(model, optimizer, batches, iterations=PROFILED_PERIOD)
        trainer()  # warm-up: the first period decomposes from scratch
        with profile() as recorded:
            trainer()
        events = sorted(recorded.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:PROFILE_TOP]
        return {"row": PROFILED_ROW, "T": PROFILED_PERIOD,
                "self_ms_per_iteration": {e.key: e.self_cpu_time_total / 1e3 / PROFILED_PERIOD for e in events},
                "calls_per_iteration": {e.key: e.count / PROFILED_PERIOD for e in events}}


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for entry in raw.get("anchors", []):
        med = {name: common.median(ts) for name, ts in entry["seconds_per_iteration"].items()}
        rows.append({"row": entry["row"], "T": entry["T"], "anchor": entry["anchor"], "seconds_per_iteration": med,
                     "ours_over_anchor": med["ours"] / med["anchor"], "ours_over_adamw": med["ours"] / med["AdamW"],
                     "adamw_spread": common.spread(entry["seconds_per_iteration"]["AdamW"])})
    summary: dict[str, Any] = {"rows": rows, "skipped": raw.get("skipped", [])}
    if "small" in raw:
        med = {name: common.median(ts) for name, ts in raw["small"]["seconds_per_step"].items()}
        summary["small"] = {name: {"seconds": s, "over_adamw": s / med["AdamW"]} for name, s in med.items()}
    if "profile" in raw:
        summary["profile"] = raw["profile"]
    ratios = [r["ours_over_anchor"] for r in rows]
    summary["worst_ours_over_anchor"] = max(ratios, default=None)
    return summary


def report(summary: dict[str, Any]) -> None:
    if summary["rows"]:
        common.print_table(
            ["row", "T", "floor [ms]", "AdamW [ms]", "anchor [ms]", "ours [ms]", "ours/anchor", "ours/AdamW"],
            [[r["row"], r["T"], *(common.fmt_ms(r["seconds_per_iteration"][n]) for n in ("floor", "AdamW", "anchor", "ours")),
              common.fmt_ratio(r["ours_over_anchor"]), common.fmt_ratio(r["ours_over_adamw"])] for r in summary["rows"]],
            "time per iteration against the anchors (median of interleaved repeats)",
        )
    for note in summary["skipped"]:
        print(f"skipped: {note}")
    if "small" in summary:
        common.print_table(["method", "ms/step", "× AdamW"],
                           [[name, common.fmt_ms(v["seconds"]), common.fmt_ratio(v["over_adamw"])] for name, v in summary["small"].items()],
                           "every method at a small width (defaults, T = 10)")
    if "profile" in summary:
        prof = summary["profile"]
        common.print_table(["operator", "self ms/iteration", "calls/iteration"],
                           [[op, f"{ms:.2f}", f"{prof['calls_per_iteration'][op]:g}"] for op, ms in prof["self_ms_per_iteration"].items()],
                           f"profile of ours on {prof['row']}, T = {prof['T']}")


def figure(summary: dict[str, Any]) -> Any:
    fig = common.new_figure(max(7.5, 0.7 * len(summary["rows"]) + 3), 4.5)
    if fig is None or not summary["rows"]:
        return fig
    ax = fig.add_subplot()
    rows = summary["rows"]
    ax.bar(range(len(rows)), [r["ours_over_anchor"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.8, color="tab:red", linestyle="--", linewidth=0.8, label="goal 0.8")
    ax.set_xticks(range(len(rows)), [f"{r['row']}\nT={r['T']}" for r in rows], fontsize="x-small")
    ax.set_ylabel("ours / anchor (time per iteration)")
    ax.set_title("Step time against kfac-pytorch and singd (same model, configuration, batches)")
    ax.legend()
    return fig


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = common.parse_args(p, argv)
    rows = common.select(ROWS, args.rows, p, "--rows")
    periods = sorted(set(args.periods or PERIODS))
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    versions = {"kfac-pytorch": installed("kfac-pytorch"), "singd": installed("singd")}
    config = {"rows": {r: {"sizes": ROWS[r][0], "batch": ROWS[r][1], "anchor": ROWS[r][2], "mode": ROWS[r][3]} for r in rows},
              "periods": periods, "repeats": args.repeats, "kfac_hyperparameters": KFAC_HYPER,
              "singd_hyperparameters": anchors.HYPER, "anchor_versions": versions, "sections": args.sections,
              "isolation": "one fresh process per configuration"}
    payload = common.new_payload(NAME, args, config)
    raw: dict[str, Any] = {"anchors": [], "skipped": []}
    available = {"kfac-pytorch": kfac_pytorch() is not None, "singd": versions["singd"] is not None}
    work = [(row, t) for row in rows for t in periods] if "anchors" in args.sections else []
    extra = ("small" in args.sections) + ("profile" in args.sections)
    with common.configured(args), common.Progress(len(work) + extra, NAME) as progress:
        for row, period in work:
            if not available[ROWS[row][2]]:
                raw["skipped"].append(f"{row} T={period}: {ROWS[row][2]} is not installed")
                continue
            progress.next(f"{row}, T={period}")
            raw["anchors"].append(common.in_fresh_process(measure_row, row, period, args.quick, args))
        if "small" in args.sections:
            progress.next("small width, every method")
            raw["small"] = common.in_fresh_process(measure_small, args.quick, args)
        if "profile" in args.sections:
            progress.next(f"profile of {PROFILED_ROW}")
            raw["profile"] = common.in_fresh_process(measure_profile, args.quick, args)
    payload["raw"] = raw
    payload["summary"] = summarize(raw)
    report(payload["summary"])
    common.write_results(NAME, payload, figure(payload["summary"]), args.out)
    return payload


if __name__ == "__main__":
    main()
