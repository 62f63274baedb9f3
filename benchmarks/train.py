"""Time- and steps-to-target on digits and a tiny transformer LM for every method, each with its own learning-rate grid.

Problems (``--problems``), each with the same batch order and initial weights
for every run:

* ``classifier``: MLP 64 → 256 → 256 → 10, ReLU, cross-entropy on
  scikit-learn digits (batch 128 from shuffled epochs); target: test
  accuracy ≥ 0.96.
* ``cnn``: the package's digits CNN; target: test accuracy ≥ 0.96.
* ``autoencoder``: 64 → 256 → 128 → 32 → 8 → 32 → 128 → 256 → 64, tanh,
  per-sample squared error ½‖x̂ − x‖² averaged over the batch; target:
  train-set loss ≤ 6, i.e. under a fifth of the initial ≈ 32.
* ``lm``: ``lm.py``'s causal transformer LM on its generated tokens, smaller
  than ``lm.py``'s "full" size so that all methods fit in a few minutes on 2
  CPU cores: vocabulary 128, width 32, one block of 2 heads, context 16,
  batches of 16 sequences, untied head. Metric: next-token cross-entropy on
  256 held-out sequences of the same process (drawn before the training
  batches); target ≤ 3.2, which AdamW at its best learning rate reaches after
  about two thirds of the default 300 steps (uniform: ln 128 ≈ 4.85; the
  process's own cross-entropy on the held-out set, the floor, is in the JSON
  config as ``oracle_loss``, ≈ 2.07).

Every method trains with each learning rate of its grid for ``--steps`` steps
(momentum 0.9 for SGD and ours; ours keep a KL clip — 1e-3, the optimizer's
default, on digits and ``lm.py``'s 1e-2 on the LM — except SINGD and SENG,
whose update rules are the reference papers' — no clip); the metric
is evaluated every ``--eval-every`` steps. Parameters no curvature method
manages (attention's projections, norms; SENG: embeddings) go to ours'
fallback, AdamW at ``lm.py``'s learning rate 1e-2 (the digits models have
none). Reported per method: the best learning rate (fewest steps to target,
then the best final metric), its steps and seconds to target (training time
only, evaluation excluded) and their ratios to AdamW's and to K-FAC's (each
at its own best learning rate), the final metric, and whether every run
stayed finite. The plot shows each method's best run.

Methods: the baselines AdamW and SGD; K-FAC and its low-rank family (rank
32; a factor where Brand is not valid — rank + rows ≥ its dimension — uses
the exact representation, as ``describe()`` says); SINGD with diagonal,
block (32), low-rank (16) and dense structures (T = 10, fp32); SENG
(``update_every`` 10, damping 1); ``Mixed`` (SINGD-bf16 + K-FAC head):
SINGD diagonal with bf16 state on every managed layer but the last
``nn.Linear`` (the head), K-FAC on the head at 10 × the learning rate, with
K-FAC's clip (without it the head's early steps blow up the LM's loss);
two-level K-FAC (K-FAC fine level plus each coarse space, refreshed every 10
steps). DESIGN §3.5 quotes the two-level paper's finding that it does not
beat plain K-FAC: the ratios to K-FAC test it. Every method keeps its
digits settings on the LM (K-FAC damping 1e-3); ``lm.py`` runs K-FAC there
with damping 1e-2, which is what it needs to match AdamW.

    python benchmarks/train.py [--problems classifier lm] [--methods KFAC SENG Mixed ...] [--steps 300]
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

import common
import lm
import singd_rkfac as sr
from singd_rkfac.data import Digits, batch_order, digits_cnn, load_digits
from singd_rkfac.optimizer import state_bytes

NAME = "train"
STEPS, QUICK_STEPS = 300, 6
EVAL_EVERY, QUICK_EVAL_EVERY = 10, 3
BATCH = 128
RANK = 32
PERIOD = 10
QUICK_PROBLEMS = ("classifier", "autoencoder", "lm")
QUICK_METHODS = ("AdamW", "KFAC", "SENG", "Mixed", "KFAC-2L-nicolaides")


# -- problems -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Data:
    """What the runs of a problem consume: the training batches in order and the target metric of a model.

    ``info``: facts about the data for the JSON config (the LM's process floor).
    """

    batches: list[Any]
    evaluate: Callable[[nn.Module], float]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Problem:
    """A model, its loss on one batch, its data ``(steps, seed, device) -> Data``, the metric that decides the target."""

    title: str
    source: str
    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, Any], Tensor]
    data: Callable[[int, int, torch.device], Data]
    metric: str
    target: float
    higher_is_better: bool
    #: KL clip of the methods that use one (K-FAC family, two-level, Mixed).
    clip: float = 1e-3

    def reached(self, value: float) -> bool:
        return value >= self.target if self.higher_is_better else value <= self.target


def _chain(sizes: Sequence[int], activation: Callable[[], nn.Module]) -> nn.Sequential:
    layers: list[tuple[str, nn.Module]] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append((f"act{i}", activation()))
        layers.append((f"fc{i + 1}", nn.Linear(fan_in, fan_out)))
    return nn.Sequential(OrderedDict(layers))


def _cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _reconstruction(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """½‖x̂ − x‖² per sample, averaged over the batch (a per-sample loss: ``loss_average="batch"``)."""
    x, _ = batch
    return 0.5 * (model(x) - x).square().sum(dim=1).mean()


def _test_accuracy(model: nn.Module, digits: Digits) -> float:
    return (model(digits.x_test).argmax(dim=1) == digits.y_test).float().mean().item()


def _train_reconstruction(model: nn.Module, digits: Digits) -> float:
    return _reconstruction(model, (digits.x_train, digits.y_train)).item()


DIGITS = f"scikit-learn digits, standardised, 75 % stratified train split, batches of {BATCH}"


def _digits(evaluate: Callable[[nn.Module, Digits], float], images: bool = False) -> Callable[..., Data]:
    """Batches of `BATCH` from shuffled epochs of the train split (the same for every run); ``evaluate`` on the split."""
    def data(steps: int, seed: int, device: torch.device) -> Data:
        digits = load_digits(device, images=images, seed=seed)
        order = [i.to(device) for i in batch_order(len(digits.y_train), steps, BATCH, seed)]
        return Data([(digits.x_train[i], digits.y_train[i]) for i in order], lambda model: evaluate(model, digits))

    return data


#: The LM problem's model and batch: smaller than ``lm.py``'s "full" (vocabulary 512, 2 blocks, context 32) so
#: that every method's grid fits in a few minutes on 2 CPU cores. ``steps`` is unused here (``--steps``).
LM_SIZE = lm.Size(vocab=128, dim=32, layers=1, heads=2, context=16, batch=16, steps=STEPS)
#: Batches of held-out sequences (``LM_SIZE.batch`` each) behind the LM's metric, drawn before the training batches.
LM_HELD_OUT = 16


def _lm_data(steps: int, seed: int, device: torch.device) -> Data:
    """Held-out sequences, then ``steps`` training batches, from one run of ``lm.token_batches``' process."""
    size = LM_SIZE
    batches = lm.token_batches(size.vocab, size.context, size.batch, LM_HELD_OUT + steps, seed=seed, device=device)
    held_out = tuple(torch.cat(parts) for parts in zip(*batches[:LM_HELD_OUT]))  # (tokens, targets)
    return Data(batches[LM_HELD_OUT:], lambda model: lm.lm_loss(model, held_out).item(),
                {"oracle_loss": lm.oracle_loss([held_out], size.vocab, seed)})


def _lm() -> nn.Module:
    size = LM_SIZE
    return lm.build_lm(size.vocab, size.dim, size.layers, tied=False, heads=size.heads, context=size.context)


PROBLEMS: dict[str, Problem] = {
    "classifier": Problem("digits classifier", DIGITS, lambda: _chain([64, 256, 256, 10], nn.ReLU), _cross_entropy,
                          _digits(_test_accuracy), "test accuracy", 0.96, True),
    "cnn": Problem("digits CNN", DIGITS, digits_cnn, _cross_entropy, _digits(_test_accuracy, images=True),
                   "test accuracy", 0.96, True),
    "autoencoder": Problem(
        "digits autoencoder", DIGITS, lambda: _chain([64, 256, 128, 32, 8, 32, 128, 256, 64], nn.Tanh), _reconstruction,
        _digits(_train_reconstruction), "train loss", 6.0, False,
    ),
    "lm": Problem(
        "tiny transformer LM",
        f"lm.py's TinyLM (vocabulary {LM_SIZE.vocab}, width {LM_SIZE.dim}, {LM_SIZE.layers} block(s) of {LM_SIZE.heads} "
        f"heads, untied head) on its generated tokens (the token two back w.p. {lm.COPY}, else a bigram table); "
        f"batches of {LM_SIZE.batch} sequences of {LM_SIZE.context}, {LM_HELD_OUT * LM_SIZE.batch} held out",
        _lm, lm.lm_loss, _lm_data, "held-out loss", 3.2, False, clip=lm.CLIP,
    ),
}


# -- methods --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """A learning-rate grid and how to build the optimizer for a model, a learning rate and the problem's KL clip."""

    lrs: tuple[float, ...]
    build: Callable[[nn.Module, float, float], torch.optim.Optimizer]


def _ours(policy_default: sr.Method, *, clipped: bool = True, **options: Any) -> Callable[..., torch.optim.Optimizer]:
    """sr.Optimizer with one method on every managed layer (KL clip: the problem's, or none unless ``clipped``);
    the rest (attention, norms) to ``lm.FALLBACK`` (AdamW)."""
    return lambda model, lr, clip: sr.Optimizer(model, sr.Policy(policy_default), lr=lr, momentum=0.9,
                                                clip=clip if clipped else None, **lm.FALLBACK, **options)


KFAC_LRS = (0.03, 0.1, 0.3)
SINGD_LRS = (0.003, 0.01, 0.03)
#: The Mixed method's head (K-FAC) learning rate over its SINGD learning rate: K-FAC's grid over SINGD's.
HEAD_LR_FACTOR = 10.0


def _mixed(kfac: sr.KFAC) -> Callable[[nn.Module, float], torch.optim.Optimizer]:
    """SINGD diagonal with bf16 state on every managed layer at ``lr``, K-FAC on the head at `HEAD_LR_FACTOR` × ``lr``."""
    singd = sr.SINGD(structure="diagonal", dtype=torch.bfloat16, update_every=PERIOD)

    def build(model: nn.Module, lr: float, clip: float) -> torch.optim.Optimizer:
        policy, head = lm.mixed_policy(model, singd, kfac)
        optimizer = sr.Optimizer(model, policy, lr=lr, momentum=0.9, clip=clip, **lm.FALLBACK)
        lm.set_group(optimizer, head, lr=HEAD_LR_FACTOR * lr)
        return optimizer

    return build


def methods() -> dict[str, Method]:
    """Every method of the benchmark by label."""
    kfac = sr.KFAC(inverse_every=PERIOD)
    lowrank = {"rank": RANK, "inverse_every": PERIOD}
    table: dict[str, Method] = {
        "AdamW": Method((3e-4, 1e-3, 3e-3), lambda model, lr, clip: torch.optim.AdamW(model.parameters(), lr=lr)),
        "SGD": Method((0.01, 0.03, 0.1), lambda model, lr, clip: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)),
        "KFAC": Method(KFAC_LRS, _ours(kfac)),
        "RKFAC": Method(KFAC_LRS, _ours(sr.RKFAC(**lowrank))),
        "SREKFAC": Method(KFAC_LRS, _ours(sr.SREKFAC(**lowrank))),
        "BKFAC": Method(KFAC_LRS, _ours(sr.BKFAC(**lowrank))),
        "BRKFAC": Method(KFAC_LRS, _ours(sr.BRKFAC(**lowrank, refresh_every=PERIOD))),
        "BKFACC": Method(KFAC_LRS, _ours(sr.BKFACC(**lowrank, correct_every=PERIOD))),
    }
    for label, structure in (("diagonal", "diagonal"), ("block", sr.structures.Block(32)),
                             ("lowrank", sr.structures.LowRank(16, True)), ("dense", "dense")):
        table[f"SINGD-{label}"] = Method(SINGD_LRS, _ours(sr.SINGD(structure=structure, update_every=PERIOD), clipped=False))
    table["SENG"] = Method(KFAC_LRS, _ours(sr.SENG(update_every=PERIOD), clipped=False))
    table["Mixed"] = Method(SINGD_LRS, _mixed(kfac))
    for coarse in sr.methods.COARSE_SPACES:
        two_level = sr.TwoLevel(coarse=coarse, update_every=PERIOD)
        table[f"KFAC-2L-{coarse}"] = Method(KFAC_LRS, _ours(kfac, two_level=two_level))
    return table


