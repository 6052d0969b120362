"""Kept channel counts and CPU convolution speed: why `freeze(multiple=16)` and exact shapes
for recurring sampled counts.

    python benchmarks/cpu_channels.py            # about a minute on 2 cores

On the Fashion-MNIST wide CNN of `benchmarks/accuracy.py` (conv 64/128/256, batch 128):

1. fixed masks (`set_masks`) at kept counts on and just past multiples of 16: oneDNN runs
   channels in blocks of the vector width (16 floats on AVX-512, 8 on AVX2), so one channel
   past a multiple costs a block;
2. the first steps of the VR-PGE search, with sampled counts that recur run on exact shapes
   (the default, `runtime.RECURRING`) against always rounded up to `conv_channel_multiple`
   (the behaviour before), and a static mask for scale; eager (`transform`) and compiled;
3. `torch.compile(backend="sparsefx")` under fixed masks: the exact-count twin a compiled CPU
   training graph runs once masks are fixed (the default) against its rounded sampling graph
   (the behaviour before), at counts off and on the 16-channel blocks.

All methods are timed side by side in one process (`common.time_interleaved`).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from accuracy import SETTINGS, cnn
from common import environment, format_table, summarize, time_interleaved
from torch import Tensor

import sparsefx
from sparsefx import compiled, runtime
from sparsefx.tools.datasets import load_fashion_mnist

WIDTHS = (64, 128, 256)
BATCH = 128
COUNTS = [(16, 32, 64), (17, 32, 64), (16, 33, 64), (16, 32, 65), (18, 31, 63), (20, 27, 65)]
# compiled, fixed masks: rounding up to 8 adds 0, 15, 20 and 21 channels
COMPILED_COUNTS = [(16, 32, 64), (18, 31, 63), (20, 27, 65), (9, 17, 29)]


def batches(x: Tensor, y: Tensor, seed: int = 0) -> Callable[[], tuple[Tensor, Tensor]]:
    """The next shuffled training batch at every call, epoch after epoch."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    splits = itertools.cycle(order.split(BATCH)[:-1])

    def batch() -> tuple[Tensor, Tensor]:
        idx = next(splits)
        return x[idx], y[idx]

    return batch


