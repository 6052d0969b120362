"""benchmarks/accuracy.py end to end on a short digits run: every method trains, freezes and
reports on the device it is given (issue 7's benchmark; the full runs live in RESULTS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
try:
    import accuracy
finally:
    sys.path.pop(0)


def _run_every_method(tmp_path: Path, device: str) -> dict[str, dict]:
    out = tmp_path / "accuracy.json"
    accuracy.main(
        ["--settings", "digits-mlp", "--epochs", "6", "--seeds", "0", "--densities", "0.25",
         "--device", device, "--json", str(out)]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["args"]["device"] == device
    assert (tmp_path / "accuracy_digits-mlp.png").is_file()
    return {row["method"]: row for row in saved["rows"]}


def _check_rows(rows: dict[str, dict]) -> None:
    assert set(rows) == set(accuracy.METHODS)
    dense = rows["dense"]
    assert dense["accuracy"] > 80  # 6 epochs of digits; chance is 10%
    for method, row in rows.items():
        if method == "dense":
            continue
        assert row["accuracy"] > 50, (method, row["accuracy"])
        # freeze(multiple=) rounds down within the budget; static keeps round(0.25 * 512)
        assert 0.2 <= row["achieved_density"] <= 0.25 + 1e-9, (method, row)
        assert row["train_gflops"] > 0 and row["train_seconds"] > 0
        if method != "paper-code":  # dense masked compute: more FLOPs than dense
            assert row["train_gflops"] < dense["train_gflops"] / 2, (method, row)


def test_every_method_trains_and_reports_on_cpu(tmp_path):
    _check_rows(_run_every_method(tmp_path, "cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU path needs a CUDA GPU")
def test_every_method_trains_and_reports_on_cuda(tmp_path):
    _check_rows(_run_every_method(tmp_path, "cuda"))
