"""Distributed data parallel on ``torch.distributed`` (DESIGN §6).

Every rank runs the same model on its shard of the batch (``DistributedDataParallel``
or a bare model whose gradients the user averages). The optimizer then makes
every rank take the step one process would take on the concatenated global
batch, while each layer's expensive work runs on one rank only. Per step
(KAISA's COMM-OPT, ``grad_worker_fraction=1``):

1. **agree** (one small all-gather, in the step's single host sync): each rank
   sends ``[found_inf, rows and samples per layer]``. A non-finite gradient on
   any rank makes every rank skip the step; the counts give every rank the
   global and per-rank row counts.
2. **statistics** (bucketed, asynchronous): each layer hands its staged,
   not-yet-averaged statistics to a `StatisticsExchange`. Grams (K-FAC's
   ``Σ aᵀa``, ``Σ gᵀg``; SINGD's structured ``H_K``, ``H_C``) are summed: one
   flat buffer per dtype, one ``all_reduce`` each, all launched before any is
   waited on. Brand factors need the rows themselves (their fold is not linear
   in a gram): one ``all_gather`` per dtype of every Brand factor's rows, padded to
   the longest rank. G-side sums are pre-weighted on their rank
   (`Curvature.g_weight`), so that the sum, folded with the global counts,
   equals one process's statistics of the global batch.
3. **update**: every rank folds the running averages; the layer's *owner*
   (greedy longest-processing-time on `Curvature.cost`, `assign_lpt`) also
   decomposes (K-FAC family), runs the Brand eigen-update or the SINGD K/C
   step.
4. **share**: owners send what they computed (`Curvature.shared_state`:
   decompositions, Brand eigenpairs, SINGD K/C/momenta, sketch generator
   states): one ``all_gather_object`` of shapes and numbers, then one
   ``broadcast`` per owner and dtype. Only on steps where such work was due.
5. **precondition**: every rank applies every layer's preconditioner to the
   (identical, already averaged) gradients, so every rank ends the step with
   identical parameters and complete optimizer state (rank 0 can save it).

MEM-OPT (``grad_worker_fraction = 1/world``): a layer whose curvature allows it
(`Curvature.memory_split`: the K-FAC family, whose statistics do not depend on
its preconditioner) keeps its decompositions on its owner only. In step 4 the
owner sends only the plain numbers of `Curvature.shared_state` (counters, ranks,
flags: what keeps every rank's bookkeeping, and so its collectives, in step);
in step 5 the owner applies the layer's preconditioner and broadcasts the
preconditioned gradient (one ``broadcast`` per owner and dtype, every step),
and every rank writes what it received. SINGD layers need ``K`` and ``C`` on
every rank for their statistics (``Π(Kᵀ aᵀa K)``), so they stay COMM-OPT.
Checkpoints are per rank then (each holds the decompositions it owns).

Not distributed (one process, or ``process_group=False``): none of this runs —
no collectives and no extra host syncs.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .curvature import BatchCounts
from .linalg import DecompositionError

if TYPE_CHECKING:
    from .preconditioner import ManagedLayer, Preconditioner

__all__ = ["Distributed", "StatisticsExchange", "assign_lpt", "balance", "check_grad_worker_fraction", "resolve_group", "unwrap"]

ProcessGroupArg = Any  # ProcessGroup | bool | None


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wrapper holds (the model itself otherwise).

    Hooks go on the inner module and layer names are its names (``fc1``, not
    ``module.fc1``), so policies and checkpoints do not depend on the wrapper.
    """
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def resolve_group(model: nn.Module, process_group: ProcessGroupArg) -> Any:
    """The process group to train over, or ``None`` for one process.

    ``None`` (default): the DDP wrapper's group, else the default group when
    ``torch.distributed`` is initialised; ``False``: one process regardless;
    ``True``: the default group (it must be initialised); a ``ProcessGroup``:
    that group. A group of one rank is one process.
    """
    from torch.nn.parallel import DistributedDataParallel

    if process_group is False:
        return None
    initialized = dist.is_available() and dist.is_initialized()
    if process_group is None:
        if not initialized:
            return None
        group = getattr(model, "process_group", None) if isinstance(model, DistributedDataParallel) else None
        group = group if group is not None else dist.group.WORLD
    elif process_group is True:
        if not initialized:
            raise ValueError("process_group=True needs torch.distributed.init_process_group() first")
        group = dist.group.WORLD
    else:
        if not initialized:
            raise ValueError("process_group given but torch.distributed is not initialized")
        if not isinstance(process_group, dist.ProcessGroup):
            raise ValueError(
                f"process_group must be a torch.distributed ProcessGroup, True, False or None "
                f"(got {type(process_group).__name__})"
            )
        group = process_group
    return group if dist.get_world_size(group) > 1 else None


