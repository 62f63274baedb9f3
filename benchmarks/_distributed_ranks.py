"""The rank side of the ``distributed`` benchmark (a helper module, not a benchmark).

``benchmarks/distributed.py`` starts ``world`` processes with
``torch.multiprocessing`` (fork server, like ``tests/test_distributed.py``);
each runs `rank_main`. The process target must live in a module the children
can import by name: the children inherit the parent's ``sys.path``, which holds
this folder, so this module (unlike a benchmark loaded by ``singd-rkfac bench``
under a private name) is importable there. Its leading underscore keeps it out
of ``singd-rkfac bench --list``.

What a rank does, on the gloo backend with ``threads`` torch threads:

1. **timing** — every method on the same MLP (float32, ``DistributedDataParallel``
   also with one process), this rank's shard of each global batch; the
   methods take turns (A B C A B C …), each turn ``iterations`` training steps
   (one update period, so refreshes are amortised), after ``warmup`` turns.
   Every turn's wall time and the time inside ``opt.step()`` are recorded.
2. **bytes** — every ``torch.distributed`` collective the optimizer issues
   (``all_reduce``, ``all_gather``, ``broadcast``, ``all_gather_object``) goes
   through a counting wrapper, and DDP's gradient buckets through a counting
   communication hook; each counts the payload this rank sends (a broadcast
   counts on its source only, an object by its pickled size).
3. **agreement** — the same methods in float64 for ``agreement_steps`` steps;
   the parameters are compared with the one-process run on the whole batch
   (computed once by the parent, `reference_parameters`) and across ranks.

Rank 0 writes everything to ``out/world{W}.json``.
"""

from __future__ import annotations

import datetime
import json
import pickle
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import singd_rkfac as sr

#: Update-rule settings of the other benchmarks (``common.py``), repeated here so that the ranks do not
#: import matplotlib-dependent code: SGD-style update with momentum for ours, K-FAC's KL clip.
ADAMW_LR = 1e-3
SGD_LR = 0.01
MOMENTUM = 0.9
KFAC_CLIP = 1e-3
NUM_CLASSES = 10

#: Every method the benchmark knows, in plot order (baselines first).
METHODS = ("AdamW", "SGD", "KFAC", "KFAC-MEM-OPT", "BKFAC", "SINGD-diagonal", "SINGD-dense")
#: Suffix of a method run with ``grad_worker_fraction = 1/world`` (MEM-OPT) instead of 1 (COMM-OPT).
MEM_OPT = "-MEM-OPT"
BASELINES = ("AdamW", "SGD")


def build_optimizer(name: str, model: nn.Module, config: dict[str, Any], process_group: Any = None) -> torch.optim.Optimizer:
    """The optimizer ``name`` of `METHODS` on ``model`` (ours with ``process_group``)."""
    period = config["update_every"]
    fraction = 1.0
    if name.endswith(MEM_OPT):
        name = name.removesuffix(MEM_OPT)
        if process_group is not False and dist.is_initialized():
            fraction = 1.0 / dist.get_world_size()
    if name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=ADAMW_LR)
    if name == "SGD":
        return torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=MOMENTUM)
    methods: dict[str, tuple[sr.Method, float | None]] = {
        "KFAC": (sr.KFAC(inverse_every=period), KFAC_CLIP),
        "BKFAC": (sr.BKFAC(rank=config["rank"], inverse_every=period), KFAC_CLIP),
        "SINGD-diagonal": (sr.SINGD(structure="diagonal", update_every=period), None),
        "SINGD-dense": (sr.SINGD(structure="dense", update_every=period), None),
    }
    method, clip = methods[name]
    return sr.Optimizer(model, sr.Policy(default=method), lr=SGD_LR, momentum=MOMENTUM, clip=clip,
                        process_group=process_group, grad_worker_fraction=fraction)


def build_model(config: dict[str, Any], dtype: torch.dtype) -> nn.Sequential:
    """The MLP of ``config["sizes"]`` (ReLU between layers), seeded, in ``dtype``."""
    torch.manual_seed(config["seed"])
    sizes = config["sizes"]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers).to(dtype)


