"""The benchmark scripts as Python runs them: `python benchmarks/x.py` puts benchmarks/ first
on sys.path, so a script named like an installed module shadows it for every import made
after (transformers 5.25 imports Hugging Face's `kernels` package, which a
benchmarks/kernels.py once replaced, breaking real_models.py)."""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_no_benchmark_script_shadows_an_installed_module():
    others = [p for p in sys.path if Path(p or ".").resolve() != BENCHMARKS.resolve()]
    shadowed = {}
    for script in BENCHMARKS.glob("*.py"):
        spec = importlib.machinery.PathFinder.find_spec(script.stem, others)
        if spec is not None or script.stem in sys.builtin_module_names:
            shadowed[script.name] = spec.origin if spec else "built in"
    assert not shadowed, f"rename these benchmark scripts, they shadow modules: {shadowed}"
