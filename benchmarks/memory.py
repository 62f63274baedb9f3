"""Persistent optimizer-state bytes per method and dtype vs layer width d.

Model: MLP d → d → d → 10 (ReLU). Every optimizer takes two steps on random
batches of 64 (so lazily created state exists and has reached its steady
size: B-KFAC's kept rank grows by the batch's rows per step until it reaches
the rank, and with ``inverse_every > 1`` the basis the preconditioner took at
the last decomposition is kept besides the one being updated), then its
persistent state is counted:
``opt.state_bytes()`` for ours (update-rule buffers + curvature, tensors that
share storage counted once), the tensors in ``opt.state`` for torch's. SINGD
runs with fp32 and with bf16 factors; the low-rank K-FAC family (R-KFAC,
SRE-KFAC, Nyström, B-KFAC, B-R-KFAC, B-KFAC-c) with rank 64 and K-FAC's
update periods. Reported: bytes, and the ratio to AdamW's state at the same d.
Nothing is timed, so the numbers do not depend on the machine's load.

    python benchmarks/memory.py [--widths 256 1024] [--methods SINGD-diagonal-bf16 BKFAC ...]
"""

from __future__ import annotations

import copy
from typing import Any

import torch

import common
from singd_rkfac.optimizer import state_bytes

NAME = "memory"
WIDTHS = (256, 512, 1024, 2048, 4096)
QUICK_WIDTHS = (32, 64)
BASELINE = "AdamW"
#: Rows per step: at least the low-rank family's rank, so B-KFAC's first basis is already full.
STEP_BATCH = 64
#: Steps before counting: the second makes B-KFAC (inverse_every > 1) keep two bases, its steady state.
STEPS = 2


def parser() -> common.BenchParser:
    p = common.make_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--widths", type=common.positive_int, nargs="+", metavar="D",
                   help=f"layer widths (default: {' '.join(map(str, WIDTHS))}; quick: {' '.join(map(str, QUICK_WIDTHS))})")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help="methods to measure (AdamW, the baseline, is always measured); default: all")
    return p


def measure(d: int, names: list[str], builders: dict[str, Any], args: Any) -> dict[str, dict[str, int]]:
    """State bytes (and their split for ours) of every method after `STEPS` steps at width ``d``."""
    torch.manual_seed(args.seed)
    base = common.mlp([d, d, d, common.NUM_CLASSES]).to(args.device)
    batches = common.random_batches(STEPS, d, args.device, batch_size=STEP_BATCH, seed=args.seed)
    rows: dict[str, dict[str, int]] = {}
    for name in names:
        model = copy.deepcopy(base)
        optimizer = builders[name](model)
        common.Trainer(model, optimizer, batches, iterations=STEPS)()
        row = {
            "state_bytes": state_bytes(optimizer),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        }
        if hasattr(optimizer, "memory_bytes"):
            row["curvature_bytes"] = int(sum(optimizer.memory_bytes().values()))
            row["update_rule_bytes"] = row["state_bytes"] - row["curvature_bytes"]
        rows[name] = row
        del model, optimizer
    return rows


def summarize(widths: list[int], names: list[str], raw: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {"widths": widths, "methods": {}}
    for name in names:
        state = [raw[str(d)][name]["state_bytes"] for d in widths]
        adamw = [raw[str(d)][BASELINE]["state_bytes"] for d in widths]
        summary["methods"][name] = {"state_bytes": state, "ratio_to_adamw": [s / a for s, a in zip(state, adamw)]}
    summary["parameter_bytes"] = [raw[str(d)][BASELINE]["parameter_bytes"] for d in widths]
    return summary


def figure(summary: dict[str, Any]) -> Any:
    fig = common.new_figure(12.0, 5.0)
    if fig is None:
        return None
    from matplotlib.ticker import FuncFormatter

    widths = summary["widths"]
    left, right = fig.subplots(1, 2)
    left.plot(widths, summary["parameter_bytes"], color="lightgrey", linewidth=4, label="parameters (for scale)")
    for name, row in summary["methods"].items():
        style = common.method_style(name)
        left.plot(widths, row["state_bytes"], label=name, **style)
        right.plot(widths, row["ratio_to_adamw"], **style)
    left.set_yscale("log", base=2)
    left.yaxis.set_major_formatter(FuncFormatter(lambda value, _: common.format_bytes(int(value))))
    left.set_ylabel("persistent optimizer state [bytes]")
    left.set_title("State vs width")
    left.legend(fontsize="x-small", ncol=2)
    right.axhline(0.5, color="grey", linewidth=0.8)
    right.set_yscale("log")
    common.plain_log_ticks(right)
    right.set_ylabel("state / AdamW's state")
    right.set_title("Ratio to AdamW (0.5 = one fp32 buffer per parameter)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(d) for d in widths])
        ax.set_xlabel("layer width d (MLP d→d→d→10)")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"Persistent optimizer state after {STEPS} steps (dashed: bf16 SINGD factors; dash-dot: low-rank K-FAC, rank {common.LOWRANK_RANK})")
    return fig


def report(summary: dict[str, Any]) -> None:
    widths = summary["widths"]
    headers = ["method", *[f"d={d}" for d in widths], *[f"×AdamW d={d}" for d in widths]]
    rows = [
        [name, *map(common.format_bytes, row["state_bytes"]), *(common.fmt_ratio(r, 3) for r in row["ratio_to_adamw"])]
        for name, row in summary["methods"].items()
    ]
    common.print_table(headers, rows, f"persistent optimizer state after {STEPS} steps, and its ratio to AdamW's")


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = common.parse_args(p, argv)
    builders = common.method_factories((None, torch.bfloat16))
    chosen = common.select(builders, args.methods, p, "--methods")
    names = [n for n in builders if n == BASELINE or n in chosen]
    widths = sorted(args.widths or (QUICK_WIDTHS if args.quick else WIDTHS))
    config = {
        "model": "MLP d→d→d→10, ReLU", "widths": widths, "methods": names, "step_batch_size": STEP_BATCH,
        "steps": STEPS, "update_every": common.UPDATE_EVERY, "lowrank_rank": common.LOWRANK_RANK,
        "clip": {"SINGD": None, "KFAC family": common.KFAC_CLIP},
        "counted": "sr.Optimizer.state_bytes() / tensors in opt.state",
    }
    return common.run_over_widths(
        NAME, args, config, widths, lambda d: measure(d, names, builders, args), summarize, report, figure,
        doing=f"{len(names)} optimizers, {STEPS} steps each",
    )


if __name__ == "__main__":
    main()
