"""Models and example inputs named on the command line (``sparsefx diff MODULE:FACTORY``)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsefx.capture import where

__all__ = ["Inputs", "UsageError", "build", "example_inputs"]


class UsageError(Exception):
    """Something named on the command line cannot be used: the message says what to change."""


@dataclass
class Inputs:
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


def build(spec: str) -> tuple[nn.Module, Any]:
    """Call the factory `spec` names (``module:function`` or ``file.py:function``): a model,
    and the example inputs it returned with it (None if it returned a model alone)."""
    location, sep, name = spec.rpartition(":")
    if not sep or not location or not name.isidentifier():
        raise UsageError(
            f"expected MODULE:FACTORY (like my_models:build or path/to/models.py:build), got {spec!r}"
        )
    module = _load(location)
    factory = getattr(module, name, None)
    if not callable(factory):
        functions = sorted(
            n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
        )
        raise UsageError(
            f"{location} has no function {name!r}; it defines: {', '.join(functions) or 'nothing callable'}"
        )
    try:
        built = factory()
    except Exception as error:
        raise UsageError(f"the factory {spec} raised {_failure(error)}") from error
    model, example = built if isinstance(built, tuple) and len(built) == 2 else (built, None)
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"the factory {spec} returned {type(built).__name__}; it must return an "
            "nn.Module, or (model, example_inputs)"
        )
    return model, example


def _load(location: str) -> Any:
    """Import a module by name (the current directory is importable, as for ``python -m``)
    or from a .py file (its own folder importable, for sibling imports)."""
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise UsageError(f"no such file: {location}")
        folder = str(path.resolve().parent)
        name = f"sparsefx_factory_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        if folder not in sys.path:
            sys.path.insert(0, folder)
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            raise UsageError(f"importing {location} failed: {_failure(error)}") from error
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(location)
    except ModuleNotFoundError as error:
        raise UsageError(
            f"cannot import {location!r} ({error}); pass an importable module (on PYTHONPATH "
            "or in the current directory) or the path of a .py file"
        ) from error
    except Exception as error:
        raise UsageError(f"importing {location} failed: {_failure(error)}") from error


def _failure(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}{where(error)}"


def example_inputs(
    example: Any, shapes: Sequence[tuple[int, ...]] | None, path: str | None
) -> Inputs:
    """The inputs to capture with: --input-shape, --inputs, or the factory's own."""
    if shapes:
        generator = torch.Generator().manual_seed(0)
        return Inputs(tuple(torch.randn(shape, generator=generator) for shape in shapes))
    if path is not None:
        try:
            example = torch.load(path, weights_only=True)
        except FileNotFoundError as error:
            raise UsageError(f"no such file: {path}") from error
        except Exception as error:
            raise UsageError(
                f"cannot load {path} with torch.load(weights_only=True): {error}"
            ) from error
    if example is None:
        raise UsageError(
            "no example inputs: pass --input-shape N,C,H,W or --inputs FILE.pt, or make the "
            "factory return (model, example_inputs)"
        )
    if isinstance(example, dict):
        return Inputs((), dict(example))
    if isinstance(example, tuple):
        return Inputs(example)
    return Inputs((example,))  # a tensor, or a list that forward takes as one argument
