"""How one iteration (forward + backward + step) grows with layer width d, for every method.

Model: MLP d → d → d → 10 (ReLU), batch 128, random inputs and labels; every
method starts from the same weights and sees the same batches. Each timed call
runs ``--iters`` iterations (default 10 = one full update period of K-FAC's
inverses, of the low-rank K-FAC family's decompositions and of SINGD's K/C
updates), so times are amortised over the periods. The methods of a width are
timed interleaved (A B C … A B C …) after one warm-up call; reported: median
time per iteration, ratio to AdamW and to K-FAC, and log-log slopes in d
(``numpy.polyfit``) of the extra time over SGD and of the time ours spend in
``curvature.update`` (statistics folds and decompositions / Brand updates)
and in ``curvature.precondition`` (applying the inverse), measured inside the
same timed iterations.

``--reduced-widths`` (e.g. 4096, where dense K-FAC and SINGD take minutes per
call on a CPU) times only ``--reduced-methods`` there, with
``--reduced-repeats``; the JSON config records which.

    python benchmarks/scaling.py [--widths 256 512 1024] [--methods SGD KFAC ...]
    python benchmarks/scaling.py --widths 256 512 1024 2048 --reduced-widths 4096
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

import common

NAME = "scaling"
WIDTHS = (256, 512, 1024, 2048, 4096)
QUICK_WIDTHS = (32, 64)
BASELINES = ("AdamW", "SGD")
REPEATS, QUICK_REPEATS = 5, 2
REDUCED_REPEATS = 2
ITERATIONS = 10
QUICK_RANK = 16  # the quick widths are below the default rank: keep the sketches low-rank there
MAX_BATCHES = 64  # fresh batches (random labels cannot be memorised), up to 64 × 128 × d floats
#: Methods timed at ``--reduced-widths`` by default: K-FAC and its low-rank family.
REDUCED_METHODS = ("KFAC", *common.lowrank_methods())
#: Phases of our preconditioner timed inside the iterations (curvature method → label).
PHASES = {"update": "update", "precondition": "apply"}
#: BENCHMARKS.md targets checked in the summary.
TARGET_WIDTH = 4096


def parser() -> common.BenchParser:
    p = common.make_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--widths", type=common.positive_int, nargs="+", metavar="D",
                   help=f"layer widths (default: {' '.join(map(str, WIDTHS))}; quick: {' '.join(map(str, QUICK_WIDTHS))})")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help="methods to time (AdamW and SGD, the baselines, are always timed); default: all")
    p.add_argument("--iters", type=common.positive_int, default=ITERATIONS, metavar="N",
                   help=f"iterations per timed call (default: {ITERATIONS}, one update period)")
    p.add_argument("--reduced-widths", type=common.positive_int, nargs="+", default=(), metavar="D",
                   help="extra widths where only --reduced-methods are timed, with --reduced-repeats")
    p.add_argument("--reduced-methods", nargs="+", metavar="NAME",
                   help=f"methods of --reduced-widths besides the baselines (default: {' '.join(REDUCED_METHODS)})")
    p.add_argument("--reduced-repeats", type=common.positive_int, default=REDUCED_REPEATS, metavar="N",
                   help=f"timed repeats at --reduced-widths (default: {REDUCED_REPEATS})")
    p.add_argument("--rank", type=common.positive_int, default=None, metavar="R",
                   help=f"rank of the low-rank K-FAC family (default: {common.LOWRANK_RANK}; quick: {QUICK_RANK})")
    return p


def factories(device: torch.device, rank: int = common.LOWRANK_RANK) -> dict[str, Any]:
    """The methods: fp32 SINGD everywhere, and bf16 SINGD too on cuda."""
    dtypes = (None, torch.bfloat16) if device.type == "cuda" else (None,)
    return common.method_factories(dtypes, rank=rank)


def slope(widths: Sequence[int], extra: Sequence[float | None]) -> float | None:
    """Least-squares slope of log(extra) vs log(d) over the points with a positive extra time."""
    points = [(math.log(d), math.log(e)) for d, e in zip(widths, extra) if e is not None and e > 0]
    if len(points) < 2:
        return None
    x, y = zip(*points)
    return float(np.polyfit(x, y, 1)[0])


class PhaseTimer:
    """Seconds our optimizer spends in each layer's ``curvature.update`` / ``precondition``, per call.

    Wraps the bound methods of every managed layer's curvature (instance
    attributes; the package is untouched). Torch's optimizers have no phases.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.device = device
        self.totals = {label: 0.0 for label in PHASES.values()}
        self.active = hasattr(optimizer, "preconditioner")
        if self.active:
            for managed in optimizer.preconditioner.layers.values():
                for method, label in PHASES.items():
                    setattr(managed.curvature, method, self._timed(getattr(managed.curvature, method), label))

    def _timed(self, function: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            common.synchronize(self.device)
            start = time.perf_counter()
            result = function(*args, **kwargs)
            common.synchronize(self.device)
            self.totals[label] += time.perf_counter() - start
            return result

        return timed

    def take(self) -> dict[str, float]:
        """The totals since the last call (then reset)."""
        totals, self.totals = self.totals, {label: 0.0 for label in PHASES.values()}
        return totals


class PhasedTrainer:
    """A `common.Trainer` that also records the phase totals of every call."""

    def __init__(self, trainer: common.Trainer, device: torch.device) -> None:
        self.trainer = trainer
        self.timer = PhaseTimer(trainer.optimizer, device)
        self.calls: list[dict[str, float]] = []

    def __call__(self) -> None:
        self.timer.take()
        self.trainer()
        self.calls.append(self.timer.take())


def time_width(d: int, names: list[str], builders: dict[str, Any], args: argparse.Namespace, repeats: int) -> dict[str, Any]:
    """Per-iteration seconds of every method at width ``d`` (every repeat) and whether training stayed finite."""
    torch.manual_seed(args.seed)
    base = common.mlp([d, d, d, common.NUM_CLASSES]).to(args.device)
    count = min((1 + repeats) * args.iters, MAX_BATCHES)  # every iteration of a method gets a new batch
    batches = common.random_batches(count, d, args.device, seed=args.seed)
    trainers = {}
    for name in names:
        model = copy.deepcopy(base)
        trainers[name] = PhasedTrainer(common.Trainer(model, builders[name](model), batches, iterations=args.iters), args.device)
    times = common.time_interleaved(trainers, warmup=1, repeats=repeats, device=args.device)
    phases = {
        name: {label: [call[label] / args.iters for call in trainer.calls[-repeats:]] for label in PHASES.values()}
        for name, trainer in trainers.items() if trainer.timer.active
    }
    return {
        "methods": names,
        "repeats": repeats,
        "seconds_per_iteration": {name: [t / args.iters for t in ts] for name, ts in times.items()},
        "phase_seconds_per_iteration": phases,
        "finite": {name: trainer.trainer.finite() for name, trainer in trainers.items()},
        "final_loss": {name: trainer.trainer.last_loss() for name, trainer in trainers.items()},
    }


def _ratios(values: Sequence[float | None], base: Sequence[float | None]) -> list[float | None]:
    return [None if v is None or b is None else v / b for v, b in zip(values, base)]


def summarize(widths: list[int], names: list[str], raw: dict[str, Any]) -> dict[str, Any]:
    def medians(name: str, key: str, label: str | None = None) -> list[float | None]:
        out: list[float | None] = []
        for d in widths:
            entry = raw[str(d)][key].get(name)
            if entry is not None and label is not None:
                entry = entry[label]
            out.append(None if entry is None else common.median(entry))
        return out

    times = {name: medians(name, "seconds_per_iteration") for name in names}
    summary: dict[str, Any] = {"widths": widths, "methods": {}}
    summary["adamw_spread"] = [common.spread(raw[str(d)]["seconds_per_iteration"]["AdamW"]) for d in widths]
    for name in names:
        extra = [None if m is None else m - s for m, s in zip(times[name], times["SGD"])]
        row: dict[str, Any] = {
            "seconds_per_iteration": times[name],
            "ratio_to_adamw": _ratios(times[name], times["AdamW"]),
            "ratio_to_kfac": _ratios(times[name], times["KFAC"]) if "KFAC" in times else None,
            "extra_over_sgd": extra,
            "slope_extra_vs_d": None if name in BASELINES else slope(widths, extra),
            "finite": all(raw[str(d)]["finite"].get(name, True) for d in widths),
            "widths_timed": [d for d, t in zip(widths, times[name]) if t is not None],
        }
        if any(name in raw[str(d)]["phase_seconds_per_iteration"] for d in widths):
            for label in PHASES.values():
                values = medians(name, "phase_seconds_per_iteration", label)
                row[f"{label}_seconds_per_iteration"] = values
                row[f"slope_{label}_vs_d"] = slope(widths, values)
        summary["methods"][name] = row
    summary["targets"] = targets(summary)
    return summary


def _at(row: dict[str, Any], key: str, widths: list[int], d: int) -> float | None:
    values = row.get(key)
    return None if values is None or d not in widths else values[widths.index(d)]


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """The BENCHMARKS.md targets of the low-rank K-FAC family, at the widest width timed (4096 when there)."""
    widths, methods = summary["widths"], summary["methods"]
    out: dict[str, Any] = {}

    def widest(name: str) -> int | None:
        timed = methods[name]["widths_timed"]
        return max(timed) if timed else None

    if "BKFAC" in methods:
        row, d = methods["BKFAC"], widest("BKFAC")
        ratio = _at(row, "ratio_to_adamw", widths, d)
        out["BKFAC"] = {
            "update_slope": row.get("slope_update_vs_d"), "update_slope_target": 1.2,
            "extra_slope": row["slope_extra_vs_d"],
            "width": d, "ratio_to_adamw": ratio, "ratio_to_adamw_target": 2.0,
            "met": _met(row.get("slope_update_vs_d"), 1.2, ratio, 2.0) if d == TARGET_WIDTH else None,
        }
    for name in ("RKFAC", "SREKFAC"):
        if name not in methods or "KFAC" not in methods:
            continue
        row, d = methods[name], widest(name)
        ratio = _at(row, "ratio_to_kfac", widths, d)
        speedup = None if not ratio else 1.0 / ratio
        out[name] = {
            "extra_slope": row["slope_extra_vs_d"], "update_slope": row.get("slope_update_vs_d"), "slope_target": 2.2,
            "width": d, "speedup_vs_kfac": speedup, "speedup_target": 2.5,
            "met": (_met(row["slope_extra_vs_d"], 2.2) and speedup is not None and speedup >= 2.5)
            if d == TARGET_WIDTH else None,
        }
    return out


def _met(slope_value: float | None, slope_target: float, ratio: float | None = None, ratio_target: float | None = None) -> bool:
    ok = slope_value is not None and slope_value <= slope_target
    if ratio_target is not None:
        ok = ok and ratio is not None and ratio <= ratio_target
    return ok


def _points(widths: Sequence[int], values: Sequence[float | None]) -> tuple[list[int], list[float]]:
    pairs = [(d, v * 1e3) for d, v in zip(widths, values) if v is not None and v > 0]
    return [d for d, _ in pairs], [v for _, v in pairs]


def figure(summary: dict[str, Any]) -> Any:
    fig = common.new_figure(13.5, 5.5)
    if fig is None:
        return None
    left, right = fig.subplots(1, 2)
    widths = summary["widths"]
    for name, row in summary["methods"].items():
        left.plot(*_points(widths, row["seconds_per_iteration"]), label=name, **common.method_style(name))
        if "update_seconds_per_iteration" in row and (name == "KFAC" or name in common.lowrank_methods()):
            s = row["slope_update_vs_d"]
            right.plot(*_points(widths, row["update_seconds_per_iteration"]),
                       label=f"{name} (slope {s:.2f})" if s is not None else name, **common.method_style(name))
    # reference slopes through the smallest B-KFAC / K-FAC point
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        common.plain_log_ticks(ax)
        ax.set_xticks(widths, [str(d) for d in widths])
        ax.set_xlabel("layer width d (MLP d→d→d→10, batch 128)")
        ax.grid(True, which="both", alpha=0.3)
    low, high = right.get_ylim() if right.lines else (1.0, 10.0)
    if right.lines:
        anchor = min(min(line.get_ydata()) for line in right.lines)
        for power, style in ((1, ":"), (2, "--"), (3, "-.")):
            right.plot(widths, [anchor * (d / widths[0]) ** power for d in widths], color="lightgrey",
                       linestyle=style, label=f"∝ d^{power}")
        right.set_ylim(low / 2, high * 2)
    left.set_ylabel("time per iteration [ms] (median, amortised)")
    left.set_title("Iteration time vs width")
    left.legend(fontsize="x-small", ncol=2)
    right.set_ylabel("time in curvature.update per iteration [ms]")
    right.set_title("K-FAC family: statistics folds + decompositions / Brand updates")
    right.legend(fontsize="x-small", ncol=2)
    return fig


def report(summary: dict[str, Any]) -> None:
    widths = summary["widths"]
    headers = ["method", *[f"d={d} [ms]" for d in widths], *[f"×AdamW d={d}" for d in widths],
               "slope extra", "slope update", "slope apply"]
    rows = []
    for name, row in summary["methods"].items():
        rows.append([
            name + ("" if row["finite"] else " (non-finite!)"),
            *map(common.fmt_ms, row["seconds_per_iteration"]),
            *map(common.fmt_ratio, row["ratio_to_adamw"]),
            *(common.fmt_ratio(row.get(key)) for key in ("slope_extra_vs_d", "slope_update_vs_d", "slope_apply_vs_d")),
        ])
    common.print_table(headers, rows, "time per iteration (median), ratio to AdamW, log-log slopes of the extra time "
                       "over SGD and of ours' update / apply phases")
    for name, target in summary["targets"].items():
        parts = [f"{key}={common.fmt_ratio(value) if isinstance(value, float) else value}" for key, value in target.items()]
        print(f"target {name}: " + ", ".join(parts))
    noisy = [str(d) for d, s in zip(widths, summary["adamw_spread"]) if s > common.NOISY_SPREAD]
    if noisy:
        print(f"warning: AdamW's repeats vary > {common.NOISY_SPREAD}× at d = {', '.join(noisy)}: "
              "the machine was busy; rerun these widths (--widths)")


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = common.parse_args(p, argv)
    rank = args.rank or (QUICK_RANK if args.quick else common.LOWRANK_RANK)
    builders = factories(args.device, rank)
    chosen = common.select(builders, args.methods, p, "--methods")
    names = [n for n in builders if n in BASELINES or n in chosen]
    reduced_chosen = common.select(builders, args.reduced_methods or [m for m in REDUCED_METHODS if m in builders],
                                   p, "--reduced-methods")
    reduced_names = [n for n in builders if n in BASELINES or n in reduced_chosen]
    full_widths = sorted(set(args.widths or (QUICK_WIDTHS if args.quick else WIDTHS)))
    reduced_widths = sorted(set(args.reduced_widths) - set(full_widths))
    widths = sorted([*full_widths, *reduced_widths])
    all_names = [n for n in builders if n in names or (reduced_widths and n in reduced_names)]
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    config = {
        "model": "MLP d→d→d→10, ReLU", "batch_size": common.BATCH_SIZE, "widths": widths, "methods": all_names,
        "iterations_per_call": args.iters, "warmup_calls": 1, "repeats": args.repeats,
        "reduced_widths": {str(d): {"methods": reduced_names, "repeats": args.reduced_repeats} for d in reduced_widths},
        "update_every": common.UPDATE_EVERY, "lr": common.SGD_LR, "momentum": common.MOMENTUM,
        "adamw_lr": common.ADAMW_LR, "clip": {"SINGD": None, "KFAC family": common.KFAC_CLIP},
        "lowrank": {"rank": rank, "oversample": 10, "power_iters": 2, "complement": "min", "stats_every": 1,
                    "inverse_every": common.UPDATE_EVERY, "refresh_every (BRKFAC)": common.UPDATE_EVERY,
                    "correct_every (BKFACC)": common.UPDATE_EVERY},
        "phases": "seconds inside curvature.update (statistics folds, decompositions, Brand updates) and "
                  "curvature.precondition (inverse applied), summed over layers, per iteration",
        "batches": "fresh random batches, the same sequence for every method",
    }

    def measure(d: int) -> dict[str, Any]:
        if d in reduced_widths:
            return time_width(d, reduced_names, builders, args, args.reduced_repeats)
        return time_width(d, names, builders, args, args.repeats)

    return common.run_over_widths(
        NAME, args, config, widths, measure, summarize, report, figure, doing=f"timing up to {len(all_names)} methods",
    )


if __name__ == "__main__":
    main()