def assign_lpt(costs: dict[str, float], world: int) -> tuple[dict[str, int], list[float]]:
    """Greedy longest-processing-time: layers by decreasing cost, each to the least-loaded rank.

    Deterministic (ties go to the lower rank, equal costs keep the given
    order), so every rank computes the same assignment. Returns the owner of
    each layer and every rank's total cost. The makespan is at most
    ``4/3 − 1/(3·world)`` times the optimum.
    """
    loads = [0.0] * world
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: -costs[n]):  # sorted() is stable
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[name] = rank
        loads[rank] += costs[name]
    return {name: owners[name] for name in costs}, loads


def balance(loads: Sequence[float]) -> float:
    """``max / mean`` of the per-rank costs (1 = perfectly balanced)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


# -- the statistics exchange -----------------------------------------------------------------


@dataclass
class _Sum:
    tensors: list[Tensor]
    receive: Callable[[list[Tensor]], None]
    results: list[Tensor | None] = field(default_factory=list)


@dataclass
class _Rows:
    rows: Tensor
    rows_per_rank: list[int]
    receive: Callable[[Tensor], None]


class StatisticsExchange:
    """Collects one step's staged statistics and reduces them in few, bucketed collectives.

    Curvatures call `all_reduce` (tensors to be summed over ranks) and
    `all_gather_rows` (row blocks to be concatenated in rank order) from
    `Curvature.exchange_statistics`; `run` flattens everything of one dtype
    into one buffer, launches every collective asynchronously, waits, and
    hands each caller its result.
    """

    def __init__(self, group: Any, world: int, device: torch.device) -> None:
        self.group = group
        self.world = world
        self.rank = dist.get_rank(group)
        self.device = device
        self._sums: list[_Sum] = []
        self._rows: list[_Rows] = []
        #: Payload bytes this rank contributed to the last `run`: ``{"all_reduce": n, "all_gather": n}``.
        self.bytes = {"all_reduce": 0, "all_gather": 0}

    def all_reduce(self, tensors: list[Tensor], receive: Callable[[list[Tensor]], None]) -> None:
        """Sum ``tensors`` over ranks; ``receive(sums)`` gets them (same shapes, dtypes and devices)."""
        self._sums.append(_Sum(list(tensors), receive, [None] * len(tensors)))

    def all_gather_rows(self, rows: Tensor, rows_per_rank: list[int], receive: Callable[[Tensor], None]) -> None:
        """Concatenate every rank's ``rows`` (``(rows_per_rank[r], d)``) in rank order; ``receive(all_rows)``."""
        if rows.shape[0] != rows_per_rank[self.rank]:
            raise RuntimeError(f"staged {rows.shape[0]} rows but counted {rows_per_rank[self.rank]}")
        self._rows.append(_Rows(rows, list(rows_per_rank), receive))

    def run(self) -> None:
        """Launch every collective (async), wait for all, hand the results back."""
        pending: list[tuple[Any, Callable[[], None]]] = []
        sums: dict[torch.dtype, list[tuple[_Sum, int]]] = defaultdict(list)
        for item in self._sums:
            for i, t in enumerate(item.tensors):
                sums[t.dtype].append((item, i))
        for dtype, entries in sums.items():
            flat = torch.cat([item.tensors[i].reshape(-1).to(self.device) for item, i in entries])
            self.bytes["all_reduce"] += flat.numel() * flat.element_size()
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            pending.append((work, lambda entries=entries, flat=flat: _unflatten_sums(entries, flat)))
        rows: dict[torch.dtype, list[_Rows]] = defaultdict(list)
        for item in self._rows:
            rows[item.rows.dtype].append(item)
        for dtype, items in rows.items():
            sizes = [sum(item.rows_per_rank[r] * item.rows.shape[1] for item in items) for r in range(self.world)]
            local = torch.zeros(max(sizes), dtype=dtype, device=self.device)  # padded to the longest rank
            mine = torch.cat([item.rows.reshape(-1).to(self.device) for item in items])
            local[: mine.numel()] = mine
            gathered = [torch.empty_like(local) for _ in range(self.world)]
            self.bytes["all_gather"] += local.numel() * local.element_size()
            work = dist.all_gather(gathered, local, group=self.group, async_op=True)
            pending.append((work, lambda items=items, gathered=gathered: _unflatten_rows(items, gathered)))
        for work, finish in pending:
            work.wait()
            finish()
        for item in self._sums:
            item.receive(item.results)
        self._sums, self._rows = [], []


