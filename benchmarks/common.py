"""Shared pieces of the benchmark scripts: options, models, timing, results.

Every benchmark follows /work/shared/BENCHMARKS.md: CPU by default (``--device
cuda`` on a GPU), figures compared within one run against a baseline measured
in the same process, interleaved (A B C A B C …) after warm-up, median of
repeats; ``NAME.json`` (machine, versions, every raw number) and ``NAME.png``
under ``--out``; a short table on stdout; ``--quick`` for the smoke tests.

A script's ``main(argv)`` raises ``ValueError`` for a bad option when called
with an argument list (as ``singd-rkfac bench`` and the tests do), and behaves
like any argparse script (usage on stderr, exit code 2) when run from a shell.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import itertools
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

import singd_rkfac as sr
from singd_rkfac._table import format_bytes, format_table  # noqa: F401 (format_bytes: for the scripts)
from singd_rkfac.cli import positive_int  # noqa: F401 (argparse type, for the scripts)

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
DEFAULT_CPU_THREADS = 2
BATCH_SIZE = 128
NUM_CLASSES = 10

#: Keys every results file carries (checked by `write_results`).
REQUIRED_KEYS = ("benchmark", "machine", "torch", "device", "threads", "config", "raw", "summary")


# -- options ----------------------------------------------------------------------------------------
class BenchmarkUsageError(ValueError):
    """A bad benchmark option, raised when ``main`` is called with an argument list."""


class BenchParser(argparse.ArgumentParser):
    """argparse that raises `BenchmarkUsageError` instead of exiting when ``raise_errors`` is set."""

    raise_errors = False

    def error(self, message: str) -> None:  # type: ignore[override]
        if self.raise_errors:
            raise BenchmarkUsageError(f"{message} (see {self.prog} --help)")
        super().error(message)


def common_parser() -> argparse.ArgumentParser:
    """The options every benchmark takes (an argparse parent parser)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("common benchmark options")
    group.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    group.add_argument("--quick", action="store_true", help="tiny sizes, finishes in seconds (smoke test)")
    group.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help=f"torch CPU threads (default: {DEFAULT_CPU_THREADS} on cpu, torch's default on cuda)")
    group.add_argument("--out", type=Path, default=RESULTS_DIR, metavar="DIR",
                       help="folder for NAME.json and NAME.png (default: benchmarks/results)")
    group.add_argument("--repeats", type=positive_int, default=None, metavar="N",
                       help="timed repeats per measurement (default: set by each benchmark)")
    group.add_argument("--seed", type=int, default=0, help="seed of weights and data (default: 0)")
    return parent


def make_parser(name: str, description: str) -> BenchParser:
    """A benchmark's parser with the common options; add the benchmark's own options to it."""
    return BenchParser(prog=f"singd-rkfac bench {name}", description=description, parents=[common_parser()])