def global_batches(config: dict[str, Any], count: int, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """``count`` global batches (the same on every rank and in the parent)."""
    generator = torch.Generator().manual_seed(config["seed"] + 1)
    batch, d_in = config["global_batch"], config["sizes"][0]
    return [
        (torch.randn(batch, d_in, generator=generator, dtype=dtype), torch.randint(0, NUM_CLASSES, (batch,), generator=generator))
        for _ in range(count)
    ]


def shard(batch: tuple[Tensor, Tensor], rank: int, world: int) -> tuple[Tensor, Tensor]:
    x, y = batch
    n = x.shape[0]
    part = slice(rank * n // world, (rank + 1) * n // world)
    return x[part], y[part]


def parameters(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> float:
    """One step; returns the seconds spent in ``opt.step()``."""
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def reference_parameters(config: dict[str, Any]) -> dict[str, list[float]]:
    """One process on the whole global batch, float64: parameters after ``agreement_steps`` steps."""
    batches = global_batches(config, config["agreement_steps"], torch.float64)
    out = {}
    for name in config["methods"]:
        model = build_model(config, torch.float64)
        opt = build_optimizer(name, model, config, process_group=False)
        for x, y in batches:
            train_step(model, opt, x, y)
        out[name] = parameters(model).tolist()
    return out


# -- counting the collectives ---------------------------------------------------------------------------------


class Counter:
    """Payload bytes and calls per (method, collective) while ``label`` is set."""

    def __init__(self) -> None:
        self.label: str | None = None
        self.world = 1  # one process communicates nothing (DDP still calls its hook)
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.calls: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, kind: str, nbytes: int) -> None:
        if self.label is not None and self.world > 1:
            self.bytes[self.label][kind] += int(nbytes)
            self.calls[self.label][kind] += 1


COUNTER = Counter()
_WRAPPED = ("all_reduce", "all_gather", "broadcast", "all_gather_object")


def _tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _payload(name: str, args: tuple, kwargs: dict) -> int:
    if name == "all_reduce":
        return _tensor_bytes(args[0] if args else kwargs["tensor"])
    if name == "all_gather":
        return _tensor_bytes(args[1] if len(args) > 1 else kwargs["tensor"])
    if name == "broadcast":
        tensor = args[0] if args else kwargs["tensor"]
        src = args[1] if len(args) > 1 else kwargs["src"]
        return _tensor_bytes(tensor) if src == dist.get_rank() else 0  # the source sends, the others receive
    return len(pickle.dumps(args[1] if len(args) > 1 else kwargs["obj"]))  # all_gather_object


def install_counters() -> None:
    """Route the ``torch.distributed`` collectives that ``singd_rkfac.distributed`` calls through `COUNTER`."""
    for name in _WRAPPED:
        original = getattr(dist, name)
        if getattr(original, "_counted", False):
            continue

        def wrapped(*args: Any, _name: str = name, _original: Callable = original, **kwargs: Any) -> Any:
            COUNTER.add(_name, _payload(_name, args, kwargs))
            return _original(*args, **kwargs)

        wrapped._counted = True  # type: ignore[attr-defined]
        setattr(dist, name, wrapped)


def _counting_hook(state, bucket):  # no annotations: DDP checks them, and these would be strings
    """DDP's default all-reduce (average), counting the bucket's bytes."""
    COUNTER.add("ddp_gradients", _tensor_bytes(bucket.buffer()))
    label, COUNTER.label = COUNTER.label, None  # the hook's own dist.all_reduce is this bucket: count it once
    try:
        return default_hooks.allreduce_hook(None, bucket)
    finally:
        COUNTER.label = label


def ddp(model: nn.Module) -> DistributedDataParallel:
    wrapped = DistributedDataParallel(model)
    wrapped.register_comm_hook(None, _counting_hook)
    return wrapped


# -- the rank ------------------------------------------------------------------------------------------------------


def _timing(rank: int, world: int, config: dict[str, Any]) -> dict[str, Any]:
    names = config["methods"]
    period = config["update_every"]
    turns = config["warmup"] + config["repeats"]
    batches = [shard(b, rank, world) for b in global_batches(config, config["distinct_batches"], torch.float32)]
    models, opts, drivers, construction = {}, {}, {}, {}
    for name in names:
        models[name] = ddp(build_model(config, torch.float32))
        COUNTER.label = f"construction:{name}"
        opts[name] = build_optimizer(name, models[name], config)
        COUNTER.label = None
        construction[name] = sum(COUNTER.bytes[f"construction:{name}"].values())
        pre = getattr(opts[name], "preconditioner", None)
        drivers[name] = None if pre is None else pre.distributed
    seconds = {name: [] for name in names}
    step_seconds = {name: [] for name in names}
    steps = {name: 0 for name in names}
    cursor = {name: 0 for name in names}
    for turn in range(turns):
        for name in names:
            COUNTER.label = name
            dist.barrier()  # every rank starts the turn together
            start = time.perf_counter()
            in_step = 0.0
            for _ in range(period):
                x, y = batches[cursor[name] % len(batches)]
                cursor[name] += 1
                in_step += train_step(models[name], opts[name], x, y)
                steps[name] += 1
            elapsed = time.perf_counter() - start
            COUNTER.label = None
            if turn >= config["warmup"]:
                seconds[name].append(elapsed / period)
                step_seconds[name].append(in_step / period)
    finite = {name: bool(torch.isfinite(parameters(models[name])).all()) for name in names}
    record: dict[str, Any] = {}
    for name in names:
        driver = drivers[name]
        entry = {
            "seconds_per_step": seconds[name],
            "optimizer_step_seconds_per_step": step_seconds[name],
            "steps": steps[name],
            "bytes": dict(COUNTER.bytes[name]),
            "calls": dict(COUNTER.calls[name]),
            "construction_bytes": construction[name],
            "finite": finite[name],
        }
        if driver is not None:
            entry["driver"] = {
                "owners": driver.owners, "costs": driver.costs, "loads": driver.loads, "balance": driver.balance,
                "total_bytes": dict(driver.total_bytes), "communicated_steps": driver.communicated_steps,
            }
        record[name] = entry
    return record


def _agreement(rank: int, world: int, config: dict[str, Any], reference: dict[str, list[float]]) -> dict[str, Any]:
    batches = [shard(b, rank, world) for b in global_batches(config, config["agreement_steps"], torch.float64)]
    out = {}
    for name in config["methods"]:
        model = ddp(build_model(config, torch.float64))
        opt = build_optimizer(name, model, config)
        for x, y in batches:
            train_step(model, opt, x, y)
        params = parameters(model)
        gathered = [torch.empty_like(params) for _ in range(world)]
        dist.all_gather(gathered, params)
        expected = torch.tensor(reference[name], dtype=torch.float64)
        out[name] = {
            "max_abs_diff_vs_one_process": (params - expected).abs().max().item(),
            "max_abs_parameter": expected.abs().max().item(),
            "max_abs_diff_across_ranks": max((g - gathered[0]).abs().max().item() for g in gathered),
        }
    return out


def rank_main(rank: int, world: int, config: dict[str, Any], out: str) -> None:
    """One rank: time, count, compare; rank 0 writes ``out/world{world}.json``."""
    torch.set_num_threads(config["threads"])
    dist.init_process_group(
        "gloo", init_method=f"file://{out}/rendezvous{world}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=config["timeout_s"]),
    )
    try:
        install_counters()
        COUNTER.world = world
        timing = _timing(rank, world, config)
        reference = json.loads((Path(out) / "reference.json").read_text())
        agreement = _agreement(rank, world, config, reference)
        mine = {"timing": timing, "agreement": agreement}
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine)  # not counted: the label is unset
        if rank == 0:
            (Path(out) / f"world{world}.json").write_text(json.dumps({"world": world, "ranks": everyone}))
    finally:
        dist.destroy_process_group()