def trainer(
    x: Tensor, density: float = 0.25, *, compile: bool = False
) -> tuple[torch.nn.Module, Callable]:
    """A sparsefx model of the wide CNN with SGD (`transform`, or `torch.compile` with the
    sparsefx backend), and its training step on a batch."""
    torch.manual_seed(0)
    model = cnn(1, 10, WIDTHS)
    if compile:
        sparse = torch.compile(model, backend="sparsefx", options={"density": density})
        sparse(x[:BATCH])  # compiles, so that the structure (and its groups) exists
    else:
        sparse = sparsefx.transform(model, (x[:BATCH],), density=density)
    criterion = sparsefx.wrap_loss(sparse, F.cross_entropy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)

    def step(batch: tuple[Tensor, Tensor]) -> None:
        loss = criterion(sparse(batch[0]), batch[1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return sparse, step


def random_masks(sparse: torch.nn.Module, counts: list[int]) -> dict[str, Tensor]:
    """Masks keeping `counts[i]` random channels of group i (one fixed generator)."""
    generator = torch.Generator().manual_seed(1)
    masks = {}
    for group, kept in zip(sparsefx.groups(sparse), counts, strict=True):
        mask = torch.zeros(group.size, dtype=torch.bool)
        masks[group.name] = mask.index_fill_(
            0, torch.randperm(group.size, generator=generator)[:kept], True
        )
    return masks


def fixed_counts(x: Tensor, y: Tensor, rounds: int) -> str:
    """Training steps under fixed masks of the given kept counts per layer."""
    steps = {}
    for counts in COUNTS:
        sparse, step = trainer(x)
        sparsefx.set_masks(sparse, random_masks(sparse, counts))
        stream = batches(x, y)
        steps[str(counts)] = lambda step=step, stream=stream: step(stream())
    time_interleaved(steps, rounds=1, steps_per_round=3)  # warm-up: oneDNN primitives
    times = time_interleaved(steps, rounds=rounds, steps_per_round=10)
    base = summarize(times[str(COUNTS[0])]).median_ms
    rows = []
    for counts in COUNTS:
        summary = summarize(times[str(counts)])
        blocks = [-(-k // 16) for k in counts]
        rows.append([str(counts), str(blocks), f"{summary.median_ms:.1f}",
                     f"{100 * summary.spread:.0f}", f"{summary.median_ms / base:.2f}"])  # fmt: skip
    headers = ["kept counts", "16-blocks", "ms/step", "IQR%", "vs 16/32/64"]
    return format_table(headers, rows)


def search_steps(x: Tensor, y: Tensor, rounds: int) -> str:
    """The first `rounds` x 20 steps of the search, exact-on-recurrence against rounded."""
    methods: dict[str, Callable[[], None]] = {}
    names = ("recurring exact", "always rounded", "static mask")
    for name in (*names, *(f"compiled, {n}" for n in names[:2])):
        sparse, step = trainer(x, compile=name.startswith("compiled"))
        if name == "static mask":
            sparsefx.set_masks(sparse, random_masks(sparse, [w // 4 for w in WIDTHS]))
        stream = batches(x, y)
        recurring = runtime.RECURRING if not name.endswith("always rounded") else 10**9

        def run(step=step, stream=stream, recurring=recurring) -> None:
            # the threshold is read at each sampled step: "always rounded" never reaches it
            saved, runtime.RECURRING = runtime.RECURRING, recurring
            try:
                step(stream())
            finally:
                runtime.RECURRING = saved

        methods[name] = run
    times = time_interleaved(methods, rounds=rounds, steps_per_round=20)
    rows = []
    half = rounds * 20 // 2
    for name, seconds in times.items():
        early, late = summarize(seconds[:half]), summarize(seconds[half:])
        rows.append([name, f"{early.median_ms:.1f}", f"{late.median_ms:.1f}"])
    headers = ["search step", f"ms, steps 1-{half}", f"ms, steps {half + 1}-{2 * half}"]
    return format_table(headers, rows)


def compiled_fixed_counts(x: Tensor, y: Tensor, rounds: int) -> str:
    """Compiled training steps under fixed masks: exact-count twin against rounded counts,
    both on one model per kept counts (each new model instance is a Dynamo recompile)."""
    exact_twin = compiled._Program.train

    def rounded(program: compiled._Program, exact: bool = False) -> Callable:
        return exact_twin(program, False)

    steps = {}
    for counts in COMPILED_COUNTS:
        sparse, step = trainer(x, compile=True)
        sparsefx.set_masks(sparse, random_masks(sparse, list(counts)))
        stream = batches(x, y)
        for name, train in (("exact", exact_twin), ("rounded", rounded)):

            def run(step=step, stream=stream, train=train) -> None:
                compiled._Program.train = train  # read at every compiled call
                try:
                    step(stream())
                finally:
                    compiled._Program.train = exact_twin

            steps[f"{counts} {name}"] = run
    time_interleaved(steps, rounds=1, steps_per_round=3)  # warm-up: Inductor, oneDNN
    times = time_interleaved(steps, rounds=rounds, steps_per_round=10)
    rows = []
    for counts in COMPILED_COUNTS:
        exact, rounded_ = (summarize(times[f"{counts} {n}"]) for n in ("exact", "rounded"))
        rows.append([str(counts), f"{exact.median_ms:.1f}", f"{rounded_.median_ms:.1f}",
                     f"{rounded_.median_ms / exact.median_ms:.2f}"])  # fmt: skip
    headers = ["kept counts", "exact ms/step", "rounded ms/step", "rounded / exact"]
    return format_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    print(" | ".join(f"{k}: {v}" for k, v in environment().items()))
    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}")
    data = load_fashion_mnist()
    x, y = data.x_train, data.y_train
    assert SETTINGS["fashion-cnn-wide"].batch == BATCH
    print("\nfixed masks, wide CNN at batch 128 (kept counts of conv1, conv2, conv3):")
    print(fixed_counts(x, y, args.rounds))
    print("\nVR-PGE search at density 0.25 from the first step, score lr 0.3:")
    print(search_steps(x, y, args.rounds))
    print("\ntorch.compile(backend='sparsefx'), fixed masks, wide CNN at batch 128:")
    print(compiled_fixed_counts(x, y, args.rounds))


if __name__ == "__main__":
    main()
