"""Shared benchmark helpers: the benchmark models, the machine description, noise-robust
interleaved timing, FLOP counting and plain-text tables.

Timings on a shared CPU drift with other processes' load, so every benchmark here times its
methods side by side in one process: all methods are warmed up first, then run round-robin
(alternating direction each round) and summarised by medians, which a burst of outside load
in one round cannot move much.
"""

from __future__ import annotations

import gc
import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

__all__ = [
    "MODELS",
    "ModelCase",
    "Summary",
    "channel_block",
    "count_flops",
    "environment",
    "format_table",
    "summarize",
    "time_interleaved",
]

Step = Callable[[], object]


# -- models ------------------------------------------------------------------------------------


def build_mlp() -> nn.Sequential:
    """MLP 512→4×2048→10: four consecutive prunable 2048-wide layers, where FLOPs fall as d²."""
    widths = [512, 2048, 2048, 2048, 2048]
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], 10))


def build_cnn() -> nn.Sequential:
    """Six 3×3 conv layers of 128 channels (conv → BatchNorm → ReLU), pooled, then a classifier.

    The convolutions have no bias, as usual before BatchNorm (the BN shift replaces it).
    """
    layers: list[nn.Module] = []
    channels = 3
    for _ in range(6):
        layers += [
            nn.Conv2d(channels, 128, 3, padding=1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(),
        ]
        channels = 128
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


@dataclass(frozen=True)
class ModelCase:
    """A benchmark model with its input batch shape (10 classes, random data)."""

    build: Callable[[], nn.Sequential]
    input_shape: tuple[int, ...]
    description: str

    def make(self, seed: int = 0) -> tuple[nn.Sequential, Tensor, Tensor]:
        """(model, x, y), seeded, so every method starts from the same weights and batch."""
        torch.manual_seed(seed)
        model = self.build()
        x = torch.randn(self.input_shape)
        y = torch.randint(0, 10, (self.input_shape[0],))
        return model, x, y


MODELS: dict[str, ModelCase] = {
    "mlp": ModelCase(build_mlp, (256, 512), "MLP 512→4×2048→10, batch 256"),
    "cnn": ModelCase(
        build_cnn, (64, 3, 16, 16), "6×conv3x3(128)+BN+ReLU → pool → linear, batch 64, 16×16"
    ),
}


# -- machine -----------------------------------------------------------------------------------


def environment() -> dict[str, object]:
    """What the numbers depend on: torch build, threads, CPU model, cores, current load, GPU."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg": [round(v, 2) for v in load],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def channel_block(device: torch.device | str = "cpu") -> int:
    """The channel block to round kept counts to, the `freeze(multiple=)` to use. CPU:
    oneDNN's, 16 floats per AVX-512 vector, else 8 (AVX2; benchmarks/cpu_channels.py
    measures the effect). CUDA: 8, NVIDIA's guideline for tensor-core convolutions and GEMMs
    (channels in multiples of 8), not measured here."""
    if torch.device(device).type == "cuda":
        return 8
    return 16 if "AVX512" in torch.backends.cpu.get_cpu_capability() else 8


# -- timing ------------------------------------------------------------------------------------


def time_interleaved(
    steps: dict[str, Step],
    rounds: int,
    steps_per_round: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds of every single step, per method, timed round-robin.

    Each round runs `steps_per_round` steps of every method in turn, forwards in even rounds
    and backwards in odd ones, so slow drift in outside load and position effects (a method
    that always follows a memory-hungry one) fall evenly on all methods. Garbage collection
    runs between methods, never inside a timed step.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            gc.collect()
            gc.disable()
            try:
                for _ in range(steps_per_round):
                    start = time.perf_counter()
                    steps[name]()
                    times[name].append(time.perf_counter() - start)
            finally:
                gc.enable()
        if progress is not None:
            progress(f"round {r + 1}/{rounds} done")
    return times


@dataclass(frozen=True)
class Summary:
    """Median and quartiles of per-step times, in milliseconds."""

    median_ms: float
    p25_ms: float
    p75_ms: float

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median: how noisy this method's timing was."""
        return (self.p75_ms - self.p25_ms) / self.median_ms


def summarize(seconds: Sequence[float]) -> Summary:
    ms = sorted(1e3 * s for s in seconds)
    if len(ms) < 2:
        return Summary(ms[0], ms[0], ms[0])
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    return Summary(statistics.median(ms), q1, q3)


def count_flops(step: Step, min_steps: int = 2, min_seconds: float = 1.0) -> float:
    """Mean FLOPs of one step, counted by torch's FlopCounterMode (matmuls, convolutions and
    attention, forward and backward; custom ops count through their registered formulas).

    Sparse methods sample a different mask every step and their FLOPs vary with the product of
    consecutive layers' kept counts, so cheap steps are averaged over at least `min_seconds`
    of steps; expensive (dense) ones over `min_steps`.
    """
    total, count, start = 0, 0, time.perf_counter()
    while count < min_steps or time.perf_counter() - start < min_seconds:
        with FlopCounterMode(display=False) as counter:
            step()
        total += counter.get_total_flops()
        count += 1
    return total / count


def _as_query_heads(query_shape: torch.Size, shape: torch.Size) -> tuple[int, ...]:
    """k or v broadcast to the query's heads, as grouped-query attention runs them (torch
    2.11's `sdpa_flop_count` asserts equal heads)."""
    return (shape[0], query_shape[1], *shape[2:])


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(
        query_shape,
        _as_query_heads(query_shape, key_shape),
        _as_query_heads(query_shape, value_shape),
    )


def _cpu_sdpa_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(
        grad_out_shape,
        query_shape,
        _as_query_heads(query_shape, key_shape),
        _as_query_heads(query_shape, value_shape),
    )


# FlopCounterMode has formulas for the CUDA attention kernels but none for the CPU one that
# F.scaled_dot_product_attention dispatches to (torch 2.11-2.13), so attention counted zero
# FLOPs on CPU and every transformer's GFLOP column missed it. The formulas are torch's own.
for _op, _formula in [
    (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, _cpu_sdpa_flop),
    (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, _cpu_sdpa_backward_flop),
]:
    if _op not in flop_registry:
        register_flop_formula(_op)(_formula)


# -- output ------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table (right-aligned numbers), readable in logs and pasteable as is."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i < 3 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])