def parse_args(parser: BenchParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` (``None`` = the shell's) and settle the common options.

    Sets ``args.device`` to a ``torch.device`` and ``args.threads`` to the
    thread count in effect; with an explicit ``argv`` a bad option raises
    `BenchmarkUsageError` instead of exiting.
    """
    parser.raise_errors = argv is not None
    if argv is None:
        parser.prog = os.path.basename(sys.argv[0]) or parser.prog
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    args.device = torch.device(args.device)
    if args.threads is None:
        args.threads = DEFAULT_CPU_THREADS if args.device.type == "cpu" else torch.get_num_threads()
    return args


@contextlib.contextmanager
def configured(args: argparse.Namespace) -> Iterator[None]:
    """Run with ``args.threads`` torch threads (restored afterwards) and a seeded RNG."""
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Progress:
    """A progress bar over a benchmark's work items, naming the current one (tqdm on stderr).

    Without tqdm (an optional ``bench`` dependency) every item is a plain line
    on stdout instead. ``extend`` adds items discovered on the way.
    """

    def __init__(self, total: int, desc: str) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self._bar = None if tqdm is None else tqdm(total=total, desc=desc, unit="item", file=sys.stderr, leave=True)
        self._started = False

    def next(self, item: str) -> None:
        """Finish the previous item and start ``item``."""
        if self._bar is None:
            print(f"{item} …", flush=True)
            return
        if self._started:
            self._bar.update(1)
        self._started = True
        self._bar.set_postfix_str(item)

    def extend(self, items: int) -> None:
        """``items`` more work items than announced."""
        if self._bar is not None:
            self._bar.total += items
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(int(self._started))
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- machine and results -------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str) -> dict[str, Any]:
    """Platform, CPU, versions, thread count and, on cuda, the GPU."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "singd_rkfac": sr.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):  # other processes on a shared machine skew absolute times
        info["load_average_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(index)
        info["cuda"] = torch.version.cuda
    return info


def new_payload(name: str, args: argparse.Namespace, config: Mapping[str, Any]) -> dict[str, Any]:
    """The fields every results file starts with; the benchmark adds ``raw`` and ``summary``."""
    return {
        "benchmark": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.device),
        "torch": torch.__version__,
        "device": str(args.device),
        "threads": args.threads,
        "quick": bool(args.quick),
        "config": dict(config),
        "raw": {},
        "summary": {},
    }


def _jsonable(value: Any) -> Any:
    """Plain JSON: non-finite floats become ``None``, dtypes and paths strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    return value


def write_results(name: str, payload: Mapping[str, Any], figure: Any, out_dir: Path | str) -> dict[str, Path]:
    """Write ``out_dir/NAME.json`` and, when ``figure`` is a matplotlib figure, ``out_dir/NAME.png``."""
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise ValueError(f"results of {name!r} lack {missing}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    if hasattr(os, "getloadavg"):
        payload["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    paths = {"json": out / f"{name}.json"}
    paths["json"].write_text(json.dumps(_jsonable(payload), indent=1, allow_nan=False) + "\n")
    if figure is not None:
        paths["png"] = out / f"{name}.png"
        figure.savefig(paths["png"], dpi=120)
    else:
        print("note: matplotlib is not installed (pip install matplotlib); no plot written")
    for path in paths.values():
        print(f"wrote {path}")
    return paths


def new_figure(width: float = 7.5, height: float = 5.0) -> Any:
    """A bare matplotlib ``Figure`` (Agg canvas, pyplot untouched), or ``None`` without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=(width, height), layout="constrained")


def plain_log_ticks(ax: Any, axes: str = "y") -> None:
    """Label log-scale axes with plain numbers (``0.5``, ``20``), minor ticks too when they span < 1.5 decades."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for name in axes:
        axis, (low, high) = (ax.xaxis, ax.get_xlim()) if name == "x" else (ax.yaxis, ax.get_ylim())
        axis.set_major_formatter(plain)
        narrow = low > 0 and high / low < 30
        axis.set_minor_formatter(plain if narrow else NullFormatter())


#: Colours of the method families (K-FAC, SINGD per structure); baselines are grey/black.
_FAMILY_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                   "tab:olive", "tab:cyan")
_BASELINE_STYLE = {"AdamW": {"color": "black", "linestyle": ":"}, "SGD": {"color": "grey", "linestyle": ":"}}


#: The low-rank K-FAC family: its own colours, dash-dotted, triangles.
_LOWRANK_COLOURS = {"RKFAC": "navy", "SREKFAC": "teal", "NystromKFAC": "darkviolet", "BKFAC": "crimson",
                    "BRKFAC": "darkorange", "BKFACC": "olivedrab"}


#: The literature's relatives: SENG and two-level K-FAC (any coarse space), dashed, diamonds.
_RELATIVE_COLOURS = {"SENG": "magenta", "KFAC-2L": "saddlebrown", "KFAC-2L-nicolaides": "saddlebrown",
                     "KFAC-2L-spectral": "darkcyan", "KFAC-2L-residual": "goldenrod"}


def method_style(name: str) -> dict[str, Any]:
    """Plot style of a `method_factories` label: one colour per family, dashed for bf16/fp16 factors."""
    if name in _BASELINE_STYLE:
        return dict(_BASELINE_STYLE[name], marker="s")
    if name in _LOWRANK_COLOURS:
        return {"color": _LOWRANK_COLOURS[name], "linestyle": "-.", "marker": "^"}
    if name in _RELATIVE_COLOURS:
        return {"color": _RELATIVE_COLOURS[name], "linestyle": "--", "marker": "D", "markersize": 4}
    low = name.endswith(("-bf16", "-fp16"))
    family = name.rsplit("-", 1)[0] if low else name
    families = ["KFAC", *[f"SINGD-{label}" for label in SINGD_STRUCTURES]]
    index = families.index(family) if family in families else len(families)
    return {"color": _FAMILY_COLOURS[index % len(_FAMILY_COLOURS)], "linestyle": "--" if low else "-", "marker": "o"}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> None:
    """Print a plain-text table (``singd_rkfac._table.format_table``), with a title line."""
    if title:
        print(f"\n{title}")
    print(format_table(headers, rows))


def fmt_ms(seconds: float | None) -> str:
    """Seconds as milliseconds with 3 significant digits."""
    return "-" if seconds is None else f"{seconds * 1e3:.3g}"


def fmt_ratio(value: float | None, digits: int = 2) -> str:
    """A ratio with ``digits`` decimals (``-`` when missing)."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


# -- timing ---------------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    """The median (``statistics.median``)."""
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """max / min of repeated timings: near 1 on a quiet machine; ≫ 1 means the run was disturbed."""
    return max(values) / min(values)


#: A baseline `spread` above this is reported as a disturbed measurement.
NOISY_SPREAD = 2.0


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def in_fresh_process(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a new process forked from a server that has only imported torch and this package.

    Each measurement then starts from the same state whatever ran before it in
    this process. That matters on the CPU: glibc raises its mmap and trim
    thresholds after large frees, so an optimizer that allocates fresh
    multi-MB temporaries every step page-faults in a new process but not after
    heavy earlier work, and its times would depend on the order of the
    configurations. ``function`` must be a module-level function of a file
    (the child loads that file by path); ``args`` and the result must pickle.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "singd_rkfac"])
    with context.Pool(1) as pool:
        return pool.apply(_call_from_file, (inspect.getfile(function), function.__name__, args))


def _call_from_file(path: str, name: str, args: tuple[Any, ...]) -> Any:
    """Load the module file ``path`` and call its ``name(*args)`` (the child side of `in_fresh_process`)."""
    spec = importlib.util.spec_from_file_location(f"_fresh_{Path(path).stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)(*args)


def time_interleaved(
    steps: Mapping[str, Callable[[], None]], warmup: int, repeats: int, device: torch.device | str
) -> dict[str, list[float]]:
    """Seconds per call of every callable, interleaved A B C A B C … after ``warmup`` rounds.

    Interleaving spreads the drift of a shared, noisy machine over every
    contender instead of penalising whichever ran last.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


# -- models, data, optimizers -----------------------------------------------------------------------
def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given sizes with ReLU between them (``[784, 512, 10]`` = one hidden layer)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def random_batches(
    count: int, d_in: int, device: torch.device, *, batch_size: int = BATCH_SIZE, seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    """``count`` batches of standard-normal inputs and uniform random labels (fixed by ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, d_in, generator=generator).to(device),
            torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator).to(device),
        )
        for _ in range(count)
    ]


class Trainer:
    """``iterations`` training iterations (forward, backward, step) per call, cycling through ``batches``.

    Every trainer built on the same batch list sees the same batches in the
    same order. ``loss`` is the last loss (a tensor; no host sync while timing).
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence[tuple[Tensor, Tensor]],
        iterations: int = 1,
    ) -> None:
        self.model, self.optimizer, self.iterations = model, optimizer, iterations
        self._batches = itertools.cycle(batches)
        self.steps = 0
        self.loss: Tensor | None = None

    def __call__(self) -> None:
        for _ in range(self.iterations):
            x, y = next(self._batches)
            self.optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            self.loss = loss.detach()
            self.steps += 1

    def last_loss(self) -> float | None:
        """The last loss as a float (``None`` before the first call)."""
        return None if self.loss is None else float(self.loss)

    def finite(self) -> bool:
        """Whether the last loss and every parameter are finite."""
        values = [p.detach() for p in self.model.parameters()]
        if self.loss is not None:
            values.append(self.loss)
        return all(bool(torch.isfinite(v).all()) for v in values)


#: Update-rule hyperparameters of the benchmarks' own (non-anchor) runs.
ADAMW_LR = 1e-3
SGD_LR = 0.01
MOMENTUM = 0.9
UPDATE_EVERY = 10

#: SINGD structures of `scaling` and `memory` (label suffix → structure).
SINGD_STRUCTURES: dict[str, Any] = {
    "dense": "dense",
    "diagonal": "diagonal",
    "block32": sr.structures.Block(32),
    "lowrank16": sr.structures.LowRank(16, True),
    "hierarchical16_16": sr.structures.Hierarchical(16, 16),
    "toeplitz": sr.structures.Toeplitz(lower=True),
}


#: Rank of the low-rank K-FAC family in `scaling` and `memory`.
LOWRANK_RANK = 64

#: K-FAC keeps the optimizer's default KL clip: without it, K-FAC (damping 1e-3) diverges to NaN within
#: two iterations at every width here, and timing NaN arithmetic would say nothing.
KFAC_CLIP = 1e-3


def _ours(method: sr.Method, clip: float | None = None, **options: Any) -> Callable[[nn.Module], torch.optim.Optimizer]:
    # clip=None (SINGD): the update rule of the reference package and of the torch baselines
    return lambda model: sr.Optimizer(model, sr.Policy(default=method), lr=SGD_LR, momentum=MOMENTUM, clip=clip, **options)


def lowrank_methods(rank: int = LOWRANK_RANK) -> dict[str, sr.KFAC]:
    """The low-rank K-FAC family of `scaling` and `memory`: rank ``rank``, K-FAC's update periods.

    Every member decomposes (or hands its Brand basis to the preconditioner)
    every `UPDATE_EVERY` steps like `KFAC`, with statistics every step; B-R-KFAC
    re-sketches and B-KFAC-c corrects every `UPDATE_EVERY` steps too.
    """
    common_fields = {"rank": rank, "inverse_every": UPDATE_EVERY}
    return {
        "RKFAC": sr.RKFAC(**common_fields),
        "SREKFAC": sr.SREKFAC(**common_fields),
        "NystromKFAC": sr.NystromKFAC(**common_fields),
        "BKFAC": sr.BKFAC(**common_fields),
        "BRKFAC": sr.BRKFAC(**common_fields, refresh_every=UPDATE_EVERY),
        "BKFACC": sr.BKFACC(**common_fields, correct_every=UPDATE_EVERY),
    }


def method_factories(
    dtypes: Sequence[torch.dtype | None] = (None,), *, rank: int = LOWRANK_RANK
) -> dict[str, Callable[[nn.Module], torch.optim.Optimizer]]:
    """Every method of `scaling` and `memory` by label: baselines, the K-FAC family, SENG, two-level K-FAC
    (Nicolaides coarse space), SINGD per structure and dtype.

    ``dtypes`` are SINGD's factor dtypes (``None`` = the parameters' fp32);
    labels get a ``-bf16`` / ``-fp16`` suffix for the low-precision ones.
    ``rank`` is the rank of the low-rank K-FAC family (`lowrank_methods`).
    """
    factories: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
        "AdamW": lambda model: torch.optim.AdamW(model.parameters(), lr=ADAMW_LR),
        "SGD": lambda model: torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=MOMENTUM),
        "KFAC": _ours(sr.KFAC(inverse_every=UPDATE_EVERY), clip=KFAC_CLIP),
    }
    for label, method in lowrank_methods(rank).items():
        factories[label] = _ours(method, clip=KFAC_CLIP)
    factories["SENG"] = _ours(sr.SENG(update_every=UPDATE_EVERY), clip=KFAC_CLIP)
    factories["KFAC-2L"] = _ours(
        sr.KFAC(inverse_every=UPDATE_EVERY), clip=KFAC_CLIP, two_level=sr.TwoLevel(update_every=UPDATE_EVERY)
    )
    suffix = {None: "", torch.float32: "", torch.bfloat16: "-bf16", torch.float16: "-fp16"}
    for dtype in dtypes:
        for label, structure in SINGD_STRUCTURES.items():
            method = sr.SINGD(structure=structure, update_every=UPDATE_EVERY, dtype=dtype)
            factories[f"SINGD-{label}{suffix[dtype]}"] = _ours(method)
    return factories


def select(available: Mapping[str, Any], wanted: Sequence[str] | None, parser: BenchParser, option: str) -> list[str]:
    """``wanted`` (all when ``None``) checked against ``available``, in the order of ``available``."""
    if wanted is None:
        return list(available)
    unknown = [name for name in wanted if name not in available]
    if unknown:
        parser.error(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(available)}")
    return [name for name in available if name in wanted]


def run_over_widths(
    name: str,
    args: argparse.Namespace,
    config: Mapping[str, Any],
    widths: Sequence[int],
    measure: Callable[[int], Any],
    summarize: Callable[..., Any],
    report: Callable[[Any], None],
    figure: Callable[[Any], Any],
    *,
    doing: str,
) -> dict[str, Any]:
    """The loop `scaling` and `memory` share: measure every width, summarise, print, write."""
    payload = new_payload(name, args, config)
    with configured(args), Progress(len(widths), name) as progress:
        for d in widths:
            progress.next(f"d={d}: {doing}")
            payload["raw"][str(d)] = measure(d)
    payload["summary"] = summarize(widths, config["methods"], payload["raw"])
    report(payload["summary"])
    write_results(name, payload, figure(payload["summary"]), args.out)
    return payload

