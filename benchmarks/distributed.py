"""Data parallel over 1, 2 and 4 gloo processes on CPU: time and bytes per step, work balance, agreement.

Model: MLP 256 → 512 → 512 → 10 (ReLU), a fixed global batch of 128 split
evenly over the ranks. Every rank wraps it in ``DistributedDataParallel``
(with one process too, so that the runs differ only in the number of ranks)
and runs AdamW and SGD (DDP alone, the baselines) and ours: K-FAC, B-KFAC
(rank 64) and SINGD diagonal and dense, each with update period T = 10,
with ``grad_worker_fraction=1`` (COMM-OPT: owners broadcast decompositions,
every rank preconditions every layer), and K-FAC also with
``grad_worker_fraction=1/world`` (KFAC-MEM-OPT: owners keep their layers'
decompositions, precondition them and broadcast the gradients every step).

* **time per step**: the methods take turns (A B C A B C …) after a warm-up
  turn; a turn is T steps (one refresh amortised over its period) and starts
  with a barrier; a step's time is the slowest rank's. The median over turns
  is reported, and as ratios to the same method in one process and to AdamW
  at the same number of ranks. Every process runs ``--threads`` torch threads
  (default 1), so 4 ranks on a 2-core machine oversubscribe it 2×; their
  times say more about the protocol's overhead than about speed-ups.
* **bytes per step**: the payload each rank sends per step, counted as it is
  sent: DDP's gradient buckets (a counting communication hook) and every
  ``torch.distributed`` collective of the optimizer (wrapped in each process);
  a broadcast counts on its source only, an object by its pickled size. A
  ring all-reduce moves about twice its payload over the wire. The
  optimizer's own count (``preconditioner.distributed.total_bytes``) is
  compared with it.
* **balance**: max / mean of the `Curvature.cost` assigned to each rank by the
  longest-processing-time assignment, and its lower bound (the costliest
  layer alone on one rank: with 3 layers and 4 ranks, one rank idles).
* **agreement**: the same runs in float64 for T + 2 steps (two refreshes) vs
  one process on the whole batch (max |Δθ|), and across ranks.

    python benchmarks/distributed.py [--worlds 1 2 4] [--methods KFAC SINGD-dense] [--sizes 256 512 512 10]
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

import common

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the ranks import their module by name
import _distributed_ranks as ranks  # noqa: E402

NAME = "distributed"
WORLDS = (1, 2, 4)
QUICK_WORLDS = (1, 2)
SIZES = (256, 512, 512, 10)
QUICK_SIZES = (32, 48, 48, 10)
GLOBAL_BATCH = 128
QUICK_GLOBAL_BATCH = 16
RANK, QUICK_RANK = 64, 4
UPDATE_EVERY, QUICK_UPDATE_EVERY = common.UPDATE_EVERY, 2
REPEATS, QUICK_REPEATS = 5, 2
THREADS_PER_PROCESS = 1
BASELINE = "AdamW"


def parser() -> common.BenchParser:
    p = common.make_parser(NAME, __doc__.split("\n\n")[0])
    p.set_defaults(threads=THREADS_PER_PROCESS)  # per process, not 2: 4 ranks on 2 cores
    p.add_argument("--worlds", type=common.positive_int, nargs="+", metavar="W",
                   help=f"numbers of processes (default: {' '.join(map(str, WORLDS))}; quick: {' '.join(map(str, QUICK_WORLDS))})")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help=f"methods to run (AdamW, the baseline, always runs); default: all of {', '.join(ranks.METHODS)}")
    p.add_argument("--sizes", type=common.positive_int, nargs="+", metavar="D",
                   help=f"MLP layer sizes, input to classes (default: {' '.join(map(str, SIZES))}; last must be {ranks.NUM_CLASSES})")
    p.add_argument("--batch", type=common.positive_int, default=None, metavar="N",
                   help=f"global batch, split over the ranks (default: {GLOBAL_BATCH}; quick: {QUICK_GLOBAL_BATCH})")
    p.add_argument("--update-every", type=common.positive_int, default=None, metavar="T",
                   help=f"update period of ours = steps per timed turn (default: {UPDATE_EVERY}; quick: {QUICK_UPDATE_EVERY})")
    p.add_argument("--rank", type=common.positive_int, default=None, metavar="R",
                   help=f"B-KFAC's rank (default: {RANK}; quick: {QUICK_RANK})")
    p.add_argument("--agreement-steps", type=common.positive_int, default=None, metavar="N",
                   help="float64 steps of the agreement check (default: T + 2)")
    return p


def make_config(args: Any, p: common.BenchParser) -> dict[str, Any]:
    methods = common.select(dict.fromkeys(ranks.METHODS), args.methods, p, "--methods")
    methods = [m for m in ranks.METHODS if m == BASELINE or m in methods]
    worlds = sorted(set(args.worlds or (QUICK_WORLDS if args.quick else WORLDS)))
    sizes = list(args.sizes or (QUICK_SIZES if args.quick else SIZES))
    batch = args.batch or (QUICK_GLOBAL_BATCH if args.quick else GLOBAL_BATCH)
    period = args.update_every or (QUICK_UPDATE_EVERY if args.quick else UPDATE_EVERY)
    if args.device.type != "cpu":
        p.error("distributed runs gloo processes on CPU only (--device cpu)")
    if len(sizes) < 2 or sizes[-1] != ranks.NUM_CLASSES:
        p.error(f"--sizes: at least two sizes, the last {ranks.NUM_CLASSES} (the classes)")
    uneven = [w for w in worlds if batch % w]
    if uneven:
        p.error(f"--batch {batch} does not split evenly over {uneven} processes")
    return {
        "model": "MLP " + " → ".join(map(str, sizes)) + ", ReLU, DistributedDataParallel (also with 1 process)",
        "sizes": sizes,
        "worlds": worlds,
        "methods": methods,
        "global_batch": batch,
        "update_every": period,
        "rank": args.rank or (QUICK_RANK if args.quick else RANK),
        "warmup": 1,
        "repeats": args.repeats or (QUICK_REPEATS if args.quick else REPEATS),
        "distinct_batches": 8,
        "agreement_steps": args.agreement_steps or period + 2,
        "agreement_dtype": "float64",
        "seed": args.seed,
        "threads": args.threads,
        "threads_per_process": args.threads,
        "cpu_count": os.cpu_count(),
        "backend": "gloo",
        "start_method": "forkserver (torch.multiprocessing.start_processes), file rendezvous",
        "timeout_s": 600,
        "optimizer": {"ours": f"lr {ranks.SGD_LR}, momentum {ranks.MOMENTUM}; clip {ranks.KFAC_CLIP} for K-FAC/B-KFAC, "
                              "none for SINGD", "AdamW": f"lr {ranks.ADAMW_LR}", "SGD": f"lr {ranks.SGD_LR}, momentum {ranks.MOMENTUM}"},
        "timing": "turns of T steps per method, interleaved, after 1 warm-up turn; per turn the slowest rank; median",
        "bytes": "payload each rank sends per step: DDP gradient buckets (comm hook) + the optimizer's torch.distributed "
                 "collectives (wrapped); broadcast on its source only; all_gather_object = pickled size; 0 with 1 process",
        "oversubscribed": max(worlds) * args.threads > (os.cpu_count() or 1),
    }


def spawn(world: int, config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Run ``world`` ranks of `_distributed_ranks.rank_main`; their gathered records."""
    # A fork server that has imported torch once starts each rank quickly (as in tests/test_distributed.py).
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch", "torch.distributed", "torch.nn.functional", "singd_rkfac"]
    )
    mp.start_processes(ranks.rank_main, args=(world, config, str(folder)), nprocs=world, join=True,
                       start_method="forkserver")
    return json.loads((folder / f"world{world}.json").read_text())


