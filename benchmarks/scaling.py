"""How one iteration (forward + backward + step) grows with layer width d, for every method.

Model: MLP d → d → d → 10 (ReLU), batch 128, random inputs and labels; every
method starts from the same weights and sees the same batches. Each timed call
runs ``--iters`` iterations (default 10 = one full update period of K-FAC's
inverses and SINGD's K/C updates), so times are amortised over the periods.
The methods of a width are timed interleaved (A B C … A B C …) after one
warm-up call; reported: median time per iteration, ratio to AdamW, and the
log-log slope in d of the extra time over SGD (``numpy.polyfit``).

    python benchmarks/scaling.py [--widths 256 512 1024] [--methods SGD KFAC ...]
"""

from __future__ import annotations

import argparse
import copy
import math
from typing import Any, Sequence

import numpy as np
import torch

import common

NAME = "scaling"
WIDTHS = (256, 512, 1024, 2048, 4096)
QUICK_WIDTHS = (32, 64)
BASELINES = ("AdamW", "SGD")
REPEATS, QUICK_REPEATS = 5, 2
ITERATIONS = 10
MAX_BATCHES = 64  # fresh batches (random labels cannot be memorised), up to 64 × 128 × d floats


def parser() -> common.BenchParser:
    p = common.make_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--widths", type=common.positive_int, nargs="+", metavar="D",
                   help=f"layer widths (default: {' '.join(map(str, WIDTHS))}; quick: {' '.join(map(str, QUICK_WIDTHS))})")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help="methods to time (AdamW and SGD, the baselines, are always timed); default: all")
    p.add_argument("--iters", type=common.positive_int, default=ITERATIONS, metavar="N",
                   help=f"iterations per timed call (default: {ITERATIONS}, one update period)")
    return p


def factories(device: torch.device) -> dict[str, Any]:
    """The methods: fp32 SINGD everywhere, and bf16 SINGD too on cuda."""
    dtypes = (None, torch.bfloat16) if device.type == "cuda" else (None,)
    return common.method_factories(dtypes)


def slope(widths: Sequence[int], extra: Sequence[float | None]) -> float | None:
    """Least-squares slope of log(extra) vs log(d) over the points with a positive extra time."""
    points = [(math.log(d), math.log(e)) for d, e in zip(widths, extra) if e is not None and e > 0]
    if len(points) < 2:
        return None
    x, y = zip(*points)
    return float(np.polyfit(x, y, 1)[0])


def time_width(d: int, names: list[str], builders: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per-iteration seconds of every method at width ``d`` (every repeat) and whether training stayed finite."""
    torch.manual_seed(args.seed)
    base = common.mlp([d, d, d, common.NUM_CLASSES]).to(args.device)
    count = min((1 + args.repeats) * args.iters, MAX_BATCHES)  # every iteration of a method gets a new batch
    batches = common.random_batches(count, d, args.device, seed=args.seed)
    trainers = {}
    for name in names:
        model = copy.deepcopy(base)
        trainers[name] = common.Trainer(model, builders[name](model), batches, iterations=args.iters)
    times = common.time_interleaved(trainers, warmup=1, repeats=args.repeats, device=args.device)
    return {
        "seconds_per_iteration": {name: [t / args.iters for t in ts] for name, ts in times.items()},
        "finite": {name: trainer.finite() for name, trainer in trainers.items()},
        "final_loss": {name: trainer.last_loss() for name, trainer in trainers.items()},
    }


def summarize(widths: list[int], names: list[str], raw: dict[str, Any]) -> dict[str, Any]:
    medians = {
        name: [common.median(raw[str(d)]["seconds_per_iteration"][name]) for d in widths] for name in names
    }
    summary: dict[str, Any] = {"widths": widths, "methods": {}}
    summary["adamw_spread"] = [common.spread(raw[str(d)]["seconds_per_iteration"]["AdamW"]) for d in widths]
    for name in names:
        extra = [m - s for m, s in zip(medians[name], medians["SGD"])]
        summary["methods"][name] = {
            "seconds_per_iteration": medians[name],
            "ratio_to_adamw": [m / a for m, a in zip(medians[name], medians["AdamW"])],
            "extra_over_sgd": extra,
            "slope_extra_vs_d": None if name in BASELINES else slope(widths, extra),
            "finite": all(raw[str(d)]["finite"][name] for d in widths),
        }
    return summary


def figure(summary: dict[str, Any]) -> Any:
    fig = common.new_figure()
    if fig is None:
        return None
    ax = fig.add_subplot()
    widths = summary["widths"]
    for name, row in summary["methods"].items():
        ax.plot(widths, [t * 1e3 for t in row["seconds_per_iteration"]], label=name, **common.method_style(name))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    common.plain_log_ticks(ax)
    ax.set_xticks(widths, [str(d) for d in widths])
    ax.set_xlabel("layer width d (MLP d→d→d→10, batch 128)")
    ax.set_ylabel("time per iteration [ms] (median, amortised)")
    ax.set_title("Iteration time vs width")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    return fig


def report(summary: dict[str, Any]) -> None:
    widths = summary["widths"]
    headers = ["method", *[f"d={d} [ms]" for d in widths], *[f"×AdamW d={d}" for d in widths], "slope"]
    rows = []
    for name, row in summary["methods"].items():
        s = row["slope_extra_vs_d"]
        rows.append([
            name + ("" if row["finite"] else " (non-finite!)"),
            *map(common.fmt_ms, row["seconds_per_iteration"]),
            *map(common.fmt_ratio, row["ratio_to_adamw"]),
            "-" if s is None else f"{s:.2f}",
        ])
    common.print_table(headers, rows, "time per iteration (median), ratio to AdamW, log-log slope of extra time over SGD")
    noisy = [str(d) for d, s in zip(widths, summary["adamw_spread"]) if s > common.NOISY_SPREAD]
    if noisy:
        print(f"warning: AdamW's repeats vary > {common.NOISY_SPREAD}× at d = {', '.join(noisy)}: "
              "the machine was busy; rerun these widths (--widths)")


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = common.parse_args(p, argv)
    builders = factories(args.device)
    chosen = common.select(builders, args.methods, p, "--methods")
    names = [n for n in builders if n in BASELINES or n in chosen]
    widths = sorted(args.widths or (QUICK_WIDTHS if args.quick else WIDTHS))
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    config = {
        "model": "MLP d→d→d→10, ReLU", "batch_size": common.BATCH_SIZE, "widths": widths, "methods": names,
        "iterations_per_call": args.iters, "warmup_calls": 1, "repeats": args.repeats,
        "update_every": common.UPDATE_EVERY, "lr": common.SGD_LR, "momentum": common.MOMENTUM,
        "adamw_lr": common.ADAMW_LR, "clip": {"SINGD": None, "KFAC": common.KFAC_CLIP},
        "batches": "fresh random batches, the same sequence for every method",
    }
    return common.run_over_widths(
        NAME, args, config, widths, lambda d: time_width(d, names, builders, args), summarize, report, figure,
        doing=f"timing {len(names)} methods",
    )


if __name__ == "__main__":
    main()
