"""Inference speed of `sparsefx.export`'s compact program against the dense model (issue 8):
the HF ResNet of the coupling issue at density 0.25, batch 32 of 32x32, on CPU.

    .venv/bin/python benchmarks/export_speed.py [--rounds 8] [--json benchmarks/results/export_speed.json]

Rows: the dense model in eval mode (eager, and exported with torch.export), and the exported
compact program of the same model frozen to its top-budget mask, with residual streams dense
(the default) and pruned (`prune_streams=True`). Forward passes under `torch.inference_mode`,
timed round-robin in one process (benchmarks/common.py), medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from common import environment, format_table, summarize, time_interleaved
from torch.utils.flop_counter import FlopCounterMode

import sparsefx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's examples/
from examples.models import hf_resnet_model


def _compact(model: torch.nn.Module, x: torch.Tensor, density: float, **options) -> torch.nn.Module:
    """The model frozen to its top-budget mask at `density`, exported compact."""
    config = sparsefx.SparseConfig(density=density, seed=0, **options)
    sparse = sparsefx.transform(copy.deepcopy(model), (x,), config=config)
    sparsefx.freeze(sparse)
    return sparsefx.export(sparse.eval(), (x,)).module()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="forwards per method per round")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = hf_resnet_model().eval()
    x = torch.randn(32, 3, 32, 32)
    runs = {
        "dense": model,
        "dense-exported": torch.export.export(model, (x,)).module(),
        "compact": _compact(model, x, args.density),
        "compact-streams": _compact(model, x, args.density, prune_streams=True),
    }
    with torch.inference_mode():
        expected = model(x).logits
        for name, run in runs.items():
            output = run(x)
            logits = output.logits if hasattr(output, "logits") else output[0]
            assert logits.shape == expected.shape, name
        flops = {}
        for name, run in runs.items():
            with FlopCounterMode(display=False) as counter:
                run(x)
            flops[name] = counter.get_total_flops()
        steps = {name: (lambda run=run: run(x)) for name, run in runs.items()}
        times = time_interleaved(steps, args.rounds, args.steps)
    summaries = {name: summarize(t) for name, t in times.items()}
    dense_ms = summaries["dense"].median_ms
    rows = [
        {
            "method": name,
            "ms": s.median_ms,
            "iqr_pct": 100 * s.spread,
            "speedup": dense_ms / s.median_ms,
            "gflop": flops[name] / 1e9,
            "flop_ratio": flops["dense"] / flops[name],
        }
        for name, s in summaries.items()
    ]
    env = environment()
    print(
        f"torch {env['torch']} | {env['threads']} threads | CPU: {env['cpu']} "
        f"({env['cores']} logical cores) | load average at start: {env['load_avg']}"
    )
    print(f"HF ResNet (issue 4 config), batch 32 of 32x32, inference, density {args.density}")
    print(
        format_table(
            ["method", "ms/forward", "IQR%", "speedup", "GFLOP", "FLOP×"],
            [
                [r["method"], f"{r['ms']:.1f}", f"{r['iqr_pct']:.0f}", f"{r['speedup']:.2f}x",
                 f"{r['gflop']:.2f}", f"{r['flop_ratio']:.1f}"]
                for r in rows
            ],
        )
    )  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
