"""Our SINGD against the `singd` package (PyPI) on the same model and hyperparameters.

Model: MLP 784 → 512 → 512 → 10 (ReLU; quick: 64 → 32 → 10), batch 128,
random inputs and labels. For every structure pair and update period T, three
copies of one initial model (AdamW, ``singd.optim.optimizer.SINGD``, ours)
first take ``--steps`` steps on the same batches: the largest parameter
difference between singd and ours is the trajectory agreement (fp32), and the
steps double as warm-up. Then the three are timed interleaved (A B C A B C …),
each timed call being one update period (T iterations); reported: median time
per iteration and the ratios ours/singd, ours/AdamW, singd/AdamW. A fourth
copy trained by plain SGD gives the floor (forward + backward + the cheapest
step); ``extra`` = iteration − floor is each optimizer's own time, and
``0.8·singd/floor < 1`` flags a configuration where 0.8 × singd's time is
below what any optimizer can reach. Untimed, ``torch.profiler`` counts the
flops of each contender's matrix products per iteration: where two
implementations do the same products, the counts agree and so do the times.

Every configuration runs in its own fresh process (`common.in_fresh_process`),
as a user runs one training configuration per process. In one long process the
results would depend on the order: after heavy configurations (the package's
Toeplitz allocates hundreds of MB per step) glibc's raised mmap/trim
thresholds stop the page faults of the package's per-step multi-MB
temporaries, and its diagonal T=10 gets ≈ 30 % faster; ours, which allocates
no such temporaries, barely changes.

The two implementations round differently (≈ 1e-8 in fp32). Where a ReLU
input of some sample lies within that rounding of 0, the two runs can take
different sides of the kink once; the difference then jumps (e.g. to 1e-6) and
momentum carries it on. ``max_abs_diff_per_step`` in the JSON shows such jumps.

Hyperparameters (both SINGDs): lr=0.01, momentum=0.9, damping=1e-3,
alpha1=0.5, lr_cov=1e-2, normalize_lr_cov=False, weight_decay=0,
kfac_like=False, kfac_approx="expand"; ours with clip=None. AdamW: lr=1e-3.

    python benchmarks/anchors.py [--structures dense diagonal] [--periods 10]
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable

import torch
from torch import nn

import common
import singd_rkfac as sr

NAME = "anchors"
SIZES = (784, 512, 512, common.NUM_CLASSES)
QUICK_SIZES = (64, 32, common.NUM_CLASSES)
PERIODS = (1, 10)
STEPS = 10
REPEATS, QUICK_REPEATS = 7, 2
MIN_ITERATIONS = 10
ADAMW_LR = common.ADAMW_LR
HYPER = {"lr": 0.01, "momentum": 0.9, "damping": 1e-3, "alpha1": 0.5, "lr_cov": 1e-2,
         "normalize_lr_cov": False, "weight_decay": 0.0, "kfac_like": False, "kfac_approx": "expand"}

#: Our label → (singd's structure name, our structure).
STRUCTURES: dict[str, tuple[str, Any]] = {
    "dense": ("dense", "dense"),
    "diagonal": ("diagonal", "diagonal"),
    "block30": ("block30diagonal", sr.structures.Block(30)),
    "hierarchical15_15": ("hierarchical15_15", sr.structures.Hierarchical(15, 15)),
    "toeplitz-lower": ("triltoeplitz", sr.structures.Toeplitz(lower=True)),
    "toeplitz-upper": ("triutoeplitz", sr.structures.Toeplitz(lower=False)),
}
CONTENDERS = ("AdamW", "singd", "ours")
#: Forward + backward + a plain SGD step: the time no optimizer can go below.
FLOOR = "floor"


def parser() -> common.BenchParser:
    p = common.make_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--structures", nargs="+", metavar="NAME",
                   help=f"structure pairs to run (default: all of {', '.join(STRUCTURES)})")
    p.add_argument("--periods", type=common.positive_int, nargs="+", metavar="T",
                   help=f"update periods T (default: {' '.join(map(str, PERIODS))})")
    p.add_argument("--steps", type=common.positive_int, default=STEPS, metavar="N",
                   help=f"steps of the trajectory comparison, also the warm-up (default: {STEPS})")
    return p


def reference_class() -> type:
    try:
        from singd.optim.optimizer import SINGD
    except ImportError as error:
        raise ImportError("the anchors benchmark needs the reference package: pip install singd==0.0.5") from error
    return SINGD


def quiet(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with the reference package's warnings suppressed."""
    def run() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step()
    return run