def _unflatten_sums(entries: list[tuple[_Sum, int]], flat: Tensor) -> None:
    offset = 0
    for item, i in entries:
        t = item.tensors[i]
        item.results[i] = flat[offset : offset + t.numel()].view(t.shape).to(t.device)
        offset += t.numel()


def _unflatten_rows(items: list[_Rows], gathered: list[Tensor]) -> None:
    offsets = [0] * len(gathered)
    for item in items:
        dim = item.rows.shape[1]
        blocks = []
        for r, buffer in enumerate(gathered):
            n = item.rows_per_rank[r] * dim
            blocks.append(buffer[offsets[r] : offsets[r] + n].view(-1, dim))
            offsets[r] += n
        item.receive(torch.cat(blocks).to(item.rows.device))


# -- the plan check ----------------------------------------------------------------------------------


def plan_lines(pre: "Preconditioner", grad_worker_fraction: float) -> list[str]:
    """What must be identical on every rank: managed layers (name, type, shapes, method), fallback modules."""
    lines = [f"grad_worker_fraction={grad_worker_fraction}"]
    for name, m in pre.layers.items():
        lines.append(
            f"{name}: {type(m.layer.module).__name__} {m.layer.shape_text} d_a={m.curvature.dims.d_a} "
            f"d_g={m.curvature.dims.d_g} {m.method.summary()} [{type(m.curvature).__name__}, {m.curvature.dtype}]"
        )
    for plan in pre.fallback_plans:
        shapes = ",".join("x".join(map(str, p.shape)) for p in plan.module.parameters(recurse=False) if p.requires_grad)
        lines.append(f"{plan.name or '(root)'}: {type(plan.module).__name__} {shapes} fallback ({plan.note})")
    return lines


def check_plan(group: Any, lines: list[str], device: torch.device) -> None:
    """Raise the same clear `ValueError` on every rank when the resolved plans differ (no hang).

    One fixed-size all-gather of a digest; only on a mismatch the plans
    themselves are gathered to name the first difference.
    """
    digest = hashlib.sha256("\n".join(lines).encode()).digest()[:24]
    words = torch.tensor([int.from_bytes(digest[i : i + 8], "little", signed=True) for i in range(0, 24, 8)],
                         dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(words) for _ in range(world)]
    dist.all_gather(gathered, words, group=group)
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return
    plans: list[Any] = [None] * world
    dist.all_gather_object(plans, lines, group=group)
    for rank, other in enumerate(plans):
        if other == plans[0]:
            continue
        differ = next(
            (i for i, (a, b) in enumerate(zip(plans[0], other)) if a != b), min(len(plans[0]), len(other))
        )
        mine = plans[0][differ] if differ < len(plans[0]) else "(nothing)"
        theirs = other[differ] if differ < len(other) else "(nothing)"
        raise ValueError(
            "the model or policy differs across ranks (every rank must manage the same layers with the same "
            f"methods): rank 0 has {mine!r} where rank {rank} has {theirs!r}"
        )


# -- the driver ------------------------------------------------------------------------------------------


