"""The ``singd-rkfac`` command line (also ``python -m singd_rkfac``).

Subcommands:

* ``demo`` — AdamW and K-FAC policies side by side on scikit-learn's digits.
* ``policy FILE.toml --model NAME`` — how a policy file resolves on a built-in model.
* ``bench NAME [ARGS...]`` / ``bench --list`` — run a benchmark script of the
  source checkout (``benchmarks/NAME.py``, its ``main(ARGS)``).

Mistakes in the input (a missing file, a bad policy, an unknown option) end
with a one-line ``error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .data import MODELS
from .demo import DEFAULT_STEPS, QUICK_STEPS, run_demo
from .policy import Policy

__all__ = ["main", "build_parser", "available_benchmarks", "load_benchmark"]

USAGE_ERROR = 2
#: The benchmark scripts of the source checkout (the package is installed editable from it).
BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
#: Modules in the benchmarks folder that are not benchmarks.
_NOT_BENCHMARKS = frozenset({"common"})


class UsageError(Exception):
    """A mistake in the command line or its input files."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises `UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (got {text!r})")
    return value


def _demo(args: argparse.Namespace) -> int:
    run_demo(steps=args.steps, out_dir=args.out, seed=args.seed, quick=args.quick, plot=not args.no_plot)
    return 0


def _policy(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"policy file not found: {path}")
    try:
        policy = Policy.from_toml(path)
    except ValueError as error:  # TOML syntax, unknown methods or keys, bad field values
        raise UsageError(f"{path}: {error}") from error
    print(policy.describe(MODELS[args.model]()))
    return 0


def _benchmarks_folder() -> Path:
    folder = BENCHMARKS_DIR
    if not folder.is_dir():
        raise UsageError(
            f"benchmarks folder not found: {folder} (bench runs the scripts of a source checkout; "
            "install the package from a clone with pip install -e .)"
        )
    return folder


def available_benchmarks() -> dict[str, str]:
    """Benchmark name → first line of its docstring, for every ``benchmarks/NAME.py``."""
    found = {}
    for path in sorted(_benchmarks_folder().glob("*.py")):
        if path.stem.startswith("_") or path.stem in _NOT_BENCHMARKS:
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        except SyntaxError:
            doc = "(does not parse)"
        found[path.stem] = doc.strip().split("\n")[0]
    return found


def load_benchmark(name: str):
    """Import ``benchmarks/NAME.py`` of the source checkout (its folder goes on ``sys.path`` for ``common``)."""
    names = available_benchmarks()
    if name not in names:
        raise UsageError(f"unknown benchmark {name!r}; available: {', '.join(names) or 'none'}")
    folder = str(_benchmarks_folder())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module_name = f"singd_rkfac_bench_{name}"
    spec = importlib.util.spec_from_file_location(module_name, Path(folder) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _bench(args: argparse.Namespace) -> int:
    if args.list:
        if args.name is not None:
            raise UsageError("bench --list takes no benchmark name")
        names = available_benchmarks()
        width = max(map(len, names), default=0)
        for name, doc in names.items():
            print(f"{name.ljust(width)}  {doc}")
        return 0
    if args.name is None:
        raise UsageError(f"bench needs a benchmark NAME or --list; available: {', '.join(available_benchmarks())}")
    load_benchmark(args.name).main(list(args.args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser with every subcommand; each sets ``handler``."""
    parser = _Parser(prog="singd-rkfac", description="Kronecker-factored natural-gradient optimizers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a digits MLP with AdamW and K-FAC policies side by side",
        description="Train an MLP on scikit-learn's digits with AdamW and two K-FAC policies "
        "(same weights, same minibatches); print a table and write loss.png.",
    )
    demo.add_argument("--steps", type=positive_int, default=None, metavar="N",
                      help=f"steps per optimizer (default: {DEFAULT_STEPS}, or {QUICK_STEPS} with --quick)")
    demo.add_argument("--out", default="demo_out", metavar="DIR", help="folder for loss.png (default: demo_out)")
    demo.add_argument("--seed", type=int, default=0, help="seed of weights, split and batch order (default: 0)")
    demo.add_argument("--quick", action="store_true", help="a run of a few seconds (smoke test)")
    demo.add_argument("--no-plot", action="store_true", help="do not write loss.png")
    demo.set_defaults(handler=_demo)

    policy = commands.add_parser(
        "policy",
        help="show how a policy TOML file resolves on a built-in model",
        description="Build sr.Policy.from_toml(FILE) and print policy.describe(model).",
    )
    policy.add_argument("file", metavar="FILE.toml", help="policy file ([default] table and [[rules]])")
    policy.add_argument("--model", choices=sorted(MODELS), default="mlp",
                        help="built-in model: mlp = digits MLP 64-128-128-10, cnn = small digits CNN (default: mlp)")
    policy.set_defaults(handler=_policy)

    bench = commands.add_parser(
        "bench",
        help="run a benchmark of the source checkout (benchmarks/NAME.py)",
        description="Run benchmarks/NAME.py of the source checkout with ARGS (see BENCHMARKS.md); "
        "results go to benchmarks/results/NAME.json and NAME.png unless --out says otherwise. "
        "'singd-rkfac bench NAME --help' shows a benchmark's options.",
    )
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.add_argument("name", nargs="?", metavar="NAME", help="benchmark to run (see --list)")
    bench.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                       help="options of the benchmark, e.g. --quick, --device cuda, --out DIR")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (2 for mistakes in the input)."""
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except SystemExit as done:  # --help and --version
        return done.code if isinstance(done.code, int) else 0
    except (UsageError, ValueError, OSError, ImportError) as error:
        message = " ".join(str(error).split())
        print(f"error: {message}", file=sys.stderr)
        return USAGE_ERROR
