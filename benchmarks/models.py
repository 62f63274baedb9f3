"""Real models (issue 18): coverage of transformers / timm / torchvision models, ResNet-18 step time, GPT-2 memory.

Three questions, each a section (``--sections``), on models built from tiny
configs (random weights, nothing downloaded):

1. **coverage** — for transformers ``GPT2LMHeadModel``, ``BertForMaskedLM``,
   ``LlamaForCausalLM`` (2 layers, width 64, vocabulary 1000), timm
   ``resnet18``, ``vit_tiny_patch16_224`` (32×32 images, 4×4 patches),
   ``convnext_atto``, ``mobilenetv3_small_050``, ``efficientnet_b0`` and
   torchvision ``resnet18`` (10 classes, 32×32 images): which share of the
   trainable parameters a curvature method manages under
   ``sr.Policy(sr.KFAC())``, ``sr.Policy(sr.SINGD(structure="diagonal"))``
   and the default ``sr.Policy()`` (managed = the built optimizer's
   ``Preconditioner.managed_parameters()``; the count of the layers
   ``policy.plan(model)`` gives a method is recorded too), which modules go to the fallback
   rule and why, and whether `COVERAGE_STEPS` steps in fp32 and under
   ``torch.autocast(dtype=torch.bfloat16)`` stay finite (the losses are
   recorded). A model family whose package does not import is recorded as
   skipped, with the reason.
2. **timing** — timm and torchvision ``resnet18`` (10 classes), 32×32 images,
   batch 8: seconds per training step (forward, backward, optimizer step) of
   the default policy ``sr.Optimizer(model, sr.Policy(), lr=0.01)``, of
   ``sr.Policy(sr.KFAC())`` and of ``torch.optim.AdamW``, from the same
   weights on the same batches. One sample = a whole update period of
   `PERIOD_STEPS` consecutive steps (K-FAC's ``inverse_every``), so the
   refresh steps are included; the contenders' periods are interleaved
   (A B C A B C …) after `WARMUP_STEPS` warm-up steps each (the first holds
   the first refresh), the median of ``--repeats`` periods is reported with
   its ratio to AdamW's.
3. **memory** — GPT-2 shaped with the full vocabulary of 50 257 tokens, width
   64 (2 layers, 2 heads, 64 positions), with GPT-2's tied embedding/head and
   untied: the default policy's curvature state after `MEMORY_STEPS` steps on
   batches of 4 × 32 tokens (``sum(opt.memory_bytes().values())``) against
   AdamW's state (exp_avg + exp_avg_sq), their ratio, ``opt.describe()``, and
   the growth of the peak RSS (``VmHWM``, reset before the optimizer is built)
   of a fresh process per configuration. Before anything is built, the
   policy's own estimate (``Policy.describe``: estimate_bytes of each layer's
   curvature class) is checked against ``--memory-limit-gib``: a
   configuration over it is recorded as skipped, with the estimate; a
   ``MemoryError`` / ``RuntimeError`` during the run is recorded as a failure
   with its message; each process's address space is capped
   (``--memory-headroom-gib`` above its size before the optimizer is built),
   so that a transient allocation fails there rather than exhausting the
   machine.

In both sections a policy that resolves to the same per-layer methods as one
already run (before issue 18's fixes, the default policy is plain K-FAC) is not
run again unless ``--run-identical``: its rows repeat that one's numbers and
name it (``same_as``).

``--quick`` (the smoke test): tiny transformers configs (vocabulary 128,
width 32, one layer), a plain-torch residual CNN (`TinyResNet`) in place of
the ResNet-18s for the timing and as a coverage control, steps only where they
are cheap, one timed period, and a GPT-2 vocabulary of `QUICK_MEMORY_VOCAB`
in the memory section.

    python benchmarks/models.py [--sections coverage timing memory] [--models gpt2 timm-resnet18 ...]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import re
import time
import warnings
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

import common
import singd_rkfac as sr

NAME = "models"
SECTIONS = ("coverage", "timing", "memory")

#: The policies of the coverage section, by label.
POLICIES: dict[str, Callable[[], sr.Policy]] = {
    "KFAC": lambda: sr.Policy(sr.KFAC()),
    "SINGD-diagonal": lambda: sr.Policy(sr.SINGD(structure="diagonal")),
    "default": lambda: sr.Policy(),
}
REGIMES = ("fp32", "bf16")
#: Optimizer settings: the package's defaults but for lr (clip 1e-3, SGD fallback); AdamW's usual lr.
OURS_LR = 0.01
ADAMW_LR = 1e-3
COVERAGE_STEPS = 3
QUICK_COVERAGE_STEPS = 2
IMAGE_SIZE = 32
NUM_CLASSES = 10
BATCH = 8
QUICK_BATCH = 4
SEQUENCE = 32
LM_BATCH = 4
#: Steps per timed sample: K-FAC's default inverse_every, so every sample holds one refresh step.
PERIOD_STEPS = sr.KFAC().inverse_every
REPEATS = 3
QUICK_REPEATS = 1
#: Untimed steps per contender first: the first holds the first refresh and the allocations.
WARMUP_STEPS = 2
MEMORY_STEPS = 3
MEMORY_VOCAB = 50257
#: The quick mode's vocabulary: a dense factor over it is small whatever the policy does.
QUICK_MEMORY_VOCAB = 2048
MEMORY_LIMIT_GIB = 4.0
MEMORY_HEADROOM_GIB = 8.0
GIB = 2**30


# -- models -------------------------------------------------------------------------------------------
class TinyResNet(nn.Module):
    """A plain-torch residual CNN (stem, two basic blocks, pooled linear head): the quick mode's model."""

    def __init__(self, width: int = 8, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                          nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
            for _ in range(2)
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = torch.relu(h + block(h))
        return self.head(h.mean(dim=(2, 3)))


class ModelSpec(NamedTuple):
    """How to build one model (``build(quick)``) and what it eats (`make_batches`, `model_loss`).

    A ``NamedTuple``, not a dataclass: `common.in_fresh_process` loads this
    file as a module that is not in ``sys.modules``, where dataclasses fail.
    """

    name: str
    family: str
    description: str
    build: Callable[[bool], nn.Module]
    kind: str  # "lm" (token ids, labels = the ids) or "image" (images, class labels)
    #: Whether --quick runs steps on it (else only its coverage is counted).
    quick_steps: bool = True


def _hf_sizes(quick: bool) -> dict[str, int]:
    return {"vocab": 128, "width": 32, "layers": 1, "heads": 2} if quick else {"vocab": 1000, "width": 64, "layers": 2, "heads": 4}


def _transformers() -> Any:
    import transformers

    transformers.logging.set_verbosity_error()  # config notes about unused fields of the tiny configs
    return transformers


def _gpt2(quick: bool) -> nn.Module:
    transformers = _transformers()

    s = _hf_sizes(quick)
    config = transformers.GPT2Config(vocab_size=s["vocab"], n_embd=s["width"], n_layer=s["layers"], n_head=2,
                                     n_positions=64, use_cache=False,
                                     bos_token_id=s["vocab"] - 1, eos_token_id=s["vocab"] - 1)
    return transformers.GPT2LMHeadModel(config)


def _bert(quick: bool) -> nn.Module:
    transformers = _transformers()

    s = _hf_sizes(quick)
    config = transformers.BertConfig(vocab_size=s["vocab"], hidden_size=s["width"], num_hidden_layers=s["layers"],
                                     num_attention_heads=s["heads"], intermediate_size=2 * s["width"],
                                     max_position_embeddings=64)
    return transformers.BertForMaskedLM(config)


def _llama(quick: bool) -> nn.Module:
    transformers = _transformers()

    s = _hf_sizes(quick)
    config = transformers.LlamaConfig(vocab_size=s["vocab"], hidden_size=s["width"], intermediate_size=2 * s["width"],
                                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                      num_key_value_heads=max(1, s["heads"] // 2), max_position_embeddings=64,
                                      use_cache=False)
    return transformers.LlamaForCausalLM(config)


def _timm(name: str, **options: Any) -> Callable[[bool], nn.Module]:
    def build(quick: bool) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **options)

    return build


def _torchvision_resnet18(quick: bool) -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("gpt2", "transformers", "GPT2LMHeadModel (tied embedding/head, Conv1D projections)", _gpt2, "lm"),
    ModelSpec("bert", "transformers", "BertForMaskedLM (tied embedding/decoder)", _bert, "lm"),
    ModelSpec("llama", "transformers", "LlamaForCausalLM (grouped-query attention, RMSNorm, untied head)", _llama, "lm"),
    ModelSpec("timm-resnet18", "timm", "timm resnet18", _timm("resnet18"), "image", quick_steps=False),
    ModelSpec("timm-vit-tiny", "timm", "timm vit_tiny_patch16_224, img_size=32, patch_size=4",
              _timm("vit_tiny_patch16_224", img_size=IMAGE_SIZE, patch_size=4), "image", quick_steps=False),
    ModelSpec("timm-convnext-atto", "timm", "timm convnext_atto", _timm("convnext_atto"), "image", quick_steps=False),
    ModelSpec("timm-mobilenetv3", "timm", "timm mobilenetv3_small_050", _timm("mobilenetv3_small_050"), "image",
              quick_steps=False),
    ModelSpec("timm-efficientnet-b0", "timm", "timm efficientnet_b0", _timm("efficientnet_b0"), "image",
              quick_steps=False),
    ModelSpec("torchvision-resnet18", "torchvision", "torchvision resnet18", _torchvision_resnet18, "image",
              quick_steps=False),
    ModelSpec("tiny-resnet", "torch", "plain-torch residual CNN, width 8 (quick-mode control)",
              lambda quick: TinyResNet(), "image"),
)}
#: Coverage models of a full run (``tiny-resnet`` is the quick mode's control).
COVERAGE_MODELS = tuple(name for name in MODELS if name != "tiny-resnet")
TIMING_MODELS = ("timm-resnet18", "torchvision-resnet18")
QUICK_TIMING_MODELS = ("tiny-resnet",)