def _per_step(rank_record: dict[str, Any]) -> dict[str, float]:
    steps = rank_record["steps"]
    return {kind: count / steps for kind, count in rank_record["bytes"].items()}


def summarize(config: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    worlds, names = config["worlds"], config["methods"]
    summary: dict[str, Any] = {"worlds": worlds, "methods": {}}
    for name in names:
        row: dict[str, list[Any]] = {key: [] for key in (
            "seconds_per_step", "optimizer_step_seconds", "ratio_to_one_process", "ratio_to_adamw",
            "bytes_per_step_per_rank", "bytes_per_step_all_ranks", "bytes_by_kind_per_rank", "calls_per_step",
            "driver_bytes_match", "balance", "balance_lower_bound", "owners", "spread",
            "max_abs_diff_vs_one_process", "max_abs_diff_across_ranks", "finite")}
        for world in worlds:
            records = [r["timing"][name] for r in raw[str(world)]["ranks"]]
            slowest = [max(turn) for turn in zip(*(r["seconds_per_step"] for r in records))]
            in_step = [max(turn) for turn in zip(*(r["optimizer_step_seconds_per_step"] for r in records))]
            row["seconds_per_step"].append(common.median(slowest))
            row["optimizer_step_seconds"].append(common.median(in_step))
            row["spread"].append(common.spread(slowest))
            per_rank = [_per_step(r) for r in records]
            totals = [sum(kinds.values()) for kinds in per_rank]
            row["bytes_per_step_per_rank"].append(sum(totals) / world)
            row["bytes_per_step_all_ranks"].append(sum(totals))
            # by kind: DDP's buckets (counted by the hook), the optimizer's split as it reports it
            split = [
                {"ddp_gradients": p.get("ddp_gradients", 0.0),
                 **{k: v / r["driver"]["communicated_steps"] for k, v in r["driver"]["total_bytes"].items()}}
                if "driver" in r else p
                for r, p in zip(records, per_rank)
            ]
            kinds = sorted({k for kinds in split for k in kinds})
            row["bytes_by_kind_per_rank"].append({k: sum(p.get(k, 0.0) for p in split) / world for k in kinds})
            row["calls_per_step"].append({k: c / records[0]["steps"] for k, c in records[0]["calls"].items()})
            driver = records[0].get("driver")
            if driver is not None:
                # the optimizer's own count equals what went through the wrapped collectives
                match = all(
                    abs(sum(r["driver"]["total_bytes"].values()) / r["driver"]["communicated_steps"]
                        - sum(v for k, v in p.items() if k != "ddp_gradients")) < 1e-6
                    for r, p in zip(records, per_rank)
                )
                row["driver_bytes_match"].append(match)
                row["balance"].append(driver["balance"])
                # no assignment beats the costliest layer alone on one rank
                costs = driver["costs"].values()
                row["balance_lower_bound"].append(max(1.0, max(costs) / (sum(costs) / world)))
                row["owners"].append(driver["owners"])
            else:
                row["driver_bytes_match"].append(None)
                row["balance"].append(1.0 if world == 1 and name not in ranks.BASELINES else None)
                row["balance_lower_bound"].append(row["balance"][-1])
                row["owners"].append(None)
            agreement = [r["agreement"][name] for r in raw[str(world)]["ranks"]]
            row["max_abs_diff_vs_one_process"].append(max(a["max_abs_diff_vs_one_process"] for a in agreement))
            row["max_abs_diff_across_ranks"].append(max(a["max_abs_diff_across_ranks"] for a in agreement))
            row["finite"].append(all(r["finite"] for r in records))
        summary["methods"][name] = row
    for name, row in summary["methods"].items():
        adamw = summary["methods"][BASELINE]["seconds_per_step"]
        row["ratio_to_adamw"] = [t / a for t, a in zip(row["seconds_per_step"], adamw)]
        one = row["seconds_per_step"][worlds.index(1)] if 1 in worlds else None
        row["ratio_to_one_process"] = [None if one is None else t / one for t in row["seconds_per_step"]]
    return summary


def report(summary: dict[str, Any]) -> None:
    worlds = summary["worlds"]
    rows = []
    for name, row in summary["methods"].items():
        for i, world in enumerate(worlds):
            rows.append([
                name if i == 0 else "", world, common.fmt_ms(row["seconds_per_step"][i]),
                common.fmt_ms(row["optimizer_step_seconds"][i]), common.fmt_ratio(row["ratio_to_one_process"][i]),
                common.fmt_ratio(row["ratio_to_adamw"][i]), common.format_bytes(int(row["bytes_per_step_per_rank"][i])),
                common.fmt_ratio(row["balance"][i], 2), common.fmt_ratio(row["balance_lower_bound"][i], 2),
                f"{row['max_abs_diff_vs_one_process'][i]:.1e}", common.fmt_ratio(row["spread"][i], 1),
            ])
    common.print_table(
        ["method", "ranks", "ms/step", "ms in step()", "×1 process", "×AdamW", "bytes/step/rank", "balance",
         "bound", "max|Δθ| vs 1 proc (fp64)", "spread"],
        rows, "time per step (slowest rank, median), bytes each rank sends per step, assignment balance (max/mean "
        "cost; bound: the costliest layer alone), agreement; spread = max/min of the timed turns",
    )


#: Collectives in the bytes panel: what each carries.
_KINDS = {
    "ddp_gradients": ("DDP gradients", "lightgrey"),
    "flags": ("flags and counts (all_gather)", "black"),
    "all_reduce": ("statistics (all_reduce)", "tab:blue"),
    "all_gather": ("Brand rows (all_gather)", "tab:orange"),
    "broadcast": ("owners' results (broadcast)", "tab:green"),
    "gradients": ("MEM-OPT: preconditioned gradients (broadcast)", "tab:purple"),
    "metadata": ("metadata (all_gather_object)", "tab:red"),
}


def plot_style(name: str) -> dict[str, Any]:
    """`common.method_style`; a MEM-OPT run: its method's colour, dashed, diamonds."""
    if name.endswith(ranks.MEM_OPT):
        return {**common.method_style(name.removesuffix(ranks.MEM_OPT)), "linestyle": "--", "marker": "D"}
    return common.method_style(name)


def _bytes_bars(ax: Any, summary: dict[str, Any]) -> None:
    """Bytes each rank sends per step, stacked by collective, one bar per method and number of ranks > 1."""
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    worlds = [w for w in summary["worlds"] if w > 1]
    highest = 0.0
    names = list(summary["methods"])
    width = 0.8 / max(len(worlds), 1)
    for j, world in enumerate(worlds):
        i = summary["worlds"].index(world)
        bottom = [0.0] * len(names)
        positions = [k + (j - (len(worlds) - 1) / 2) * width for k in range(len(names))]
        for kind, (label, colour) in _KINDS.items():
            values = [summary["methods"][n]["bytes_by_kind_per_rank"][i].get(kind, 0.0) for n in names]
            ax.bar(positions, values, width * 0.9, bottom=bottom, color=colour, edgecolor="black", linewidth=0.3,
                   label=label if j == 0 else None)
            bottom = [b + v for b, v in zip(bottom, values)]
        for x, top in zip(positions, bottom):
            ax.annotate(str(world), (x, top), ha="center", va="bottom", fontsize="x-small")
        highest = max(highest, *bottom)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize="small")
    if highest > 0:  # room for the legend above the bars; ticks at powers of two (whole KiB or MiB)
        ax.set_ylim(0, 1.9 * highest)
        ax.yaxis.set_major_locator(MultipleLocator(2.0 ** math.floor(math.log2(highest / 3))))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: common.format_bytes(int(value))))
    ax.set(ylabel="bytes sent per step per rank",
           title="Communication per step (bar label: processes)")
    ax.legend(fontsize="x-small", loc="upper right")
    ax.grid(True, axis="y", alpha=0.3)


