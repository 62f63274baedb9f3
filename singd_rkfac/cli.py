"""The ``singd-rkfac`` command line (also ``python -m singd_rkfac``).

Subcommands:

* ``demo`` — AdamW and K-FAC policies side by side on scikit-learn's digits.
* ``policy FILE.toml --model NAME`` — how a policy file resolves on a built-in model.

Mistakes in the input (a missing file, a bad policy, an unknown option) end
with a one-line ``error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .data import MODELS
from .demo import DEFAULT_STEPS, QUICK_STEPS, run_demo
from .policy import Policy

__all__ = ["main", "build_parser"]

USAGE_ERROR = 2


class UsageError(Exception):
    """A mistake in the command line or its input files."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises `UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
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
    demo.add_argument("--steps", type=_positive_int, default=None, metavar="N",
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