def unavailable(family: str) -> str | None:
    """Why the package of ``family`` cannot be used here (``None``: it imports)."""
    if family == "torch":
        return None
    try:
        importlib.import_module(family)
    except Exception as error:  # ImportError, or a package that is installed but broken against this torch
        return f"{family} is not importable: {type(error).__name__}: {error}".splitlines()[0]
    return None


def make_batches(spec: ModelSpec, count: int, quick: bool, seed: int, device: torch.device,
                 *, batch: int | None = None, vocab: int | None = None) -> list[tuple[Tensor, Tensor]]:
    """``count`` fixed random batches for ``spec``: token ids (labels = ids) or images with class labels."""
    generator = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(count):
        if spec.kind == "lm":
            vocab = vocab or _hf_sizes(quick)["vocab"]
            ids = torch.randint(0, vocab, (batch or LM_BATCH, SEQUENCE), generator=generator)
            batches.append((ids.to(device), ids.to(device)))
        else:
            n = batch or (QUICK_BATCH if quick else BATCH)
            images = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
            labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
            batches.append((images.to(device), labels.to(device)))
    return batches


def model_loss(spec: ModelSpec, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The training loss of one batch: the model's own LM loss, or cross-entropy of the class logits."""
    x, y = batch
    if spec.kind == "lm":
        return model(input_ids=x, labels=y).loss
    return nn.functional.cross_entropy(model(x).float(), y)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters, each once (tied ones too)."""
    return [p for p in model.parameters() if p.requires_grad]


def count(params: Any) -> int:
    unique = {id(p): p for p in params}
    return sum(p.numel() for p in unique.values())


# -- the policy before anything is built ------------------------------------------------------------

def _plan_layer(plan: Any) -> Any:
    """The adapter of a managed plan: one layer for a tied weight where the package has them (`plan_layer`)."""
    try:
        from singd_rkfac.policy import plan_layer
    except ImportError:  # a package from before tied weights were preconditioned (the BEFORE run)
        return plan.layer_cls(plan.module)
    return plan_layer(plan)

def plan_policy(policy: sr.Policy, model: nn.Module) -> dict[str, Any]:
    """Managed parameters, managed layers by method, fallback modules and their notes, estimated state bytes.

    From ``policy.plan(model)`` (no curvature state is allocated): managed =
    the parameters of the layer adapter of every planned layer (which should
    be the set ``Preconditioner.managed_parameters()`` holds once built; the
    reported share is the built one, `count_built`). The estimate is
    ``Policy.describe``'s (`estimate_bytes`).
    """
    plans = policy.plan(model)
    managed_params: list[nn.Parameter] = []
    methods: dict[str, int] = {}
    fallback: dict[str, str] = {}
    managed_layers: list[str] = []
    for plan in plans:
        if plan.method is None:
            fallback[plan.name or "(root)"] = plan.note
            continue
        managed_layers.append(plan.name)
        if getattr(plan, "tied_to", None) is None:  # a tied weight's other uses are served by its first use's layer
            managed_params.extend(_plan_layer(plan).params)
        summary = plan.method.summary()
        methods[summary] = methods.get(summary, 0) + 1
    resolved = policy.resolve(model)
    assert [name for name, method in resolved.items() if method is not None] == managed_layers
    total = count(trainable(model))
    managed = count(managed_params)
    estimate, source = estimate_bytes(policy, model)
    return {
        "trainable_parameters": total, "managed_parameters": managed, "share": managed / total if total else None,
        "managed_layers": managed_layers, "methods": methods, "fallback": fallback,
        "estimated_bytes": estimate, "estimate_source": source,
    }


def plan_or_build(policy: sr.Policy, model: nn.Module) -> dict[str, Any]:
    """`plan_policy`, or — should ``Policy.plan`` have changed shape — the same counts from a built optimizer."""
    try:
        return plan_policy(policy, model)
    except Exception as error:
        plan_error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    estimate, source = estimate_bytes(policy, model)
    if estimate is not None and estimate > MEMORY_LIMIT_GIB * GIB:
        raise RuntimeError(f"Policy.plan failed ({plan_error}) and the estimate is too large to build the optimizer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = sr.Optimizer(copy.deepcopy(model), policy, lr=OURS_LR)
    pre = optimizer.preconditioner
    total = count(trainable(model))
    managed = count(p for params in pre.managed_parameters().values() for p in params)
    methods: dict[str, int] = {}
    for m in pre.layers.values():
        methods[m.method.summary()] = methods.get(m.method.summary(), 0) + 1
    return {
        "trainable_parameters": total, "managed_parameters": managed, "share": managed / total if total else None,
        "managed_layers": list(pre.layers), "methods": methods,
        "fallback": {p.name or "(root)": p.note for p in pre.fallback_plans},
        "estimated_bytes": estimate, "estimate_source": source, "plan_error": plan_error,
    }


_ESTIMATE = re.compile(r"curvature state \(estimated\): ([\d.]+) (B|KiB|MiB|GiB)")


def estimate_bytes(policy: sr.Policy, model: nn.Module) -> tuple[int | None, str]:
    """The policy's estimate of the curvature state of ``model`` (bytes) and where it came from.

    ``Policy.describe(model)`` prints it (to one decimal of its unit); the sum
    of each planned layer's curvature class's ``estimate_bytes`` gives the
    exact bytes and is used when it agrees with the printed total to within
    5 % (else, e.g. should that internal route have changed, the printed one).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        match = _ESTIMATE.search(policy.describe(model))
    printed = None
    if match is not None:
        printed = int(float(match.group(1)) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[match.group(2)])
    try:
        from singd_rkfac.curvature import curvature_class

        total = 0
        for plan in policy.plan(model):
            if plan.method is None or getattr(plan, "tied_to", None) is not None:
                continue
            layer = _plan_layer(plan)
            implementation = curvature_class(plan.method)
            dtype = implementation.state_dtype(plan.method, layer.weight.dtype)
            total += int(implementation.estimate_bytes(plan.method, layer.dims, dtype))
    except Exception:
        total = None
    if total is not None and (printed is None or abs(total - printed) <= 0.05 * max(printed, 1024)):
        return total, "sum of the curvature classes' estimate_bytes (= Policy.describe's total)"
    if printed is None:
        return None, "none (Policy.describe printed no estimate)"
    return printed, "Policy.describe's printed total"


# -- section 1: coverage -----------------------------------------------------------------------------
def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:500]


