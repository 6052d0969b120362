"""The benchmark scripts as Python runs them: `python benchmarks/x.py` puts benchmarks/ first
on sys.path, so a script named like an installed module shadows it for every import made
after (transformers 5.25 imports Hugging Face's `kernels` package, which a
benchmarks/kernels.py once replaced, breaking real_models.py)."""

from __future__ import annotations

import importlib.machinery
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_no_benchmark_script_shadows_an_installed_module():
    others = [p for p in sys.path if Path(p or ".").resolve() != BENCHMARKS.resolve()]
    shadowed = {}
    for script in BENCHMARKS.glob("*.py"):
        spec = importlib.machinery.PathFinder.find_spec(script.stem, others)
        if spec is not None or script.stem in sys.builtin_module_names:
            shadowed[script.name] = spec.origin if spec else "built in"
    assert not shadowed, f"rename these benchmark scripts, they shadow modules: {shadowed}"


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_benchmarks_count_cpu_attention_flops(kv_heads):
    """CPU SDPA counted zero FLOPs under FlopCounterMode, so every transformer's GFLOP column
    missed attention. The benchmarks' formulas count what the explicit form's matmuls count
    (k and v broadcast to the query's heads), and the backward's five matmuls (the scores
    recomputed, then four gradients), as torch counts its CUDA kernels."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from common import count_flops
    finally:
        sys.path.remove(str(BENCHMARKS))
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    k, v = torch.randn(2, 2, kv_heads, 16, 8, requires_grad=True).unbind(0)

    def attention() -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads != 4)

    def explicit() -> Tensor:
        keys, values = (t.repeat_interleave(4 // kv_heads, dim=1) for t in (k, v))
        return (q @ keys.transpose(-1, -2) / 8**0.5).softmax(-1) @ values

    torch.testing.assert_close(attention(), explicit())
    forward = count_flops(lambda: explicit().detach(), min_steps=1, min_seconds=0.0)
    assert forward == 2 * (2 * 2 * 4 * 16 * 16 * 8)
    with torch.no_grad():
        assert count_flops(attention, min_steps=1, min_seconds=0.0) == forward
    step = count_flops(lambda: attention().sum().backward(), min_steps=1, min_seconds=0.0)
    assert step == forward + forward * 5 // 2


def test_model_sweep_checks_a_text_and_a_vision_model_and_compares_structures():
    """benchmarks/model_sweep.py, in process, on DistilBERT (half BERT's time here) and a
    ResNet (BatchNorms, residual streams): both transform into groups and pass every check
    that runs without torch.compile (float64), their results survive JSON, and `--compare`
    reports what an earlier sweep had differently: a group it lacked, a dense op it had, a
    check that mismatched."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import model_sweep
    finally:
        sys.path.remove(str(BENCHMARKS))
    options = model_sweep.Options()
    results = {name: model_sweep.run_case(name, options) for name in ("distilbert", "resnet")}
    for name, result in results.items():
        stages = result["stages"]
        assert {key: s["status"] for key, s in stages.items()} == {
            key: "ok" for key in ("build", "structure", "eval", "grads", "dropped", "train")
        }, f"{name}: {stages}"
        assert len(stages["structure"]["groups"]) > 0
        assert stages["grads"]["grad_rel"] <= model_sweep.RTOL["float64"]
        assert stages["dropped"]["dropped_features"] > 0
    assert "  structure: 2 ok" in model_sweep.report(results, options)

    old = json.loads(json.dumps(results))
    lost = old["distilbert"]["stages"]["structure"]["groups"].pop()
    old["distilbert"]["stages"]["structure"]["dense"].append(
        ["linear_99", "linear.default", "weight is used by several ops (shared weights ...)"]
    )
    old["resnet"]["stages"]["eval"] = {"status": "mismatch", "summary": "logits rel 1.0e-03"}
    changes = model_sweep.compare(old, results).splitlines()
    assert changes == [
        "distilbert:",
        f"  groups + {lost[0]} ({lost[1]}{', stream' * lost[2]})",
        "  dense - linear_99 (linear.default): weight is used by several ops",
        "resnet:",
        "  eval: MISMATCH logits rel 1.0e-03 -> ok",
        "0 of 2 models unchanged",
    ]
    assert model_sweep.compare(results, results) == "2 of 2 models unchanged"