def build(label: str, period: int, base: nn.Module, reference: type) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    """AdamW, singd's SINGD, ours and the floor (plain SGD) on copies of ``base``."""
    ref_name, ours_structure = STRUCTURES[label]
    h = HYPER
    models = {name: copy.deepcopy(base) for name in CONTENDERS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference(
            models["singd"], lr=h["lr"], momentum=h["momentum"], damping=h["damping"], alpha1=h["alpha1"],
            weight_decay=h["weight_decay"], T=period, lr_cov=h["lr_cov"], structures=(ref_name, ref_name),
            kfac_like=h["kfac_like"], normalize_lr_cov=h["normalize_lr_cov"], kfac_approx=h["kfac_approx"],
        )
    method = sr.SINGD(
        structure=ours_structure, update_every=period, lr_cov=h["lr_cov"], damping=h["damping"], alpha1=h["alpha1"],
        kfac_like=h["kfac_like"], normalize_lr_cov=h["normalize_lr_cov"], kfac_approx=h["kfac_approx"],
    )
    ours = sr.Optimizer(models["ours"], sr.Policy(default=method), lr=h["lr"], momentum=h["momentum"],
                        weight_decay=h["weight_decay"], clip=None)
    adamw = torch.optim.AdamW(models["AdamW"].parameters(), lr=ADAMW_LR)
    models[FLOOR] = copy.deepcopy(base)
    floor = torch.optim.SGD(models[FLOOR].parameters(), lr=h["lr"])
    return {"AdamW": (models["AdamW"], adamw), "singd": (models["singd"], ref), "ours": (models["ours"], ours),
            FLOOR: (models[FLOOR], floor)}


def flops_per_iteration(call: Callable[[], None], iterations: int) -> float:
    """Floating-point operations of the matrix products in one iteration (``torch.profiler``'s count).

    Untimed, after the timing. Products dominate every SINGD structure but
    diagonal and Toeplitz, so equal counts at equal speed mean equal time.
    """
    from torch.profiler import profile

    with profile(with_flops=True) as recorded:
        call()
    return sum(event.flops for event in recorded.key_averages() if event.flops) / iterations


@torch.no_grad()
def max_difference(a: nn.Module, b: nn.Module) -> float:
    """Largest entry-wise difference of two models' parameters."""
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def run_config(label: str, period: int, sizes: tuple[int, ...], args: Any) -> dict[str, Any]:
    """Trajectory agreement over ``args.steps`` steps, then interleaved timing, for one structure and T."""
    with common.configured(args):
        return _measure(label, period, sizes, reference_class(), args)


def _measure(label: str, period: int, sizes: tuple[int, ...], reference: type, args: Any) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    base = common.mlp(sizes).to(args.device)
    # a fresh batch for every iteration (random labels are not memorised); the same sequence for all three
    # a timed call covers whole update periods and at least MIN_ITERATIONS iterations (single
    # iterations of a few ms are too noisy on a shared 2-core machine)
    per_call = period * -(-MIN_ITERATIONS // period)
    batches = common.random_batches(args.steps + args.repeats * per_call, sizes[0], args.device, seed=args.seed)
    built = build(label, period, base, reference)
    trainers = {name: common.Trainer(model, opt, batches, iterations=1) for name, (model, opt) in built.items()}
    calls = {name: quiet(t) if name == "singd" else t for name, t in trainers.items()}
    per_step = []
    for _ in range(args.steps):  # the same batch for all three at every step
        for call in calls.values():
            call()
        per_step.append(max_difference(built["singd"][0], built["ours"][0]))
    common.synchronize(args.device)
    agreement = {
        "steps": args.steps,
        "max_abs_diff_singd_vs_ours": per_step[-1],
        "max_abs_diff_per_step": per_step,
        "max_abs_move_from_init": max_difference(built["ours"][0], base),
        "max_abs_param": max(float(p.detach().abs().max()) for p in built["ours"][0].parameters()),
        "finite": {name: t.finite() for name, t in trainers.items()},
        "loss_at_last_step": {name: t.last_loss() for name, t in trainers.items()},
    }
    for trainer in trainers.values():
        trainer.iterations = per_call
    times = common.time_interleaved(calls, warmup=0, repeats=args.repeats, device=args.device)
    flops = {name: flops_per_iteration(calls[name], per_call) for name in CONTENDERS}
    return {
        "structure": label, "singd_structure": STRUCTURES[label][0], "T": period,
        "iterations_per_call": per_call,
        "seconds_per_iteration": {name: [t / per_call for t in ts] for name, ts in times.items()},
        "flops_per_iteration": flops,
        "trajectory": agreement,
        "final_loss": {name: t.last_loss() for name, t in trainers.items()},
        "finite_after_timing": {name: t.finite() for name, t in trainers.items()},
    }


def summarize(raw: list[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for entry in raw:
        med = {name: common.median(entry["seconds_per_iteration"][name]) for name in (*CONTENDERS, FLOOR)}
        extra = {name: med[name] - med[FLOOR] for name in CONTENDERS}
        rows.append({
            "structure": entry["structure"], "singd_structure": entry["singd_structure"], "T": entry["T"],
            "seconds_per_iteration": med,
            "ours_over_singd": med["ours"] / med["singd"],
            "ours_over_adamw": med["ours"] / med["AdamW"],
            "singd_over_adamw": med["singd"] / med["AdamW"],
            # the optimizers' own time: iteration minus forward + backward + plain SGD
            "extra_seconds": extra,
            "ours_over_singd_extra": extra["ours"] / extra["singd"] if extra["singd"] > 0 else None,
            "target_over_floor": 0.8 * med["singd"] / med[FLOOR],
            "gflop_per_iteration": {name: entry["flops_per_iteration"][name] / 1e9 for name in CONTENDERS},
            "max_abs_diff": entry["trajectory"]["max_abs_diff_singd_vs_ours"],
            "max_abs_move": entry["trajectory"]["max_abs_move_from_init"],
            "adamw_spread": common.spread(entry["seconds_per_iteration"]["AdamW"]),
        })
    ratios = [r["ours_over_singd"] for r in rows]
    return {
        "rows": rows,
        "geomean_ours_over_singd": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None,
        "max_abs_diff_overall": max((r["max_abs_diff"] for r in rows), default=None),
    }


def figure(summary: dict[str, Any]) -> Any:
    fig = common.new_figure(max(7.5, 0.8 * len(summary["rows"]) + 3), 5.0)
    if fig is None:
        return None
    ax = fig.add_subplot()
    rows = summary["rows"]
    width = 0.27
    for k, name in enumerate(CONTENDERS):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        ax.bar(xs, [r["seconds_per_iteration"][name] * 1e3 for r in rows], width, label=name)
    ax.set_xticks(range(len(rows)), [f"{r['structure']}\nT={r['T']}" for r in rows], fontsize="x-small")
    ax.set_yscale("log")
    common.plain_log_ticks(ax)
    ax.set_ylabel("time per iteration [ms] (median, log scale)")
    ax.set_title("SINGD: ours vs the singd package (same model, hyperparameters, batches)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend()
    return fig


def report(summary: dict[str, Any]) -> None:
    headers = ["structure", "T", "floor [ms]", "AdamW [ms]", "singd [ms]", "ours [ms]", "ours/singd", "ours/AdamW",
               "singd/AdamW", "extra ours/singd", "0.8·singd/floor", "GFLOP ours/singd", "max|Δparam|"]
    rows = [
        [r["structure"], r["T"], *(common.fmt_ms(r["seconds_per_iteration"][n]) for n in (FLOOR, *CONTENDERS)),
         *(common.fmt_ratio(r[k]) for k in ("ours_over_singd", "ours_over_adamw", "singd_over_adamw")),
         "-" if r["ours_over_singd_extra"] is None else common.fmt_ratio(r["ours_over_singd_extra"]),
         common.fmt_ratio(r["target_over_floor"]),
         f"{r['gflop_per_iteration']['ours']:.3g}/{r['gflop_per_iteration']['singd']:.3g}", f"{r['max_abs_diff']:.2e}"]
        for r in summary["rows"]
    ]
    common.print_table(headers, rows, "time per iteration (median of repeats, interleaved) and trajectory agreement")
    noisy = [f"{r['structure']} T={r['T']}" for r in summary["rows"] if r["adamw_spread"] > common.NOISY_SPREAD]
    if noisy:
        print(f"warning: AdamW's repeats vary > {common.NOISY_SPREAD}× in {', '.join(noisy)}: "
              "the machine was busy; rerun these (--structures, --periods)")
    geo = summary["geomean_ours_over_singd"]
    if geo is not None:
        print(f"geometric mean ours/singd: {geo:.2f}")


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = common.parse_args(p, argv)
    labels = common.select(STRUCTURES, args.structures, p, "--structures")
    periods = sorted(set(args.periods or PERIODS))
    sizes = QUICK_SIZES if args.quick else SIZES
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    reference_class()  # fails early, here, when the package is missing
    from importlib.metadata import version

    config = {
        "model": "MLP " + "→".join(map(str, sizes)) + ", ReLU", "batch_size": common.BATCH_SIZE,
        "structures": {label: STRUCTURES[label][0] for label in labels}, "periods": periods,
        "trajectory_steps": args.steps, "repeats": args.repeats, "iterations_per_call": f"whole periods T, at least {MIN_ITERATIONS}",
        "hyperparameters": HYPER, "adamw_lr": ADAMW_LR, "ours_clip": None, "singd_version": version("singd"),
        "isolation": "one fresh process per configuration (fork server that imported torch and singd_rkfac only)",
    }
    payload = common.new_payload(NAME, args, config)
    payload["raw"] = []
    with common.configured(args), common.Progress(len(periods) * len(labels), NAME) as progress:
        for period in periods:
            for label in labels:
                progress.next(f"{label}, T={period}")
                payload["raw"].append(common.in_fresh_process(run_config, label, period, sizes, args))
    payload["summary"] = summarize(payload["raw"])
    report(payload["summary"])
    common.write_results(NAME, payload, figure(payload["summary"]), args.out)
    return payload


if __name__ == "__main__":
    main()
