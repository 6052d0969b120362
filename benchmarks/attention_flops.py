"""How much of each real model's training step is attention, by FlopCounterMode's per-op
counts: GFLOP/step with and without the CPU attention ops that torch has no formula for
(`common.py` registers them), for dense and sparsefx steps as `real_models.py` counts them.

    python benchmarks/attention_flops.py [--models llama,t5] [--methods sparsefx]

The "without" columns are what GFLOP/step columns measured before the formulas existed.
"""

from __future__ import annotations

import argparse

import torch
from common import format_table
from real_models import FLOP_STEPS, MODELS, steps_for
from torch.utils.flop_counter import FlopCounterMode

ATTENTION_OPS = (
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
)


def flops(step, steps: int) -> tuple[float, float]:
    """Mean FLOPs of a step, and the part of them in the CPU attention ops."""
    total = attention = 0
    for _ in range(steps):
        with FlopCounterMode(display=False) as counter:
            step()
        for op, count in counter.get_flop_counts()["Global"].items():
            total += count
            attention += count if op in ATTENTION_OPS else 0
    return total / steps, attention / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(m for m in MODELS if m != "resnet"))
    parser.add_argument("--methods", default="sparsefx")
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--warmup", type=int, default=200, help="untimed steps first (sparse)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        steps, _ = steps_for(name, args.density, args.methods.split(","))
        counted = {}
        for method, step in steps.items():
            for _ in range(0 if method == "dense" else args.warmup):
                step()
            counted[method] = flops(step, 2 if method == "dense" else FLOP_STEPS)
        dense_total, dense_attention = counted["dense"]
        for method, (total, attention) in counted.items():
            rows.append(
                [
                    name,
                    method,
                    f"{(total - attention) / 1e9:.2f}",
                    f"{total / 1e9:.2f}",
                    f"{100 * attention / total:.1f}%",
                    f"{(dense_total - dense_attention) / (total - attention):.2f}",
                    f"{dense_total / total:.2f}",
                ]
            )
        print(f"{name} done", flush=True)
    headers = ["model", "method", "GFLOP without", "with", "attention", "FLOP× without", "with"]
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
