"""The `sparsefx` command line (console script declared in pyproject.toml)."""

from __future__ import annotations

import argparse
import ast
import math
import sys
from collections.abc import Sequence
from typing import NoReturn

import torch

from sparsefx.capture import CaptureError
from sparsefx.config import SparseConfig
from sparsefx.kernels import triton_selected
from sparsefx.runtime import DensityError
from sparsefx.tools import demo, diff, factories


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
    except (FileNotFoundError, ImportError, factories.UsageError) as err:
        print(f"sparsefx: error: {err}", file=sys.stderr)  # a dataset, a factory, inputs
        return 2
    except DensityError as err:
        print(f"sparsefx: error: {err} (--density)", file=sys.stderr)
        return 2
    except CaptureError as err:  # the model cannot be captured
        print(f"sparsefx: error: {err}", file=sys.stderr)
        return 1


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
    _add_diff(commands)
    return parser


def _add_diff(commands: argparse._SubParsersAction) -> None:
    show = commands.add_parser(
        "diff",
        help="show what sparsefx does to a model, and why",
        description="Build a model from a factory, capture it as the chosen entry point "
        "would, and print the groups, the costs, the ops left dense and why, and each graph "
        "as a unified diff of annotated node listings (captured -> compact -> score).",
    )
    show.add_argument(
        "factory",
        metavar="MODULE:FACTORY",
        help="a function in an importable module (pkg.models:build) or a .py file "
        "(models.py:build) that returns a model, or (model, example_inputs)",
    )
    inputs = show.add_mutually_exclusive_group()
    inputs.add_argument(
        "--input-shape",
        type=_shape,
        action="append",
        metavar="N,C,H,W",
        help="a float32 input of this shape (random normal); repeat for several inputs",
    )
    inputs.add_argument(
        "--inputs",
        metavar="FILE.pt",
        help="example inputs saved with torch.save: a tuple of forward arguments, a dict of "
        "keyword arguments, or one argument (a tensor); as example_inputs in Python",
    )
    show.add_argument("--density", type=_density, default=0.1, help="kept fraction, in (0, 1]")
    show.add_argument("--mode", choices=diff.MODES, default="transform", help="entry point")
    show.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a SparseConfig field, e.g. --option prune_streams=True --option budget=flops",
    )
    show.add_argument("--html", metavar="REPORT.html", help="also write the HTML report")
    show.add_argument(
        "--context", type=int, default=3, help="unchanged lines around each change (default 3)"
    )
    show.add_argument("--sympy", action="store_true", help="show the cost model's expressions")
    show.set_defaults(command=_diff)


def _demo(args: argparse.Namespace) -> int:
    demo.run_demo(args.dataset, density=args.density, epochs=args.epochs, seed=args.seed)
    return 0


def _diff(args: argparse.Namespace) -> int:
    model, example = factories.build(args.factory)
    inputs = factories.example_inputs(example, args.input_shape, args.inputs)
    try:
        config = SparseConfig.from_options({"density": args.density, **_options(args.option)})
        device = next(iter(model.parameters()), torch.empty(0)).device
        triton_selected(config.kernels, device)  # e.g. kernels=triton on a CPU model
    except (TypeError, ValueError) as err:
        raise factories.UsageError(f"invalid --option: {err}") from err
    report = diff.diff(
        model, inputs.args, config=config, mode=args.mode, example_kwargs=inputs.kwargs
    )
    print(report.text(context=args.context, sympy=args.sympy), end="")
    if args.html:
        print(f"HTML report: {report.save_html(args.html)}")
    return 0


def _options(pairs: list[str]) -> dict[str, object]:
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise factories.UsageError(f"--option takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text  # a bare word: a string option such as budget=flops
    return options


def _shape(text: str) -> tuple[int, ...]:
    parts = text.replace("x", ",").split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"must be positive integers separated by commas, like 2,3,32,32; got {text!r}"
        )
    return tuple(int(p) for p in parts)


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