def figure(summary: dict[str, Any], config: dict[str, Any]) -> Any:
    fig = common.new_figure(15.0, 8.5)
    if fig is None:
        return None
    worlds = summary["worlds"]
    axes = fig.subplots(2, 3)
    (time_ax, ratio_ax, step_ax), (bytes_ax, balance_ax, agree_ax) = axes
    for name, row in summary["methods"].items():
        style = plot_style(name)
        time_ax.plot(worlds, [t * 1e3 for t in row["seconds_per_step"]], label=name, **style)
        if 1 in worlds:
            ratio_ax.plot(worlds, row["ratio_to_one_process"], **style)
        step_ax.plot(worlds, [t * 1e3 for t in row["optimizer_step_seconds"]], **style)
        balanced = [(w, b) for w, b in zip(worlds, row["balance"]) if b is not None]
        if balanced and name not in ranks.BASELINES:
            balance_ax.plot(*zip(*balanced), **style)
            bound = [(w, b) for w, b in zip(worlds, row["balance_lower_bound"]) if b is not None]
            balance_ax.plot(*zip(*bound), color=style["color"], linestyle=":", linewidth=0.8)
        agreed = [(w, max(d, 1e-18)) for w, d in zip(worlds, row["max_abs_diff_vs_one_process"]) if w > 1]
        if agreed:
            agree_ax.plot(*zip(*agreed), **style)
    time_ax.set(ylabel="ms per step (slowest rank)", title="Time per step (forward + backward + step)")
    time_ax.set_yscale("log")
    common.plain_log_ticks(time_ax)
    # the legend goes where the agreement panel has no points (1 process is the reference)
    agree_ax.legend(*time_ax.get_legend_handles_labels(), fontsize="small", loc="center left")
    ratio_ax.axhline(1.0, color="grey", linewidth=0.8)
    ratio_ax.set(ylabel="time / same method with 1 process", title="Ratio to 1 process")
    step_ax.set(ylabel="ms per step in opt.step()", title="Time inside opt.step() (statistics, work, share)")
    step_ax.set_yscale("log")
    common.plain_log_ticks(step_ax)
    _bytes_bars(bytes_ax, summary)
    balance_ax.axhline(1.0, color="grey", linewidth=0.8)
    balance_ax.set(ylabel="max / mean assigned cost",
                   title="Work balance (LPT on the cost model; dotted: costliest layer alone)")
    agree_ax.set_yscale("log")
    agree_ax.set(ylabel="max |Δθ| vs 1 process (float64)",
                 title=f"Agreement after {config['agreement_steps']} steps")
    for ax in (time_ax, ratio_ax, step_ax, balance_ax, agree_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.set_xlabel("gloo processes")
        ax.grid(True, which="both", alpha=0.3)
    sizes = "→".join(map(str, config["sizes"]))
    fig.suptitle(f"Data parallel on CPU: MLP {sizes}, global batch {config['global_batch']}, T = {config['update_every']}, "
                 f"{config['threads_per_process']} thread per process on {config['cpu_count']} cores")
    return fig


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = common.parse_args(p, argv)
    config = make_config(args, p)
    if not (dist.is_available() and dist.is_gloo_available()):
        p.error("torch.distributed with the gloo backend is not available")
    payload = common.new_payload(NAME, args, config)
    with tempfile.TemporaryDirectory(prefix="singd-rkfac-distributed-") as tmp:
        folder = Path(tmp)
        progress = common.Progress(1 + len(config["worlds"]), NAME)
        with common.configured(args):
            progress.next(f"one process, float64: the reference of the agreement check ({config['agreement_steps']} steps)")
            (folder / "reference.json").write_text(json.dumps(ranks.reference_parameters(config)))
        wall = {}
        with progress:
            for world in config["worlds"]:
                progress.next(f"{world} process{'es' if world > 1 else ''}: {len(config['methods'])} methods")
                start = time.perf_counter()
                payload["raw"][str(world)] = spawn(world, config, folder)
                wall[str(world)] = time.perf_counter() - start
    payload["config"]["wall_seconds_per_world"] = wall
    payload["summary"] = summarize(config, payload["raw"])
    report(payload["summary"])
    common.write_results(NAME, payload, figure(payload["summary"], config), args.out)
    return payload


if __name__ == "__main__":
    main()