# -- running ----------------------------------------------------------------------------------------------------------
def run(problem: Problem, method: Method, lr: float, data: Data, seed: int, eval_every: int,
        device: torch.device) -> dict[str, Any]:
    """One training run: losses, the metric every ``eval_every`` steps, steps and seconds to target."""
    torch.manual_seed(seed)
    model = problem.build().to(device)
    optimizer = method.build(model, lr, problem.clip)
    losses, evaluations = [], []
    steps_to_target = seconds_to_target = None
    seconds = 0.0
    for step, batch in enumerate(data.batches, start=1):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = problem.loss(model, batch)
        loss.backward()
        optimizer.step()
        common.synchronize(device)
        seconds += time.perf_counter() - start
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        if step % eval_every == 0 or step == len(data.batches):
            with torch.no_grad():
                value = data.evaluate(model)
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


#: `common.method_style` labels of the same structure (Mixed: dashed like bf16 SINGD diagonal).
STYLE_ALIASES = {"SINGD-block": "SINGD-block32", "SINGD-lowrank": "SINGD-lowrank16", "Mixed": "SINGD-diagonal-bf16"}


def figure(summary: dict[str, Any], raw: dict[str, Any], labels: Sequence[str]) -> Any:
    import matplotlib.pyplot as plt

    names = list(summary)
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 5.0 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        problem = PROBLEMS[name]
        for label in labels:
            best = best_run(raw[name][label], problem)
            if not best["evaluations"]:
                continue
            steps, values = zip(*best["evaluations"])
            style = common.method_style(STYLE_ALIASES.get(label, label))
            ax.plot(steps, values, label=f"{label} (lr {best['lr']:g})", **style)
        ax.axhline(problem.target, color="grey", linewidth=0.8)
        ax.set_title(problem.title)
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
        "steps": steps, "eval_every": eval_every,
        "problems": {n: {"data": PROBLEMS[n].source, "metric": PROBLEMS[n].metric, "target": PROBLEMS[n].target}
                     for n in problems},
        "methods": {label: {"lrs": list(table[label].lrs)} for label in labels}, "rank": RANK, "update_period": PERIOD,
        "momentum": 0.9, "clip": {n: PROBLEMS[n].clip for n in problems},
        "clipped": "K-FAC family, two-level, Mixed (SINGD, SENG and the baselines: no clip)",
        "fallback": lm.FALLBACK, "mixed_head_lr_factor": HEAD_LR_FACTOR, "seed": args.seed,
    }
    payload = common.new_payload(NAME, args, config)
    with common.configured(args), common.Progress(len(problems) * len(labels), NAME) as progress:
        for name in problems:
            problem = PROBLEMS[name]
            data = problem.data(steps, args.seed, args.device)
            payload["config"]["problems"][name].update(data.info)
            payload["raw"][name] = {}
            for label in labels:
                progress.next(f"{name}: {label}")
                payload["raw"][name][label] = [
                    run(problem, table[label], lr, data, args.seed, eval_every, args.device) for lr in table[label].lrs
                ]
    payload["summary"] = summarize(problems, labels, payload["raw"])
    report(payload["summary"])
    common.write_results(NAME, payload, figure(payload["summary"], payload["raw"], labels), args.out)
    return payload


if __name__ == "__main__":
    main()