def _messages(caught: list[warnings.WarningMessage]) -> list[str]:
    return list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))


def run_steps(spec: ModelSpec, base: nn.Module, policy: sr.Policy, regime: str, batches: list, device: torch.device
              ) -> dict[str, Any]:
    """Train a copy of ``base`` with ``policy`` for ``len(batches)`` steps in ``regime`` (fp32 / bf16 autocast)."""
    model = copy.deepcopy(base)
    losses: list[float | None] = []
    result: dict[str, Any] = {"losses": losses, "error": None, "warnings": [], "skipped_steps": 0}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer = sr.Optimizer(model, policy, lr=OURS_LR)
            result["optimizer_managed_parameters"] = count(
                p for params in optimizer.preconditioner.managed_parameters().values() for p in params
            )
            for batch in batches:
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=regime == "bf16"):
                    loss = model_loss(spec, model, batch)
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                losses.append(value if math.isfinite(value) else None)
            result["skipped_steps"] = int(getattr(optimizer.preconditioner, "skipped_steps", 0))
            result["curvature_bytes"] = int(sum(optimizer.memory_bytes().values()))
        result["warnings"] = _messages(caught)
    except (RuntimeError, ValueError, MemoryError, TypeError, AttributeError, NotImplementedError) as error:
        result["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:500]
    result["seconds"] = time.perf_counter() - start
    result["finite"] = (
        result["error"] is None and len(losses) == len(batches) and all(v is not None for v in losses)
        and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    )
    return result


def count_built(policy: sr.Policy, model: nn.Module) -> dict[str, Any]:
    """The managed share as the built optimizer has it (``Preconditioner.managed_parameters()``).

    This is the reported share; the plan's count stays as
    ``plan_managed_parameters`` (the two agree unless ``Policy.plan`` and the
    preconditioner disagree about a layer's parameters).
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer = sr.Optimizer(copy.deepcopy(model), policy, lr=OURS_LR)
    except (RuntimeError, ValueError, MemoryError, TypeError, AttributeError, NotImplementedError) as error:
        return {"construction_error": _error(error)}
    pre = optimizer.preconditioner
    managed = count(p for params in pre.managed_parameters().values() for p in params)
    total = count(trainable(model))
    return {
        "construction_error": None, "construction_warnings": _messages(caught),
        "plan_managed_parameters": None, "managed_parameters": managed, "share": managed / total if total else None,
        "optimizer_managed_layers": len(pre.layers), "optimizer_fallback_parameters": count(pre.fallback_parameters()),
        "curvature_bytes_at_construction": int(sum(optimizer.memory_bytes().values())),
    }


def coverage(names: list[str], labels: list[str], args: argparse.Namespace, progress: common.Progress
             ) -> dict[str, Any]:
    steps = args.steps or (QUICK_COVERAGE_STEPS if args.quick else COVERAGE_STEPS)
    raw: dict[str, Any] = {}
    for name in names:
        spec = MODELS[name]
        progress.next(f"coverage {name}")
        reason = unavailable(spec.family)
        entry: dict[str, Any] = {"family": spec.family, "description": spec.description, "skipped": reason}
        raw[name] = entry
        if reason is not None:
            continue
        torch.manual_seed(args.seed)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = spec.build(args.quick).to(args.device)
        except Exception as error:
            entry["skipped"] = f"could not build the model: {type(error).__name__}: {error}".splitlines()[0][:500]
            continue
        base.train()
        batches = make_batches(spec, steps, args.quick, args.seed, args.device)
        entry["trainable_parameters"] = count(trainable(base))
        entry["policies"] = {}
        seen: dict[tuple, str] = {}
        for label in labels:
            policy = POLICIES[label]()
            row = plan_or_build(policy, base)
            row["policy"] = repr(policy)
            row["runs"] = {}
            entry["policies"][label] = row
            limit = args.memory_limit_gib * GIB
            row["plan_managed_parameters"] = row["managed_parameters"]
            row["counted_from"] = "plan"
            if row["estimated_bytes"] is None or row["estimated_bytes"] <= limit:
                built = count_built(policy, base)
                if built["construction_error"] is None:
                    built["plan_managed_parameters"] = row["plan_managed_parameters"]
                    built["counted_from"] = "optimizer"
                row.update(built)
            key = resolved_key(policy, base)
            same = None if args.run_identical else seen.get(key)
            seen.setdefault(key, label)
            for regime in REGIMES:
                if same is not None:  # the same optimizer as a policy already run: its steps, not again
                    row["runs"][regime] = {**entry["policies"][same]["runs"][regime], "same_as": same}
                elif args.quick and not spec.quick_steps:
                    row["runs"][regime] = {"not_run": "--quick: coverage only for this model"}
                elif row["estimated_bytes"] is not None and row["estimated_bytes"] > limit:
                    row["runs"][regime] = {"not_run": f"estimated curvature state {common.format_bytes(row['estimated_bytes'])} "
                                                      f"exceeds --memory-limit-gib {args.memory_limit_gib:g}"}
                else:
                    progress.next(f"coverage {name}: {label}, {regime}, {steps} steps")
                    row["runs"][regime] = run_steps(spec, base, policy, regime, batches, args.device)
        del base
    return raw


# -- section 2: ResNet-18 step time ------------------------------------------------------------------
def timing_contenders() -> dict[str, sr.Policy | None]:
    """The timed optimizers: AdamW (``None``) and ours with each policy."""
    return {"AdamW": None, "default": sr.Policy(), "KFAC": sr.Policy(sr.KFAC())}


def build_contender(policy: sr.Policy | None, model: nn.Module) -> torch.optim.Optimizer:
    if policy is None:
        return torch.optim.AdamW(model.parameters(), lr=ADAMW_LR)
    return sr.Optimizer(model, policy, lr=OURS_LR)


def resolved_key(policy: sr.Policy, model: nn.Module) -> tuple:
    """What ``policy`` does to ``model``, layer by layer: two policies with the same key build the same optimizer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuple((name, repr(method)) for name, method in policy.resolve(model).items())


class StepRunner:
    """One contender: advances a given number of consecutive training steps per call, timing each step."""

    def __init__(self, spec: ModelSpec, model: nn.Module, optimizer: torch.optim.Optimizer, batches: list,
                 device: torch.device) -> None:
        self.spec, self.model, self.optimizer, self.batches, self.device = spec, model, optimizer, batches, device
        self.steps = 0
        self.loss: Tensor | None = None

    def __call__(self, steps: int) -> list[float]:
        """Seconds of each of ``steps`` consecutive steps."""
        seconds = []
        for _ in range(steps):
            batch = self.batches[self.steps % len(self.batches)]
            common.synchronize(self.device)
            start = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            loss = model_loss(self.spec, self.model, batch)
            loss.backward()
            self.optimizer.step()
            common.synchronize(self.device)
            seconds.append(time.perf_counter() - start)
            self.loss = loss.detach()
            self.steps += 1
        return seconds

    def finite(self) -> bool:
        values = [p.detach() for p in self.model.parameters()] + ([self.loss] if self.loss is not None else [])
        return all(bool(torch.isfinite(v).all()) for v in values)


def time_model(name: str, args: argparse.Namespace, progress: common.Progress) -> dict[str, Any]:
    """Interleaved whole-period timings of every contender on model ``name``.

    Each contender first takes ``--warmup-steps`` untimed steps (the first
    holds the first refresh and every allocation); then the contenders
    take turns, one whole period of ``--period-steps`` consecutive steps
    each, ``--repeats`` times. A policy that resolves to the same per-layer
    methods as one timed before it is not timed again (unless
    ``--run-identical``): its row repeats that one's numbers, ``same_as``
    naming it.
    """
    spec = MODELS[name]
    reason = unavailable(spec.family)
    entry: dict[str, Any] = {"family": spec.family, "description": spec.description, "skipped": reason}
    if reason is not None:
        return entry
    period, repeats = args.period_steps, args.repeats
    torch.manual_seed(args.seed)
    base = spec.build(args.quick).to(args.device).train()
    batches = make_batches(spec, period, args.quick, args.seed, args.device, batch=args.batch)
    runners: dict[str, StepRunner] = {}
    seen: dict[tuple, str] = {}
    entry.update(steps_per_period=period, warmup_steps=args.warmup_steps, timed_periods=repeats,
                 batch=args.batch, image_size=IMAGE_SIZE, contenders={})
    for label, policy in timing_contenders().items():
        row = entry["contenders"][label] = {"error": None, "same_as": None, "period_step_seconds": [],
                                            "warmup_step_seconds": []}
        if policy is not None:
            row["policy"] = repr(policy)
            key = resolved_key(policy, base)
            if key in seen and not args.run_identical:
                row["same_as"] = seen[key]
                continue
            seen.setdefault(key, label)
        model = copy.deepcopy(base)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                optimizer = build_contender(policy, model)
        except (RuntimeError, ValueError, MemoryError) as error:
            row["error"] = _error(error)
            continue
        row["warnings"] = _messages(caught)
        runners[label] = StepRunner(spec, model, optimizer, batches, args.device)
        if isinstance(optimizer, sr.Optimizer):
            row["describe"] = optimizer.describe()
    rounds = [("warm-up", args.warmup_steps)] if args.warmup_steps else []
    rounds += [(f"period {i + 1}/{repeats}", period) for i in range(repeats)]
    for what, steps in rounds:
        for label, runner in list(runners.items()):
            progress.next(f"timing {name}: {label}, {what} ({steps} steps)")
            try:
                seconds = runner(steps)
            except (RuntimeError, ValueError, MemoryError) as error:
                entry["contenders"][label]["error"] = _error(error)
                del runners[label]
                continue
            entry["contenders"][label]["warmup_step_seconds" if what == "warm-up" else "period_step_seconds"].append(seconds)
    for label, row in entry["contenders"].items():
        if row["same_as"] is not None:
            continue
        row["seconds_per_step"] = [sum(s) / len(s) for s in row["period_step_seconds"]]  # one value per period
        row["median_seconds_per_step"] = common.median(row["seconds_per_step"]) if row["seconds_per_step"] else None
        runner = runners.get(label)
        row["finite"] = runner.finite() if runner is not None else False
        if runner is not None and isinstance(runner.optimizer, sr.Optimizer):
            row["curvature_bytes"] = int(sum(runner.optimizer.memory_bytes().values()))
            row["describe_after"] = runner.optimizer.describe()
    for row in entry["contenders"].values():
        if row["same_as"] is not None:
            source = entry["contenders"][row["same_as"]]
            row.update({k: v for k, v in source.items() if k not in ("same_as", "policy", "describe", "describe_after")})
    adamw = entry["contenders"]["AdamW"]["median_seconds_per_step"]
    for row in entry["contenders"].values():
        seconds = row["median_seconds_per_step"]
        row["ratio_to_adamw"] = None if seconds is None or not adamw else seconds / adamw
    return entry


# -- section 3: GPT-2 with the full vocabulary -----------------------------------------------------
def _gpt2_memory_model(tied: bool, vocab: int) -> nn.Module:
    transformers = _transformers()

    config = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=2, n_positions=64,
                                     use_cache=False, tie_word_embeddings=tied)
    return transformers.GPT2LMHeadModel(config)


