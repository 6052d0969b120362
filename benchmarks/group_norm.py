"""GroupNorm CNNs: does pruning in whole norm groups make training faster?

    python benchmarks/group_norm.py            # about a minute on 2 cores

A GroupNorm is channel-wise in whole norm groups; on compact channels sparsefx runs it as
``sparsefx::group_norm`` (`sparsefx/kernels/norms.py`): eager programs call the native group
norm on the kept groups, traced ones (torch.compile, torch.export) its instance-norm form,
whose shapes stay symbolic. Two measurements, side by side in one process
(`common.time_interleaved`), one thread:

1. the norm alone, forward and backward: the dense ``group_norm`` on every channel, and on
   the kept channels at densities 1, 0.5 and 0.25 the native kernel that eager programs
   call and the instance-norm form (run eagerly: the cost of the form before Inductor
   fuses it, which is why eager programs do not run it);
2. one training step (forward, backward, SGD; sparsefx's K=2 VR-PGE step with its score
   update) of a GroupNorm CNN: dense, and `sparsefx.transform` at densities 0.5 and 0.25.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import environment, format_table, summarize, time_interleaved
from torch import nn

import sparsefx
from sparsefx.kernels import group_norm_direct

BATCH, SIZE, GROUPS = 32, 32, 8
WIDTHS = (64, 128, 256)
DENSITIES = (0.5, 0.25)


def gn_cnn() -> nn.Sequential:
    """Three conv -> GroupNorm(8) -> ReLU blocks (the middle ones strided), then a classifier."""
    layers: list[nn.Module] = []
    channels = 3
    for i, width in enumerate(WIDTHS):
        layers += [
            nn.Conv2d(channels, width, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
            nn.GroupNorm(GROUPS, width),
            nn.ReLU(),
        ]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


def norm_steps() -> dict[str, Callable[[], object]]:
    """Forward + backward of the norm of the middle layer's output."""
    channels, per_group = WIDTHS[1], WIDTHS[1] // GROUPS
    x = torch.randn(BATCH, channels, SIZE // 2, SIZE // 2, requires_grad=True)
    weight = torch.randn(channels, requires_grad=True)
    bias = torch.randn(channels, requires_grad=True)

    def dense() -> None:
        F.group_norm(x, GROUPS, weight, bias).sum().backward()

    steps: dict[str, Callable[[], object]] = {"group_norm (dense)": dense}
    for density in (1.0, *DENSITIES):
        kept = int(channels * density) // per_group * per_group
        inputs = [t.detach()[:, :kept] if t is x else t.detach()[:kept] for t in (x, weight, bias)]
        inputs = [t.clone().requires_grad_() for t in inputs]
        for name, norm in (
            ("eager", group_norm_direct),
            ("traced form", torch.ops.sparsefx.group_norm),
        ):

            def step(norm=norm, xs=inputs[0], ws=inputs[1], bs=inputs[2]) -> None:
                norm(xs, per_group, ws, bs, 1e-5, False).sum().backward()

            steps[f"{name}@{density:g}"] = step
    return steps


def training_steps() -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    x, y = torch.randn(BATCH, 3, SIZE, SIZE), torch.randint(0, 10, (BATCH,))
    dense_model = gn_cnn()
    dense_optimizer = torch.optim.SGD(dense_model.parameters(), lr=0.01)

    def dense() -> None:
        dense_optimizer.zero_grad()
        F.cross_entropy(dense_model(x), y).backward()
        dense_optimizer.step()

    steps: dict[str, Callable[[], object]] = {"dense": dense}
    for density in DENSITIES:
        model = gn_cnn()
        sparse = sparsefx.transform(model, (x,), density=density)
        criterion = sparsefx.wrap_loss(sparse, F.cross_entropy)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(sparse=sparse, criterion=criterion, optimizer=optimizer) -> None:
            optimizer.zero_grad()
            criterion(sparse(x), y).backward()
            optimizer.step()

        steps[f"sparsefx@{density:g}"] = step
    return steps


def table(steps: dict[str, Callable[[], object]], rounds: int, per_round: int) -> str:
    for step in steps.values():  # warm-up: first-call allocations, the sparsefx runtime
        for _ in range(3):
            step()
    times = time_interleaved(steps, rounds, per_round)
    base = summarize(times[next(iter(steps))]).median_ms
    rows = []
    for name, seconds in times.items():
        s = summarize(seconds)
        rows.append(
            [
                name,
                f"{s.median_ms:.2f}",
                f"{s.p25_ms:.2f}-{s.p75_ms:.2f}",
                f"{base / s.median_ms:.2f}x",
            ]
        )
    return format_table(["method@density", "median ms", "IQR ms", "vs first row"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="0: torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(environment())
    print(
        f"\nGroupNorm({GROUPS}, {WIDTHS[1]}) on {BATCH}x{WIDTHS[1]}x{SIZE // 2}x{SIZE // 2}, forward + backward"
    )
    print(table(norm_steps(), args.rounds, 10))
    print(f"\ntraining step, GroupNorm CNN (widths {WIDTHS}, batch {BATCH}x3x{SIZE}x{SIZE})")
    print(table(training_steps(), args.rounds, 3))


if __name__ == "__main__":
    main()
