"""A small causal transformer language model on synthetic tokens: AdamW vs K-FAC, mixed SINGD bf16, B-KFAC.

Model (`build_lm`, plain ``torch.nn``, random initialisation): token and
position ``nn.Embedding`` → ``layers`` × ``nn.TransformerEncoderLayer``
(pre-norm, GELU, ``batch_first=True``, no dropout) under a causal mask →
``nn.LayerNorm`` → a bias-free ``nn.Linear`` head over the vocabulary, its
weight optionally tied to the token embedding.

Data (`token_batches`, generated, no downloads): a seeded process whose next
token repeats the token two back with probability `COPY` and otherwise follows
a fixed random bigram table with peaked rows (`bigram_table`), so
that attention helps (the copy needs the position two back) and the loss can
fall towards the process's own cross-entropy (`oracle_loss`), which is reported
as the floor.

Contenders (`POLICIES`): AdamW; K-FAC on every managed layer; the mixed policy
— SINGD with bf16 state on the embeddings and the blocks' MLPs, K-FAC on the
head; B-KFAC everywhere (a factor where Brand is not valid uses the exact
dense representation, see ``describe()``). ``nn.MultiheadAttention`` and the
norm layers go to the fallback rule (AdamW) in every policy of ours; a tied
embedding/head pair is one managed layer under the embedding's method. All contenders train from the same initial
weights on the same batches, advanced one step each in turn (A B C A B C …),
so the per-step times are interleaved. Reported: the loss curve, the final loss
(mean of the last `TAIL` steps) and its ratio to AdamW's, the seconds per step,
the persistent optimizer state, and whether every value stayed finite.

    python benchmarks/lm.py [--methods AdamW KFAC] [--steps 300] [--tying untied tied] [--device cuda]
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

import common
import singd_rkfac as sr
from singd_rkfac.optimizer import state_bytes

NAME = "lm"
#: Probability that the next token repeats the token two back (else: the bigram table).
COPY = 0.3
#: Scale of the bigram table's logits (large: peaked rows, a few likely successors per token).
SHARPNESS = 3.0
#: Final loss = mean of the last this many steps' losses.
TAIL = 20
TYINGS = ("untied", "tied")


@dataclass(frozen=True)
class Size:
    """Model and batch sizes of one run."""

    vocab: int
    dim: int
    layers: int
    heads: int
    context: int
    batch: int
    steps: int


SIZES = {
    "full": Size(vocab=512, dim=64, layers=2, heads=4, context=32, batch=8, steps=600),
    "quick": Size(vocab=64, dim=16, layers=1, heads=2, context=8, batch=4, steps=6),
}


# -- model ------------------------------------------------------------------------------------------
class TinyLM(nn.Module):
    """Token + position embeddings, causal pre-norm transformer blocks, final norm, linear head."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        for table in (self.embed, self.pos):  # GPT-2's scale: a tied head starts near uniform logits
            nn.init.normal_(table.weight, std=0.02)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(batch, positions, vocab)`` of ``(batch, positions)`` token ids."""
        n, t = tokens.shape
        # positions as a (batch, positions) index tensor: the leading dimension is the batch for every layer
        positions = torch.arange(t, device=tokens.device).expand(n, t)
        h = self.embed(tokens) + self.pos(positions)
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device, dtype=h.dtype)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def build_lm(vocab: int, dim: int, layers: int, tied: bool, *, heads: int = 2, context: int = 32) -> TinyLM:
    """A `TinyLM` (random initialisation from torch's current RNG)."""
    return TinyLM(vocab, dim, layers, heads, context, tied)


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean next-token cross-entropy over every position of the batch."""
    tokens, targets = batch
    logits = model(tokens)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))  # fp32 under autocast


# -- data --------------------------------------------------------------------------------------------
def bigram_table(vocab: int, seed: int) -> Tensor:
    """The process's fixed next-token distribution given the current token: ``(vocab, vocab)``, rows sum to 1.

    Row ``i`` is ``softmax(SHARPNESS · z_i)`` with standard normal ``z_i``: a
    few likely successors per token.
    """
    generator = torch.Generator().manual_seed(seed)
    logits = SHARPNESS * torch.randn(vocab, vocab, generator=generator, dtype=torch.float64)
    return torch.softmax(logits, dim=1)


def sample_sequences(table: Tensor, count: int, length: int, generator: torch.Generator) -> Tensor:
    """``count`` sequences of ``length`` tokens: copy the token two back w.p. `COPY`, else follow ``table``."""
    vocab = table.shape[0]
    tokens = torch.empty(count, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (count,), generator=generator)
    for t in range(1, length):
        follow = torch.multinomial(table[tokens[:, t - 1]], 1, generator=generator).squeeze(1)
        if t >= 2:
            copy = torch.rand(count, generator=generator) < COPY
            follow = torch.where(copy, tokens[:, t - 2], follow)
        tokens[:, t] = follow
    return tokens


def token_batches(
    vocab: int, context: int, batch_size: int, count: int, *, seed: int = 0, device: torch.device | str = "cpu"
) -> list[tuple[Tensor, Tensor]]:
    """``count`` batches ``(tokens, targets)``, each ``(batch_size, context)``: targets are the next tokens.

    The bigram table is fixed by ``seed`` (the same process for every call
    with that seed); the batches are drawn from it with a generator seeded
    by ``seed + 1``.
    """
    table = bigram_table(vocab, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(count):
        sequences = sample_sequences(table, batch_size, context + 1, generator)
        batches.append((sequences[:, :-1].to(device), sequences[:, 1:].to(device)))
    return batches


def oracle_loss(batches: list[tuple[Tensor, Tensor]], vocab: int, seed: int = 0) -> float:
    """Mean cross-entropy of the generating process itself on ``batches`` (the floor a model can reach)."""
    table = bigram_table(vocab, seed)
    total, count = 0.0, 0
    for tokens, targets in batches:
        tokens, targets = tokens.cpu(), targets.cpu()
        p = (1.0 - COPY) * table[tokens, targets]
        p[:, 1:] += COPY * (targets[:, 1:] == tokens[:, :-1]).double()  # the token two back of target t is tokens[t-1]
        p[:, 0] = table[tokens[:, 0], targets[:, 0]]  # position 0: no token two back yet
        total += float(-p.log().sum())
        count += targets.numel()
    return total / count


# -- contenders --------------------------------------------------------------------------------------
ADAMW_LR = 1e-2
KFAC_LR = 0.2
#: Damping of the K-FAC family here (1e-3, the default, takes visibly smaller steps on this model).
KFAC_DAMPING = 1e-2
SINGD_LR = 0.5
MOMENTUM = 0.9
#: KL clip of ours: the default 1e-3 limits every step of this model (the step no longer depends on lr).
CLIP = 1e-2
LOWRANK_RANK = 16
FALLBACK = {"fallback": "adamw", "fallback_options": {"lr": ADAMW_LR}}


def _ours(policy: sr.Policy, lr: float, momentum: float = 0.0) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda model: sr.Optimizer(model, policy, lr=lr, momentum=momentum, clip=CLIP, **FALLBACK)


KFAC_METHOD = sr.KFAC(inverse_every=5, damping=KFAC_DAMPING)


def mixed_policy(model: nn.Module, singd: sr.SINGD, kfac: sr.KFAC) -> tuple[sr.Policy, str]:
    """``singd`` on every managed layer but the head — the last ``nn.Linear`` in module order — which gets ``kfac``.

    Returns the policy and the head's name. The rule matches the head module itself, so it works for any model
    that ends in a linear layer.
    """
    name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return sr.Policy(singd, rules=[(lambda _, module: module is head, kfac)]), name


def set_group(optimizer: torch.optim.Optimizer, name: str, **options: Any) -> None:
    """Update the param group of managed layer ``name`` (`sr.Optimizer` names one group per layer after it)."""
    for group in optimizer.param_groups:
        if group["name"] == name:
            group.update(options)


def _mixed(model: nn.Module) -> torch.optim.Optimizer:
    """SINGD with bf16 state (SINGD's lr and momentum) on every managed layer but the head: K-FAC (K-FAC's lr)."""
    policy, head = mixed_policy(model, sr.SINGD(dtype=torch.bfloat16, update_every=5), KFAC_METHOD)
    optimizer = _ours(policy, SINGD_LR, MOMENTUM)(model)
    set_group(optimizer, head, lr=KFAC_LR, momentum=0.0)
    return optimizer


#: Optimizer builders by label; ours leave attention and norms to AdamW.
POLICIES: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "AdamW": lambda model: torch.optim.AdamW(model.parameters(), lr=ADAMW_LR),
    "KFAC": _ours(sr.Policy(KFAC_METHOD), KFAC_LR),
    "SINGD": _ours(sr.Policy(sr.SINGD(update_every=5)), SINGD_LR, MOMENTUM),
    "SINGD-bf16+KFAC-head": _mixed,
    "BKFAC": _ours(sr.Policy(sr.BKFAC(rank=LOWRANK_RANK, inverse_every=5, damping=KFAC_DAMPING)), KFAC_LR),
}
#: The benchmark's default contenders (`run_lm` takes every `POLICIES` label).
DEFAULT_METHODS = ("AdamW", "KFAC", "SINGD-bf16+KFAC-head", "BKFAC")


class LMRun:
    """One contender: model, optimizer, losses and step times, advanced one step per call."""

    def __init__(self, label: str, model: nn.Module, autocast: torch.dtype | None, device: torch.device) -> None:
        self.label, self.model, self.autocast, self.device = label, model, autocast, device
        self.optimizer = POLICIES[label](model)
        self.losses: list[float | None] = []
        self.seconds: list[float] = []

    def step(self, batch: tuple[Tensor, Tensor]) -> None:
        common.synchronize(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            loss = lm_loss(self.model, batch)
        loss.backward()
        self.optimizer.step()
        common.synchronize(self.device)
        self.seconds.append(time.perf_counter() - start)
        value = float(loss.detach())
        self.losses.append(value if math.isfinite(value) else None)

    def result(self) -> dict[str, Any]:
        tail = self.losses[-TAIL:]
        finite = all(v is not None for v in self.losses) and all(
            bool(torch.isfinite(p).all()) for p in self.model.parameters()
        )
        pre = getattr(self.optimizer, "preconditioner", None)
        return {
            "losses": self.losses,
            "first_loss": self.losses[0],
            "final_loss": sum(tail) / len(tail) if all(v is not None for v in tail) else None,
            "finite": finite,
            "seconds_per_step": self.seconds,
            "median_seconds_per_step": common.median(self.seconds),
            "state_bytes": state_bytes(self.optimizer),
            "managed": [] if pre is None else list(pre.layers),
            "fallback": [] if pre is None else [p.name for p in pre.fallback_plans],
        }


def _runs(labels: list[str], size: Size, tied: bool, device: torch.device, autocast: torch.dtype | None,
          seed: int) -> list[LMRun]:
    torch.manual_seed(seed)
    initial = build_lm(size.vocab, size.dim, size.layers, tied, heads=size.heads, context=size.context)
    runs = []
    for label in labels:
        model = build_lm(size.vocab, size.dim, size.layers, tied, heads=size.heads, context=size.context)
        model.load_state_dict(initial.state_dict())
        runs.append(LMRun(label, model.to(device), autocast, device))
    return runs


def _autocast(dtype: torch.dtype | None) -> torch.dtype | None:
    return None if dtype in (None, torch.float32) else dtype


def train_interleaved(labels: list[str], size: Size, tied: bool, device: torch.device, dtype: torch.dtype | None,
                      seed: int = 0) -> dict[str, Any]:
    """Train every contender from the same weights on the same batches, one step each in turn."""
    batches = token_batches(size.vocab, size.context, size.batch, size.steps, seed=seed, device=device)
    runs = _runs(labels, size, tied, device, _autocast(dtype), seed)
    for batch in batches:
        for run in runs:
            run.step(batch)
    return {"oracle_loss": oracle_loss(batches, size.vocab, seed), **{run.label: run.result() for run in runs}}


def run_lm(policy_name: str, steps: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
           *, tied: bool = False, size: str = "quick", seed: int = 0) -> dict[str, Any]:
    """Train the LM of ``size`` (`SIZES`) with one `POLICIES` contender for ``steps`` steps.

    ``dtype``: the forward's autocast dtype (``None`` or ``torch.float32``:
    none). Returns the losses, the final loss, finiteness, the seconds per
    step, the optimizer-state bytes, the managed and fallback modules, and the
    process's own loss (``oracle_loss``) on the same batches.
    """
    if policy_name not in POLICIES:
        raise ValueError(f"unknown policy {policy_name!r}; choose from {', '.join(POLICIES)}")
    chosen = Size(**{**asdict(SIZES[size]), "steps": steps})
    result = train_interleaved([policy_name], chosen, tied, torch.device(device), dtype, seed)
    return {"oracle_loss": result["oracle_loss"], **result[policy_name]}


# -- summary, table, plot -----------------------------------------------------------------------------
def summarize(raw: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    rows = []
    for tying, runs in raw.items():
        adamw = runs.get("AdamW", {}).get("final_loss")
        for label in labels:
            run = runs[label]
            final = run["final_loss"]
            rows.append({
                "tying": tying, "method": label, "first_loss": run["first_loss"], "final_loss": final,
                "ratio_to_adamw": None if final is None or not adamw else final / adamw,
                "oracle_loss": runs["oracle_loss"], "finite": run["finite"],
                "median_seconds_per_step": run["median_seconds_per_step"], "state_bytes": run["state_bytes"],
                "managed": len(run["managed"]),
            })
    return {"rows": rows}


def report(summary: dict[str, Any]) -> None:
    headers = ["tying", "method", "first loss", f"final loss (last {TAIL})", "× AdamW", "process floor", "ms/step",
               "state", "managed layers", "finite"]
    body = [
        [r["tying"], r["method"], f"{r['first_loss']:.3f}",
         "NaN" if r["final_loss"] is None else f"{r['final_loss']:.3f}", common.fmt_ratio(r["ratio_to_adamw"]),
         f"{r['oracle_loss']:.3f}", common.fmt_ms(r["median_seconds_per_step"]), common.format_bytes(r["state_bytes"]),
         r["managed"], r["finite"]]
        for r in summary["rows"]
    ]
    common.print_table(headers, body, "tiny causal transformer LM on synthetic tokens (same weights, same batches)")


def figure(raw: dict[str, Any], labels: list[str]) -> Any:
    fig = common.new_figure(5.0 * len(raw), 4.0)
    if fig is None:
        return None
    axes = fig.subplots(1, len(raw), squeeze=False)[0]
    for ax, (tying, runs) in zip(axes, raw.items()):
        for label in labels:
            losses = torch.tensor([math.nan if v is None else v for v in runs[label]["losses"]])
            window = min(TAIL, len(losses))
            smoothed = losses.unfold(0, window, 1).mean(dim=1)  # NaN propagates: a diverged run stops
            ax.plot(range(window, len(losses) + 1), smoothed.tolist(), label=label, **_style(label))
        ax.axhline(runs["oracle_loss"], color="black", linewidth=0.8, label="process floor")
        ax.set_xlabel("step")
        ax.set_ylabel(f"next-token cross-entropy ({TAIL}-step mean)")
        ax.set_title(f"{tying} embedding / head", fontsize="small")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    return fig


def _style(label: str) -> dict[str, Any]:
    style = common.method_style({"SINGD": "SINGD-dense", "SINGD-bf16+KFAC-head": "SINGD-dense-bf16"}.get(label, label))
    style.pop("marker", None)
    return style


# -- main ----------------------------------------------------------------------------------------------
def parser() -> common.BenchParser:
    p = common.make_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help=f"contenders (default: {' '.join(DEFAULT_METHODS)}; any of {', '.join(POLICIES)})")
    p.add_argument("--steps", type=common.positive_int, default=None, metavar="N",
                   help=f"training steps (default: {SIZES['full'].steps}; quick: {SIZES['quick'].steps})")
    p.add_argument("--tying", nargs="+", choices=TYINGS, default=list(TYINGS),
                   help="untied and/or tied embedding and head (default: both)")
    p.add_argument("--autocast", choices=("none", "bf16"), default="none",
                   help="autocast dtype of the forward pass (default: none)")
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = common.parse_args(p, argv)
    labels = common.select(POLICIES, args.methods or list(DEFAULT_METHODS), p, "--methods")
    if "AdamW" not in labels:  # every ratio is to AdamW
        labels = common.select(POLICIES, ["AdamW", *labels], p, "--methods")
    base = SIZES["quick" if args.quick else "full"]
    size = Size(**{**asdict(base), "steps": args.steps or base.steps})
    autocast = torch.bfloat16 if args.autocast == "bf16" else None
    config = {
        "model": f"TinyLM: token + position nn.Embedding, {size.layers} × nn.TransformerEncoderLayer (pre-norm, GELU, "
                 f"{size.heads} heads, causal mask), LayerNorm, bias-free head",
        "size": asdict(size),
        "data": f"generated: next token = the token two back w.p. {COPY}, else a fixed random bigram table "
                f"(rows softmax({SHARPNESS}·N(0, 1))); seed {args.seed}",
        "methods": labels, "tying": args.tying, "autocast": args.autocast,
        "hyperparameters": {
            "AdamW": {"lr": ADAMW_LR},
            "K-FAC family": {"lr": KFAC_LR, "damping": KFAC_DAMPING, "inverse_every": 5, "clip": CLIP,
                             "rank": LOWRANK_RANK},
            "SINGD": {"lr": SINGD_LR, "momentum": MOMENTUM, "update_every": 5, "clip": CLIP},
            "SINGD-bf16+KFAC-head": "SINGD's lr and momentum, the head K-FAC's lr without momentum (its param group)",
            "fallback (attention, norms, tied embedding/head)": {"rule": "adamw", "lr": ADAMW_LR},
        },
        "timing": "contenders advanced one step each in turn (interleaved); median seconds per step",
        "final_loss": f"mean of the last {TAIL} minibatch losses",
    }
    payload = common.new_payload(NAME, args, config)
    with common.configured(args), common.Progress(len(args.tying), NAME) as progress:
        for tying in args.tying:
            progress.next(f"{tying}: training {', '.join(labels)} for {size.steps} steps")
            payload["raw"][tying] = train_interleaved(labels, size, tying == "tied", args.device, autocast, args.seed)
    payload["summary"] = summarize(payload["raw"], labels)
    report(payload["summary"])
    common.write_results(NAME, payload, figure(payload["raw"], labels), args.out)
    return payload


if __name__ == "__main__":
    main()
