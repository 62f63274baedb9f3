"""Time- and steps-to-target on scikit-learn digits for every method, each with its own small learning-rate grid.

Problems (``--problems``): ``classifier`` (MLP 64 → 256 → 256 → 10, ReLU,
cross-entropy; target: test accuracy ≥ 0.96), ``cnn`` (the package's digits
CNN; target: test accuracy ≥ 0.96) and ``autoencoder`` (64 → 256 → 128 → 32
→ 8 → 32 → 128 → 256 → 64, tanh, per-sample squared error ½‖x̂ − x‖²
averaged over the batch; target: train-set loss ≤ 6, i.e. under a fifth of
the initial ≈ 32). Batch 128 from shuffled epochs, the same batch order and
initial weights for every run of a problem. Every method trains with each
learning rate of its grid for ``--steps`` steps (momentum 0.9 for SGD and ours;
ours keep their default KL clip except SINGD and SENG, whose update rules are
the reference papers' — no clip); the metric is evaluated every
``--eval-every`` steps. Reported per method: the best learning rate (fewest
steps to target, then lowest final loss), its steps and seconds to target
(training time only, evaluation excluded) and their ratios to AdamW's and to
K-FAC's (each at its own best learning rate), the final metric, and whether
every run stayed finite. The plot shows each method's best run.

Methods: the baselines AdamW and SGD; K-FAC and its low-rank family (rank
32; a factor where Brand is not valid — rank + 128 rows ≥ its dimension — uses
the exact representation, as ``describe()`` says); SINGD with diagonal,
block (32), low-rank (16) and dense structures (T = 10, fp32); SENG
(``update_every`` 10, damping 1); two-level K-FAC (K-FAC fine level plus each
coarse space, refreshed every 10 steps). DESIGN §3.5 quotes the two-level
paper's finding that it does not beat plain K-FAC: the ratios to K-FAC test it.

    python benchmarks/train.py [--problems classifier autoencoder] [--methods KFAC SENG ...] [--steps 300]
"""

from __future__ import annotations

import argparse
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

import common
import singd_rkfac as sr
from singd_rkfac.data import batch_order, digits_cnn, load_digits
from singd_rkfac.optimizer import state_bytes

NAME = "train"
STEPS, QUICK_STEPS = 300, 6
EVAL_EVERY, QUICK_EVAL_EVERY = 10, 3
BATCH = 128
RANK = 32
PERIOD = 10
QUICK_PROBLEMS = ("classifier", "autoencoder")
QUICK_METHODS = ("AdamW", "KFAC", "SENG", "KFAC-2L-nicolaides")


# -- problems -------------------------------------------------------------------------------------------------------
def _chain(sizes: Sequence[int], activation: Callable[[], nn.Module]) -> nn.Sequential:
    layers: list[tuple[str, nn.Module]] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append((f"act{i}", activation()))
        layers.append((f"fc{i + 1}", nn.Linear(fan_in, fan_out)))
    return nn.Sequential(OrderedDict(layers))


def _cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y)


def _reconstruction(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """½‖x̂ − x‖² per sample, averaged over the batch (a per-sample loss: ``loss_average="batch"``)."""
    return 0.5 * (model(x) - x).square().sum(dim=1).mean()


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


@dataclass(frozen=True)
class Problem:
    """A model, its loss, the metric that decides the target, and whether it uses images."""

    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]
    metric: str
    target: float
    higher_is_better: bool
    images: bool = False

    def evaluate(self, model: nn.Module, data: Any) -> float:
        """The target metric: test accuracy (classifiers) or the train-set loss (autoencoder)."""
        with torch.no_grad():
            if self.higher_is_better:
                return _accuracy(model, data.x_test, data.y_test)
            return self.loss(model, data.x_train, data.y_train).item()

    def reached(self, value: float) -> bool:
        return value >= self.target if self.higher_is_better else value <= self.target


PROBLEMS: dict[str, Problem] = {
    "classifier": Problem(lambda: _chain([64, 256, 256, 10], nn.ReLU), _cross_entropy, "test accuracy", 0.96, True),
    "cnn": Problem(digits_cnn, _cross_entropy, "test accuracy", 0.96, True, images=True),
    "autoencoder": Problem(
        lambda: _chain([64, 256, 128, 32, 8, 32, 128, 256, 64], nn.Tanh), _reconstruction, "train loss", 6.0, False
    ),
}


# -- methods --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """A learning-rate grid and how to build the optimizer for a model and a learning rate."""

    lrs: tuple[float, ...]
    build: Callable[[nn.Module, float], torch.optim.Optimizer]


