"""The `sparsefx` command line (console script declared in pyproject.toml)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import NoReturn

from sparsefx.tools import demo


class _Parser(argparse.ArgumentParser):
    """Reports a bad argument as one line on stderr with exit code 2, without the usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; user errors print one line to stderr and return 2."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # argparse stops on --help and on bad arguments
        return int(stop.code or 0)
    try:
        return args.command(args)
    except (FileNotFoundError, ImportError) as err:  # a dataset that is not installed
        print(f"sparsefx: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sparsefx",
        description="Train unmodified PyTorch models with structured sparsity (VR-PGE).",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "demo",
        help="train small models dense and sparse side by side",
        description="Train a CNN and an MLP dense and with sparsefx on the same data, "
        "and compare test accuracy and measured step time.",
    )
    run.add_argument(
        "--dataset",
        choices=sorted(demo.DATASETS),
        default="digits",
        help="digits: about 1 min on 2 CPU cores; fashion-mnist: about 6 min",
    )
    run.add_argument("--density", type=_density, default=0.2, help="kept fraction, in (0, 1]")
    run.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="default: " + ", ".join(f"{n} for {d}" for d, n in demo.DEFAULT_EPOCHS.items()),
    )
    run.add_argument(
        "--seed", type=int, default=0, help="seeds the weights, the data order and the masks"
    )
    run.set_defaults(command=_demo)
    return parser


def _demo(args: argparse.Namespace) -> int:
    demo.run_demo(args.dataset, density=args.density, epochs=args.epochs, seed=args.seed)
    return 0


def _density(text: str) -> float:
    """A float in (0, 1]; a non-number becomes NaN and fails the range check with one message."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


if __name__ == "__main__":
    sys.exit(main())