def _status_kib(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", open("/proc/self/status").read(), re.MULTILINE)
    except OSError:
        return None
    return None if match is None else int(match.group(1))


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ``clear_refs`` 5); whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> tuple[int | None, str]:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024, "VmHWM"
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
    except Exception:
        return None, "none"


def _limit_address_space(headroom: int) -> int | None:
    """Cap this process's address space (RLIMIT_AS) at its current size plus ``headroom`` bytes; the cap, or ``None``.

    A transient allocation beyond it then fails inside torch (a recorded
    ``RuntimeError``) instead of exhausting the machine's memory.
    """
    size = _status_kib("VmSize")
    try:
        import resource

        if size is None:
            return None
        cap = size * 1024 + headroom
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        return cap
    except (ImportError, OSError, ValueError):
        return None


def memory_run(label: str, tied: bool, vocab: int, steps: int, threads: int, seed: int, headroom: int
               ) -> dict[str, Any]:
    """One memory configuration (``label``: "default" or "AdamW"), meant for a fresh process."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    spec = MODELS["gpt2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _gpt2_memory_model(tied, vocab).train()
    batches = make_batches(spec, steps, False, seed, torch.device("cpu"), batch=LM_BATCH, vocab=vocab)
    result: dict[str, Any] = {"losses": [], "error": None}
    result["parameter_count"] = count(trainable(model))
    reset = _reset_peak_rss()
    rss_before = (_status_kib("VmRSS") or 0) * 1024
    result.update(peak_reset=reset, rss_before_bytes=rss_before, address_space_cap_bytes=_limit_address_space(headroom))
    start = time.perf_counter()
    optimizer = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if label == "AdamW":
                optimizer = torch.optim.AdamW(model.parameters(), lr=ADAMW_LR)
            else:
                optimizer = sr.Optimizer(model, sr.Policy(), lr=OURS_LR)
            for batch in batches:
                optimizer.zero_grad(set_to_none=True)
                loss = model_loss(spec, model, batch)
                loss.backward()
                optimizer.step()
                result["losses"].append(float(loss.detach()))
        result["warnings"] = _messages(caught)
    except (MemoryError, RuntimeError, ValueError) as error:
        result["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:500]
    result["seconds"] = time.perf_counter() - start
    peak, source = _peak_rss_bytes()
    result.update(peak_rss_bytes=peak, peak_source=source,
                  peak_rss_growth_bytes=None if peak is None or not reset else peak - rss_before)
    if optimizer is not None:
        adam = [t for state in optimizer.state.values() for key, t in state.items()
                if key in ("exp_avg", "exp_avg_sq") and isinstance(t, Tensor)]
        result["adamw_state_bytes"] = sum(t.numel() * t.element_size() for t in adam) if label == "AdamW" else None
        if isinstance(optimizer, sr.Optimizer):
            result["curvature_bytes"] = int(sum(optimizer.memory_bytes().values()))
            result["state_bytes"] = int(optimizer.state_bytes())
            result["describe"] = optimizer.describe()
    return result


def memory(args: argparse.Namespace, progress: common.Progress) -> dict[str, Any]:
    reason = unavailable("transformers")
    if reason is not None:
        return {"skipped": reason}
    raw: dict[str, Any] = {"skipped": None, "vocab": args.vocab, "configurations": {}}
    limit = int(args.memory_limit_gib * GIB)
    for tying in ("tied", "untied"):
        tied = tying == "tied"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(args.seed)
            model = _gpt2_memory_model(tied, args.vocab)
        policy = sr.Policy()
        estimate, source = estimate_bytes(policy, model)
        plan = plan_policy(policy, model)
        del model
        for label in ("AdamW", "default"):
            key = f"{tying}/{label}"
            entry: dict[str, Any] = {"tying": tying, "optimizer": label, "skipped": None}
            if label == "default":
                entry.update(policy=repr(policy), estimated_bytes=estimate, estimate_source=source,
                             policy_describe=plan_describe(policy, tied, args), managed_share=plan["share"],
                             fallback=plan["fallback"])
                if estimate is not None and estimate > limit:
                    entry["skipped"] = (f"estimated curvature state {common.format_bytes(estimate)} exceeds "
                                        f"--memory-limit-gib {args.memory_limit_gib:g}: not built")
            raw["configurations"][key] = entry
            if entry["skipped"] is None:
                progress.next(f"memory GPT-2 vocab {args.vocab}, {tying}: {label} (fresh process)")
                try:
                    entry.update(common.in_fresh_process(memory_run, label, tied, args.vocab, args.memory_steps,
                                                         args.threads, args.seed, int(args.memory_headroom_gib * GIB)))
                except Exception as error:  # the child died (e.g. killed for memory)
                    entry["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:500]
    return raw


def plan_describe(policy: sr.Policy, tied: bool, args: argparse.Namespace) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(args.seed)
        return policy.describe(_gpt2_memory_model(tied, args.vocab))


# -- summary, table, plot ------------------------------------------------------------------------------
def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if "coverage" in raw:
        rows = []
        for name, entry in raw["coverage"].items():
            if entry["skipped"] is not None:
                rows.append({"model": name, "policy": None, "skipped": entry["skipped"]})
                continue
            for label, row in entry["policies"].items():
                runs = row["runs"]
                rows.append({
                    "model": name, "policy": label, "skipped": None, "share": row["share"],
                    "managed_parameters": row["managed_parameters"], "trainable_parameters": row["trainable_parameters"],
                    "plan_managed_parameters": row.get("plan_managed_parameters"),
                    "managed_layers": len(row["managed_layers"]), "fallback_modules": len(row["fallback"]),
                    "estimated_bytes": row["estimated_bytes"], "same_as": runs["fp32"].get("same_as"),
                    **{f"{regime}_finite": runs[regime].get("finite") for regime in REGIMES},
                    **{f"{regime}_losses": runs[regime].get("losses") for regime in REGIMES},
                    **{f"{regime}_error": runs[regime].get("error") or runs[regime].get("not_run") for regime in REGIMES},
                })
        summary["coverage"] = rows
    if "timing" in raw:
        rows = []
        for name, entry in raw["timing"].items():
            if entry["skipped"] is not None:
                rows.append({"model": name, "contender": None, "skipped": entry["skipped"]})
                continue
            for label, row in entry["contenders"].items():
                rows.append({"model": name, "contender": label, "skipped": None, "error": row["error"],
                             "same_as": row["same_as"],
                             "median_seconds_per_step": row["median_seconds_per_step"],
                             "ratio_to_adamw": row["ratio_to_adamw"],
                             "spread": common.spread(row["seconds_per_step"]) if row["seconds_per_step"] else None,
                             "finite": row["finite"], "timed_periods": len(row["seconds_per_step"]),
                             "steps_per_period": entry["steps_per_period"]})
        summary["timing"] = rows
    if "memory" in raw:
        block = raw["memory"]
        rows = []
        for tying in ("tied", "untied"):
            if block.get("skipped"):
                rows.append({"tying": tying, "skipped": block["skipped"]})
                continue
            ours = block["configurations"][f"{tying}/default"]
            adamw = block["configurations"][f"{tying}/AdamW"]
            adam_bytes = adamw.get("adamw_state_bytes")
            curvature = ours.get("curvature_bytes")
            rows.append({
                "tying": tying, "vocab": block["vocab"], "skipped": ours.get("skipped"), "error": ours.get("error"),
                "estimated_bytes": ours.get("estimated_bytes"), "curvature_bytes": curvature,
                "adamw_state_bytes": adam_bytes,
                "ratio_to_adamw": None if curvature is None or not adam_bytes else curvature / adam_bytes,
                "peak_rss_growth_bytes": ours.get("peak_rss_growth_bytes"),
                "adamw_peak_rss_growth_bytes": adamw.get("peak_rss_growth_bytes"),
                "managed_share": ours.get("managed_share"),
            })
        summary["memory"] = rows
    return summary


def _bytes(value: int | None) -> str:
    return "-" if value is None else common.format_bytes(int(value))


def _losses(values: list | None) -> str:
    if not values:
        return "-"
    return " ".join("nan" if v is None else f"{v:.3g}" for v in values)


def report(summary: dict[str, Any]) -> None:
    if "coverage" in summary:
        body = []
        for r in summary["coverage"]:
            if r["skipped"] is not None:
                body.append([r["model"], "-", "skipped", "", "", "", "", r["skipped"][:70]])
                continue
            finite = {regime: ("-" if r[f"{regime}_finite"] is None else str(r[f"{regime}_finite"])) for regime in REGIMES}
            errors = "; ".join(f"{regime}: {r[f'{regime}_error']}" for regime in REGIMES if r[f"{regime}_error"])
            if r["same_as"]:
                errors = f"steps: the same optimizer as {r['same_as']}" + (f"; {errors}" if errors else "")
            plan = r.get("plan_managed_parameters")
            if plan is not None and plan != r["managed_parameters"]:
                errors = f"Policy.plan counts {plan}" + (f"; {errors}" if errors else "")
            body.append([r["model"], r["policy"], f"{100 * r['share']:.1f} %",
                         f"{r['managed_parameters']}/{r['trainable_parameters']}", _bytes(r["estimated_bytes"]),
                         f"{finite['fp32']} ({_losses(r['fp32_losses'])})", f"{finite['bf16']} ({_losses(r['bf16_losses'])})",
                         errors[:70]])
        common.print_table(["model", "policy", "managed", "params", "est. state", "fp32 finite (losses)",
                            "bf16 finite (losses)", "note"], body, "coverage: share of trainable parameters managed")
    if "timing" in summary:
        body = []
        for r in summary["timing"]:
            if r["skipped"] is not None:
                body.append([r["model"], "-", "skipped", "", "", r["skipped"][:70]])
                continue
            body.append([r["model"], r["contender"], common.fmt_ms(r["median_seconds_per_step"]),
                         common.fmt_ratio(r["ratio_to_adamw"]), common.fmt_ratio(r["spread"]),
                         f"{r['timed_periods']} × {r['steps_per_period']} steps, finite {r['finite']}"
                         + (f"; {r['error'][:60]}" if r["error"] else "")
                         + (f"; the same optimizer as {r['same_as']}: its timings" if r["same_as"] else "")])
        common.print_table(["model", "optimizer", "ms/step", "× AdamW", "spread", "samples"], body,
                           "ResNet step time (forward+backward+step), mean over whole update periods, median of periods")
    if "memory" in summary:
        body = []
        for r in summary["memory"]:
            if r.get("skipped") and "curvature_bytes" not in r:
                body.append([r["tying"], "skipped", "", "", "", "", r["skipped"][:80]])  # transformers missing
                continue
            note = r.get("skipped") or r.get("error") or ""
            body.append([f"{r['tying']}, vocab {r['vocab']}", _bytes(r["estimated_bytes"]), _bytes(r["curvature_bytes"]),
                         _bytes(r["adamw_state_bytes"]), common.fmt_ratio(r["ratio_to_adamw"], 3),
                         f"{_bytes(r['peak_rss_growth_bytes'])} / {_bytes(r['adamw_peak_rss_growth_bytes'])}",
                         note[:80]])
        common.print_table(["GPT-2", "estimate", "curvature", "AdamW state", "× AdamW",
                            "peak RSS growth ours / AdamW", "note"], body,
                           "GPT-2 (width 64): default policy's curvature state after the steps vs AdamW's state")


def figure(summary: dict[str, Any]) -> Any:
    panels = [key for key in ("coverage", "timing", "memory") if key in summary]
    if not panels:
        return None
    fig = common.new_figure(6.0 * len(panels), 5.0)
    if fig is None:
        return None
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, key in zip(axes, panels):
        if key == "coverage":
            rows = [r for r in summary["coverage"] if r["skipped"] is None]
            models = list(dict.fromkeys(r["model"] for r in rows))
            labels = list(dict.fromkeys(r["policy"] for r in rows))
            width = 0.8 / max(1, len(labels))
            for i, label in enumerate(labels):
                shares = [next((100 * r["share"] for r in rows if r["model"] == m and r["policy"] == label), 0.0)
                          for m in models]
                ax.barh([j + i * width for j in range(len(models))], shares, height=width, label=label)
            ax.set_yticks([j + 0.4 - width / 2 for j in range(len(models))], models, fontsize="small")
            ax.invert_yaxis()
            ax.set_xlim(0, 100)
            ax.set_xlabel("trainable parameters managed [%]")
            skipped = [r["model"] for r in summary["coverage"] if r["skipped"] is not None]
            ax.set_title("Coverage" + (f" (skipped: {', '.join(skipped)})" if skipped else ""), fontsize="small")
            ax.legend(fontsize="x-small")
        elif key == "timing":
            rows = [r for r in summary["timing"] if r["skipped"] is None]
            models = list(dict.fromkeys(r["model"] for r in rows))
            labels = list(dict.fromkeys(r["contender"] for r in rows))
            width = 0.8 / max(1, len(labels))
            for i, label in enumerate(labels):
                found = [next((r for r in rows if r["model"] == m and r["contender"] == label), None) for m in models]
                values = [math.nan if r is None or r["median_seconds_per_step"] is None else r["median_seconds_per_step"]
                          for r in found]
                bars = ax.bar([j + i * width for j in range(len(models))], values, width=width, label=label)
                for bar, r in zip(bars, found):
                    if r is not None and r["ratio_to_adamw"] is not None:
                        ax.annotate(f"×{r['ratio_to_adamw']:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                    ha="center", va="bottom", fontsize="x-small")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, fontsize="small")
            ax.set_yscale("log")
            common.plain_log_ticks(ax)
            ax.set_ylabel("seconds per step (mean over update periods)")
            ax.set_title("Step time (× AdamW above the bars)", fontsize="small")
            ax.legend(fontsize="x-small")
        else:
            rows = summary["memory"]
            names, values, colours = [], [], []
            for r in rows:
                for what, value, colour in (("estimate", r.get("estimated_bytes"), "tab:orange"),
                                            ("curvature", r.get("curvature_bytes"), "tab:blue"),
                                            ("AdamW state", r.get("adamw_state_bytes"), "black")):
                    if value:
                        names.append(f"{r['tying']}\n{what}")
                        values.append(value)
                        colours.append(colour)
            ax.bar(range(len(values)), values, color=colours)
            ax.set_xticks(range(len(values)), names, fontsize="x-small")
            ax.set_yscale("log")
            ax.set_ylabel("bytes")
            vocab = next((r["vocab"] for r in rows if "vocab" in r), "?")
            ax.set_title(f"GPT-2, vocabulary {vocab}: default policy vs AdamW", fontsize="small")
        ax.grid(True, alpha=0.3)
    return fig


def library_versions() -> dict[str, str | None]:
    """Versions of the model libraries (``None``: not importable here)."""
    versions: dict[str, str | None] = {}
    for family in ("transformers", "timm", "torchvision"):
        versions[family] = None if unavailable(family) else getattr(importlib.import_module(family), "__version__", "?")
    return versions


# -- main ----------------------------------------------------------------------------------------------
def parser() -> common.BenchParser:
    p = common.make_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="what to measure (default: all)")
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help=f"coverage models (default: {' '.join(COVERAGE_MODELS)}; quick: the same plus tiny-resnet)")
    p.add_argument("--policies", nargs="+", metavar="NAME", help=f"coverage policies (default: {' '.join(POLICIES)})")
    p.add_argument("--steps", type=common.positive_int, default=None, metavar="N",
                   help=f"coverage steps per policy and regime (default: {COVERAGE_STEPS}; quick: {QUICK_COVERAGE_STEPS})")
    p.add_argument("--timing-models", nargs="+", metavar="NAME",
                   help=f"timing models (default: {' '.join(TIMING_MODELS)}; quick: {' '.join(QUICK_TIMING_MODELS)})")
    p.add_argument("--batch", type=common.positive_int, default=None, metavar="N",
                   help=f"timing batch size (default: {BATCH}; quick: {QUICK_BATCH})")
    p.add_argument("--period-steps", type=common.positive_int, default=PERIOD_STEPS, metavar="N",
                   help=f"consecutive steps per timed sample (default: {PERIOD_STEPS}, K-FAC's inverse_every)")
    p.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS, metavar="N",
                   help=f"untimed steps per contender before the timed periods (default: {WARMUP_STEPS}; the first "
                        "holds the first refresh, so the timed periods still hold one refresh each)")
    p.add_argument("--note", default=None, metavar="TEXT",
                   help="a remark stored in the JSON config (e.g. why the timed periods were reduced)")
    p.add_argument("--run-identical", action="store_true",
                   help="step and time a policy even when it resolves to the same per-layer methods as one run "
                        "before it (default: record it as the same)")
    p.add_argument("--vocab", type=common.positive_int, default=None, metavar="V",
                   help=f"GPT-2 vocabulary of the memory section (default: {MEMORY_VOCAB}; quick: {QUICK_MEMORY_VOCAB})")
    p.add_argument("--memory-steps", type=common.positive_int, default=MEMORY_STEPS, metavar="N",
                   help=f"steps of the memory section (default: {MEMORY_STEPS})")
    p.add_argument("--memory-limit-gib", type=float, default=MEMORY_LIMIT_GIB, metavar="GIB",
                   help=f"skip a configuration whose estimated curvature state exceeds this (default: {MEMORY_LIMIT_GIB:g})")
    p.add_argument("--memory-headroom-gib", type=float, default=MEMORY_HEADROOM_GIB, metavar="GIB",
                   help="address-space cap (RLIMIT_AS) of each memory-section process above its size before the "
                        f"optimizer is built, so that a transient allocation fails there (default: {MEMORY_HEADROOM_GIB:g})")
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = common.parse_args(p, argv)
    default_models = [*COVERAGE_MODELS, "tiny-resnet"] if args.quick else list(COVERAGE_MODELS)
    models = common.select(MODELS, args.models or default_models, p, "--models")
    labels = common.select(POLICIES, args.policies, p, "--policies")
    timing_models = common.select(MODELS, args.timing_models or list(QUICK_TIMING_MODELS if args.quick else TIMING_MODELS),
                                  p, "--timing-models")
    if args.warmup_steps < 0:
        p.error("--warmup-steps must be ≥ 0")
    if args.memory_limit_gib <= 0:
        p.error("--memory-limit-gib must be > 0")
    args.sections = [section for section in SECTIONS if section in args.sections]
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    args.batch = args.batch or (QUICK_BATCH if args.quick else BATCH)
    args.vocab = args.vocab or (QUICK_MEMORY_VOCAB if args.quick else MEMORY_VOCAB)
    if args.memory_headroom_gib <= 0:
        p.error("--memory-headroom-gib must be > 0")
    config = {
        "sections": args.sections,
        "note": args.note,
        "package": {"path": sr.__file__, "version": sr.__version__},
        "libraries": library_versions(),
        "coverage": {
            "models": {name: MODELS[name].description for name in models}, "policies": labels,
            "steps": args.steps or (QUICK_COVERAGE_STEPS if args.quick else COVERAGE_STEPS), "regimes": list(REGIMES),
            "image_size": IMAGE_SIZE, "image_batch": QUICK_BATCH if args.quick else BATCH,
            "lm": {**_hf_sizes(args.quick), "batch": LM_BATCH, "sequence": SEQUENCE},
            "managed": "opt.preconditioner.managed_parameters() of the built optimizer (plan_managed_parameters: "
                       "the parameters of the layers policy.plan(model) gives a method)",
            "optimizer": f"sr.Optimizer(model, policy, lr={OURS_LR}) (defaults: clip 1e-3, SGD fallback)",
            "quick_steps_only_for": [n for n in models if MODELS[n].quick_steps] if args.quick else "every model",
            "identical_policies": "stepped separately" if args.run_identical else
                                  "a policy that resolves to the same per-layer methods as one stepped before it "
                                  "is not stepped again; its runs repeat that one's (same_as)",
        },
        "timing": {
            "models": timing_models, "batch": args.batch, "image_size": IMAGE_SIZE,
            "steps_per_period": args.period_steps, "warmup_steps": args.warmup_steps, "timed_periods": args.repeats,
            "contenders": {"AdamW": f"torch.optim.AdamW(lr={ADAMW_LR})",
                           "default": f"sr.Optimizer(model, sr.Policy(), lr={OURS_LR})",
                           "KFAC": f"sr.Optimizer(model, sr.Policy(sr.KFAC()), lr={OURS_LR})"},
            "sample": "mean seconds per step over one whole period of consecutive steps (refresh step included); "
                      "periods interleaved A B C A B C after the warm-up steps; median over the timed periods",
            "identical_policies": "timed separately" if args.run_identical else
                                  "a policy that resolves to the same per-layer methods as one timed before it is "
                                  "not timed again; its row repeats that one's numbers (same_as)",
        },
        "memory": {
            "model": f"GPT2LMHeadModel(vocab_size={args.vocab}, n_embd=64, n_layer=2, n_head=2, n_positions=64), "
                     "tied and untied embedding/head",
            "steps": args.memory_steps, "batch": LM_BATCH, "sequence": SEQUENCE,
            "limit_bytes": int(args.memory_limit_gib * GIB),
            "address_space_headroom_bytes": int(args.memory_headroom_gib * GIB),
            "isolation": "one fresh process per configuration (common.in_fresh_process); peak RSS = VmHWM, "
                         "reset (clear_refs 5) just before the optimizer is built",
        },
    }
    payload = common.new_payload(NAME, args, config)
    total = len(models) * (1 + 2 * len(labels)) + len(timing_models) * 3 * (int(args.warmup_steps > 0) + args.repeats) + 4
    with common.configured(args), common.Progress(total, NAME) as progress:
        seconds = payload["raw"]["section_seconds"] = {}
        for section in args.sections:
            start = time.perf_counter()
            if section == "coverage":
                payload["raw"]["coverage"] = coverage(models, labels, args, progress)
            elif section == "timing":
                payload["raw"]["timing"] = {name: time_model(name, args, progress) for name in timing_models}
            else:
                payload["raw"]["memory"] = memory(args, progress)
            seconds[section] = time.perf_counter() - start
    payload["summary"] = summarize(payload["raw"])
    report(payload["summary"])
    common.write_results(NAME, payload, figure(payload["summary"]), args.out)
    return payload


if __name__ == "__main__":
    main()