def _ours(policy_default: sr.Method, *, clip: float | None = 1e-3, **options: Any) -> Callable[..., torch.optim.Optimizer]:
    return lambda model, lr: sr.Optimizer(model, sr.Policy(policy_default), lr=lr, momentum=0.9, clip=clip, **options)


KFAC_LRS = (0.03, 0.1, 0.3)
SINGD_LRS = (0.003, 0.01, 0.03)


def methods() -> dict[str, Method]:
    """Every method of the benchmark by label."""
    kfac = sr.KFAC(inverse_every=PERIOD)
    lowrank = {"rank": RANK, "inverse_every": PERIOD}
    table: dict[str, Method] = {
        "AdamW": Method((3e-4, 1e-3, 3e-3), lambda model, lr: torch.optim.AdamW(model.parameters(), lr=lr)),
        "SGD": Method((0.01, 0.03, 0.1), lambda model, lr: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)),
        "KFAC": Method(KFAC_LRS, _ours(kfac)),
        "RKFAC": Method(KFAC_LRS, _ours(sr.RKFAC(**lowrank))),
        "SREKFAC": Method(KFAC_LRS, _ours(sr.SREKFAC(**lowrank))),
        "BKFAC": Method(KFAC_LRS, _ours(sr.BKFAC(**lowrank))),
        "BRKFAC": Method(KFAC_LRS, _ours(sr.BRKFAC(**lowrank, refresh_every=PERIOD))),
        "BKFACC": Method(KFAC_LRS, _ours(sr.BKFACC(**lowrank, correct_every=PERIOD))),
    }
    for label, structure in (("diagonal", "diagonal"), ("block", sr.structures.Block(32)),
                             ("lowrank", sr.structures.LowRank(16, True)), ("dense", "dense")):
        table[f"SINGD-{label}"] = Method(SINGD_LRS, _ours(sr.SINGD(structure=structure, update_every=PERIOD), clip=None))
    table["SENG"] = Method(KFAC_LRS, _ours(sr.SENG(update_every=PERIOD), clip=None))
    for coarse in sr.methods.COARSE_SPACES:
        two_level = sr.TwoLevel(coarse=coarse, update_every=PERIOD)
        table[f"KFAC-2L-{coarse}"] = Method(KFAC_LRS, _ours(kfac, two_level=two_level))
    return table


# -- running ----------------------------------------------------------------------------------------------------------
def run(problem: Problem, method: Method, lr: float, data: Any, order: Sequence[Tensor], seed: int,
        eval_every: int, device: torch.device) -> dict[str, Any]:
    """One training run: losses, the metric every ``eval_every`` steps, steps and seconds to target."""
    torch.manual_seed(seed)
    model = problem.build().to(device)
    optimizer = method.build(model, lr)
    losses, evaluations = [], []
    steps_to_target = seconds_to_target = None
    seconds = 0.0
    for step, index in enumerate(order, start=1):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = problem.loss(model, data.x_train[index], data.y_train[index])
        loss.backward()
        optimizer.step()
        common.synchronize(device)
        seconds += time.perf_counter() - start
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        if step % eval_every == 0 or step == len(order):
            value = problem.evaluate(model, data)
            evaluations.append([step, value])
            if steps_to_target is None and problem.reached(value):
                steps_to_target, seconds_to_target = step, seconds
    finite = all(math.isfinite(x) for x in losses) and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {
        "lr": lr, "losses": losses, "evaluations": evaluations, "finite": finite, "seconds": seconds,
        "steps_to_target": steps_to_target, "seconds_to_target": seconds_to_target,
        "final_metric": evaluations[-1][1] if evaluations else None, "state_bytes": state_bytes(optimizer),
    }


def best_run(runs: Sequence[dict[str, Any]], problem: Problem) -> dict[str, Any]:
    """Fewest steps to target; among runs that miss it, the best final metric (finite runs first)."""
    def key(r: dict[str, Any]) -> tuple:
        metric = r["final_metric"] if r["finite"] else None
        score = math.inf if metric is None else (-metric if problem.higher_is_better else metric)
        return (not r["finite"], r["steps_to_target"] is None, r["steps_to_target"] or 0, score)

    return min(runs, key=key)