def check_grad_worker_fraction(value: Any, world: int = 1) -> None:
    """``grad_worker_fraction`` must be in (0, 1]; implemented: 1 (COMM-OPT) and ``1/world`` (MEM-OPT).

    ``world`` is the group's size (1 in one process, where only 1 is valid).
    HYBRID (between the two: groups of ranks sharing a layer) is not implemented.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"grad_worker_fraction must be a number in (0, 1] (got {value!r})")
    if value != 1 and not math.isclose(value, 1 / world, rel_tol=1e-9):
        raise ValueError(
            f"grad_worker_fraction={value}: implemented are 1 (COMM-OPT: every rank keeps every layer's "
            f"preconditioner, owners broadcast decompositions) and 1/world = 1/{world} (MEM-OPT: owners keep "
            "their layers' decompositions and broadcast preconditioned gradients); HYBRID values between "
            "them are not"
        )


class Distributed:
    """Distributed state of one `Preconditioner`: group, layer owners, the per-step protocol.

    Built by the preconditioner when a process group is in use; see the
    module docstring for what is communicated when.

    Attributes:
        group: the process group.
        rank: this process's rank in it.
        world: the group's size.
        owners: rank that computes each layer's decompositions / updates.
        loads: the `Curvature.cost` total assigned to each rank.
        memory_split: whether this is MEM-OPT (``grad_worker_fraction = 1/world``).
        split_layers: the layers whose preconditioner lives on their owner
            only (MEM-OPT; empty under COMM-OPT).
        bytes: payload bytes this rank contributed in the last step, by
            collective (``flags``, ``all_reduce``, ``all_gather``, ``metadata``,
            ``broadcast``, and under MEM-OPT ``gradients``; a ring all-reduce
            moves about twice its payload).
        total_bytes: the same, summed over every step so far.
        communicated_steps: steps counted in ``total_bytes`` (skipped ones included).
    """

    def __init__(self, pre: "Preconditioner", group: Any, grad_worker_fraction: float = 1.0) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        backend = dist.get_backend(group)
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        check_plan(group, plan_lines(pre, grad_worker_fraction), self.device)  # first: the same on every rank
        check_grad_worker_fraction(grad_worker_fraction, self.world)  # then the same verdict on every rank
        self.grad_worker_fraction = float(grad_worker_fraction)
        self.memory_split = self.grad_worker_fraction < 1
        unsupported = [f"{name} ({type(m.curvature).__name__})" for name, m in pre.layers.items()
                       if not m.curvature.distributed_support]
        if unsupported:
            raise ValueError(f"these layers' curvature methods do not support distributed training: {unsupported}")
        costs = {name: type(m.curvature).cost(m.method, m.curvature.dims) for name, m in pre.layers.items()}
        self.costs = costs
        self.owners, self.loads = assign_lpt(costs, self.world)
        self.split_layers: frozenset[str] = frozenset(
            name for name, m in pre.layers.items() if self.memory_split and type(m.curvature).memory_split
        )
        self.bytes: dict[str, int] = {}
        self.total_bytes: dict[str, int] = defaultdict(int)
        self.communicated_steps = 0
        self._table: list[list[int]] | None = None
        self._local: dict[str, BatchCounts | None] = {}

    @property
    def balance(self) -> float:
        """``max / mean`` of the per-rank assigned cost."""
        return balance(self.loads)

    def describe(self) -> str:
        mine = sum(1 for r in self.owners.values() if r == self.rank)
        mode = "COMM-OPT"
        if self.memory_split:
            mode = f"MEM-OPT ({len(self.split_layers)} of {len(self.owners)} layers' preconditioners on their owner only)"
        return (
            f"distributed: rank {self.rank} of {self.world} ({dist.get_backend(self.group)}), {mode}; "
            f"owns {mine} of {len(self.owners)} layers; assignment max/mean cost = {self.balance:.3f}"
        )

    def owns(self, name: str) -> bool:
        """Whether this rank does layer ``name``'s assignable work."""
        return self.owners[name] == self.rank

    def holds_preconditioner(self, name: str) -> bool:
        """Whether this rank keeps layer ``name``'s decompositions (always, except MEM-OPT non-owners)."""
        return name not in self.split_layers or self.owns(name)

    # -- step 1: agree ---------------------------------------------------------------------------------
    def agree(self, found: Tensor, pre: "Preconditioner") -> bool:
        """Take this step's counts and decide together whether to skip; the step's one host sync.

        ``found`` is this rank's non-finite flag (a tensor, ``> 0`` when set).
        Returns ``True`` when any rank found a non-finite gradient.
        """
        self._local = {name: m.capture.take() for name, m in pre.layers.items()}
        host = [n for c in self._local.values() for n in ((c.rows, c.samples) if c is not None else (0, 0))]
        flag = (found.detach().reshape(-1)[:1] > 0).to(device=self.device, dtype=torch.int64)
        vector = torch.cat([flag, torch.tensor(host, dtype=torch.int64, device=self.device)])
        gathered = [torch.empty_like(vector) for _ in range(self.world)]
        dist.all_gather(gathered, vector, group=self.group)
        table = torch.stack(gathered).tolist()  # the host sync
        self.bytes = {"flags": vector.numel() * vector.element_size()}
        self.total_bytes["flags"] += self.bytes["flags"]
        self.communicated_steps += 1
        if any(row[0] for row in table):
            self._table = None
            return True
        self._table = table
        return False

    # -- steps 2 to 5 ---------------------------------------------------------------------------------------
    def precondition(
        self, pre: "Preconditioner", *, inner_products: bool, loss_scale: Tensor | None
    ) -> dict[str, Tensor]:
        if self._table is None:  # called without `agree` (a direct call): agree now, found nothing here
            if self.agree(torch.zeros(1), pre):
                pre.skip()
                return {}
        table, local = self._table, self._local
        self._table, self._local = None, {}
        exchange = StatisticsExchange(self.group, self.world, self.device)
        totals: dict[str, BatchCounts | None] = {}
        for i, (name, m) in enumerate(pre.layers.items()):
            rows_per_rank = [row[1 + 2 * i] for row in table]
            samples = sum(row[2 + 2 * i] for row in table)
            counts = pre.step_counts(m.capture, local[name], loss_scale)
            if sum(rows_per_rank) == 0:
                totals[name] = None
                m.curvature.discard()
                continue
            totals[name] = total = BatchCounts(rows=sum(rows_per_rank), samples=samples)
            m.curvature.exchange_statistics(exchange, counts, total, rows_per_rank)
        exchange.run()
        self.bytes.update(exchange.bytes)

        changed: list[str] = []
        errors: dict[str, tuple[str, str]] = {}
        for name, m in pre.layers.items():
            owner = self.owners[name] == self.rank
            try:
                if m.curvature.update_assigned(pre.steps, totals[name], compute=owner):
                    changed.append(name)
            except Exception as error:  # noqa: BLE001 — every rank must hear of it, or the others hang
                if not owner:
                    raise
                errors[name] = (type(error).__name__, str(error))
                changed.append(name)
        if changed:
            self._share(pre, changed, errors)

        directions = self._exchange_directions(pre) if self.split_layers else {}
        for kind, count in self.bytes.items():
            if kind != "flags":
                self.total_bytes[kind] += count
        inner: dict[str, Tensor] = {}
        for name, m in pre.layers.items():
            pre.precondition_layer(m, inner_products, inner, direction=directions.get(name))
        return inner

    def _exchange_directions(self, pre: "Preconditioner") -> dict[str, Tensor]:
        """MEM-OPT: owners precondition their split layers and broadcast the results.

        Every rank knows which split layers have a gradient and a ready
        preconditioner (the counters travel in the shared numbers), their
        shapes and dtypes, so the buffers need no metadata. Owners use the
        buffer they sent, like everybody else, so that the inner products of
        the clip agree bit for bit.
        """
        sizes: dict[int, dict[torch.dtype, list[tuple[str, tuple[int, int]]]]] = defaultdict(lambda: defaultdict(list))
        grads: dict[str, Tensor] = {}
        for name in pre.layers:
            m = pre.layers[name]
            if name not in self.split_layers or not m.curvature.ready:
                continue
            grad = m.layer.grad_matrix()
            if grad is None:
                continue
            grads[name] = grad
            shape = (m.curvature.dims.d_g, m.curvature.dims.d_a)
            sizes[self.owners[name]][_wire_dtype(m.curvature.dtype)].append((name, shape))
        pending = []
        self.bytes["gradients"] = 0
        for src in range(self.world):
            for wire_dtype in sorted(sizes[src], key=str):
                entries = sizes[src][wire_dtype]
                if src == self.rank:
                    parts = [pre.layers[name].curvature.precondition(grads[name]).to(wire_dtype).reshape(-1)
                             for name, _ in entries]
                    buffer = torch.cat(parts).to(self.device)
                    self.bytes["gradients"] += buffer.numel() * buffer.element_size()
                else:
                    count = sum(math.prod(shape) for _, shape in entries)
                    buffer = torch.empty(count, dtype=wire_dtype, device=self.device)
                work = dist.broadcast(buffer, dist.get_global_rank(self.group, src), group=self.group, async_op=True)
                pending.append((work, entries, buffer))
        directions: dict[str, Tensor] = {}
        for work, entries, buffer in pending:
            work.wait()
            offset = 0
            for name, shape in entries:
                n = math.prod(shape)
                curvature = pre.layers[name].curvature
                directions[name] = _unwire(buffer[offset : offset + n], curvature.dtype).view(shape).to(grads[name].device)
                offset += n
        return directions

    def _share(self, pre: "Preconditioner", changed: list[str], errors: dict[str, tuple[str, str]]) -> None:
        """Owners send the state their assigned work produced; everybody else loads it."""
        numbers: dict[str, dict[str, Any]] = {}
        specs: dict[str, list[tuple[str, tuple[int, ...], str, str]]] = {}
        send: dict[torch.dtype, list[Tensor]] = defaultdict(list)
        for name in changed:
            if self.owners[name] != self.rank or name in errors:
                continue
            state = pre.layers[name].curvature.shared_state()
            numbers[name] = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
            specs[name] = []
            if name in self.split_layers:  # MEM-OPT: the tensors stay with the owner, only the numbers travel
                continue
            for key, value in state.items():
                if isinstance(value, Tensor):
                    wire = _wire(value)
                    specs[name].append((key, tuple(value.shape), str(value.dtype), str(value.device)))
                    send[wire.dtype].append(wire.reshape(-1))
        meta: list[Any] = [None] * self.world
        dist.all_gather_object(meta, (numbers, specs, errors), group=self.group)
        self.bytes["metadata"] = len(pickle.dumps((numbers, specs, errors)))
        failures = {name: (rank, error) for rank, (_, _, errs) in enumerate(meta) for name, error in errs.items()}
        if failures:
            name, (rank, (kind, message)) = next(iter(failures.items()))
            text = f"rank {rank} (owner of layer {name!r}) failed: {kind}: {message}"
            raise DecompositionError(text) if kind == DecompositionError.__name__ else RuntimeError(text)
        # one broadcast per owner and wire dtype, all in flight together
        pending = []
        self.bytes["broadcast"] = 0
        for src in range(self.world):
            _, src_specs, _ = meta[src]
            sizes: dict[torch.dtype, int] = defaultdict(int)
            for layer_specs in src_specs.values():
                for _, shape, dtype, _ in layer_specs:
                    sizes[_wire_dtype(_dtype(dtype))] += math.prod(shape)
            for wire_dtype in sorted(sizes, key=str):
                if src == self.rank:
                    buffer = torch.cat(send[wire_dtype]).to(self.device)
                    self.bytes["broadcast"] += buffer.numel() * buffer.element_size()
                else:
                    buffer = torch.empty(sizes[wire_dtype], dtype=wire_dtype, device=self.device)
                work = dist.broadcast(buffer, dist.get_global_rank(self.group, src), group=self.group, async_op=True)
                pending.append((work, src, wire_dtype, buffer))
        received: dict[tuple[int, torch.dtype], Tensor] = {}
        for work, src, wire_dtype, buffer in pending:
            work.wait()
            received[(src, wire_dtype)] = buffer
        # Owners load their own state back from what they sent, as the others do: every rank
        # then holds the same values in the same (contiguous) layout, so later products agree
        # bit for bit (eigh returns column-major vectors; a copy would be row-major).
        # MEM-OPT's split layers: the owner keeps its state; the others load the numbers.
        for src in range(self.world):
            src_numbers, src_specs, _ = meta[src]
            offsets: dict[torch.dtype, int] = defaultdict(int)
            for name, layer_specs in src_specs.items():
                if name in self.split_layers and src == self.rank:
                    continue
                state = dict(src_numbers[name])
                for key, shape, dtype_text, device in layer_specs:
                    dtype = _dtype(dtype_text)
                    wire_dtype = _wire_dtype(dtype)
                    n, start = math.prod(shape), offsets[wire_dtype]
                    offsets[wire_dtype] += n
                    piece = received[(src, wire_dtype)][start : start + n].clone()
                    state[key] = _unwire(piece, dtype).view(shape).to(device)
                pre.layers[name].curvature.load_shared_state(state)


_DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


def _dtype(text: str) -> torch.dtype:
    return _DTYPES[text]


def _wire_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor travels as (gloo lacks bool and int16 broadcasts; both convert exactly)."""
    return {torch.bool: torch.uint8, torch.int16: torch.int32}.get(dtype, dtype)


def _wire(t: Tensor) -> Tensor:
    return t.detach().contiguous().to(_wire_dtype(t.dtype))


def _unwire(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype)