def summarize(problems: Sequence[str], labels: Sequence[str], raw: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in problems:
        problem = PROBLEMS[name]
        rows = {}
        for label in labels:
            best = best_run(raw[name][label], problem)
            rows[label] = {
                "best_lr": best["lr"], "steps_to_target": best["steps_to_target"],
                "seconds_to_target": best["seconds_to_target"], "final_metric": best["final_metric"],
                "all_finite": all(r["finite"] for r in raw[name][label]), "state_bytes": best["state_bytes"],
                "seconds_per_step": best["seconds"] / max(1, len(best["losses"])),
            }
        for label, row in rows.items():
            for baseline in ("AdamW", "KFAC"):
                other = rows.get(baseline)
                for what in ("steps_to_target", "seconds_to_target"):
                    ok = other is not None and row[what] is not None and other[what]
                    row[f"{what}_ratio_to_{baseline.lower()}"] = row[what] / other[what] if ok else None
        summary[name] = {"metric": problem.metric, "target": problem.target, "methods": rows}
    return summary


def report(summary: dict[str, Any]) -> None:
    for name, block in summary.items():
        rows = []
        for label, row in block["methods"].items():
            rows.append([
                label, f"{row['best_lr']:g}", row["steps_to_target"] or "—", common.fmt_ms(row["seconds_to_target"]),
                common.fmt_ratio(row["seconds_to_target_ratio_to_adamw"]), common.fmt_ratio(row["seconds_to_target_ratio_to_kfac"]),
                f"{row['final_metric']:.4g}" if row["final_metric"] is not None else "—", "yes" if row["all_finite"] else "NO",
            ])
        common.print_table(
            ["method", "lr", "steps", "time", "time/AdamW", "time/KFAC", block["metric"], "finite"], rows,
            title=f"{name}: target {block['metric']} {'≥' if PROBLEMS[name].higher_is_better else '≤'} {block['target']}",
        )


def figure(summary: dict[str, Any], raw: dict[str, Any], labels: Sequence[str]) -> Any:
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 5.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        problem = PROBLEMS[name]
        for label in labels:
            best = best_run(raw[name][label], problem)
            if not best["evaluations"]:
                continue
            steps, values = zip(*best["evaluations"])
            ax.plot(steps, values, label=f"{label} (lr {best['lr']:g})", **common.method_style(label))
        ax.axhline(problem.target, color="grey", linewidth=0.8)
        ax.set_title(f"digits {name}")
        ax.set_xlabel("step")
        ax.set_ylabel(problem.metric)
        if not problem.higher_is_better:
            ax.set_yscale("log")
            common.plain_log_ticks(ax)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def parser() -> common.BenchParser:
    p = common.make_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", choices=tuple(PROBLEMS), metavar="NAME",
                   help=f"problems (default: all: {' '.join(PROBLEMS)}; quick: {' '.join(QUICK_PROBLEMS)})")
    p.add_argument("--methods", nargs="+", metavar="NAME", help="methods (default: all; quick: " + " ".join(QUICK_METHODS) + ")")
    p.add_argument("--steps", type=common.positive_int, default=None, metavar="N", help=f"steps per run (default: {STEPS})")
    p.add_argument("--eval-every", type=common.positive_int, default=None, metavar="N",
                   help=f"evaluate the target metric every N steps (default: {EVAL_EVERY})")
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = common.parse_args(p, argv)
    table = methods()
    labels = common.select(table, args.methods or (QUICK_METHODS if args.quick else None), p, "--methods")
    problems = list(args.problems or (QUICK_PROBLEMS if args.quick else PROBLEMS))
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    eval_every = args.eval_every or (QUICK_EVAL_EVERY if args.quick else EVAL_EVERY)
    config = {
        "data": "scikit-learn digits, standardised, 75 % stratified train split", "batch_size": BATCH, "steps": steps,
        "eval_every": eval_every, "problems": {n: {"metric": PROBLEMS[n].metric, "target": PROBLEMS[n].target} for n in problems},
        "methods": {label: {"lrs": list(table[label].lrs)} for label in labels}, "rank": RANK, "update_period": PERIOD,
        "momentum": 0.9, "clip": "1e-3 (K-FAC family, two-level), none (SINGD, SENG, baselines)",
    }
    payload = common.new_payload(NAME, args, config)
    with common.configured(args):
        for name in problems:
            problem = PROBLEMS[name]
            data = load_digits(args.device, images=problem.images, seed=args.seed)
            order = [i.to(args.device) for i in batch_order(len(data.y_train), steps, BATCH, args.seed)]
            payload["raw"][name] = {}
            for label in labels:
                print(f"{name}: {label} …", flush=True)
                payload["raw"][name][label] = [
                    run(problem, table[label], lr, data, order, args.seed, eval_every, args.device) for lr in table[label].lrs
                ]
    payload["summary"] = summarize(problems, labels, payload["raw"])
    report(payload["summary"])
    common.write_results(NAME, payload, figure(payload["summary"], payload["raw"], labels), args.out)
    return payload


if __name__ == "__main__":
    main()
