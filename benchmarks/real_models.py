"""Training-step time of real third-party models (Hugging Face `transformers`, random
weights, configs of the coupling issue): dense eager against sparsefx, side by side.

    python benchmarks/real_models.py [--models resnet,gpt2] [--density 0.25] [--quick]
        [--methods sparsefx-streams-sg,...] [--profile N]

HF ResNet (basic blocks, 64/128/256/512, depths 2/2/2/2, 10 labels) on 32×32 images, batch
32; GPT-2 (vocab 512, n_embd 256, 4 layers, 8 heads) on 128 tokens, batch 8, with `labels=`;
Llama (the same sizes, 8 query heads on 4 key/value heads, `--models llama`), Gemma 2
(post-norms, eager attention) and Falcon (fused qkv, `x @ W.T` layers, MLP 1024) likewise, and
`torch-encoder`: the same sizes in PyTorch's own `nn.TransformerEncoder` (causal mask, MLP
1024; `examples/models.py:TorchEncoderLM`); `gpt-bigcode`: GPTBigCode (StarCoder's multi-query
attention: 8 query heads, one key/value head) of GPT-2's sizes; `falcon-mq`: Falcon with
Falcon-7B's multi-query layout (one key/value head, rotary q); `olmo2`: OLMo 2 of Llama's
sizes (q and k normalised across heads). `t5` and `t5-eager`: T5 of that width, 4 + 4
layers, its relative-position bias passed to SDPA or added to explicit scores (the labels
are the decoder's 128 tokens); `swinv2`: Swinv2 (`examples/models.py:swinv2_model`) on a
batch of 32 images.
Every method runs the model's own loss (``model(x, labels=y).loss``) and an SGD step on all
parameters. sparsefx methods: `sparsefx` (defaults: residual streams dense),
`sparsefx-streams` (prune_streams=True), `-sg` (sparse_gradients=True), `sparsefx-flops`
(budget="flops": channels weighted by their FLOPs in the budget), `-compiled`
(torch.compile). A `-same-masks` suffix is a diagnostic, not a training configuration: the
step samples its masks once and reuses them (K forwards as usual), which shows what new
kept-channel counts cost at every step (oneDNN creates a primitive per new conv shape).
A `-via-ops` suffix, another diagnostic, runs the eager programs through sparsefx's custom
ops as the graph records show them, where sparsefx runs their bodies directly: what the
dispatcher and torch.library's autograd wrapper cost per step. A `-never-exact` suffix, a
third, never runs a sampled mask's exact-count graph (recurring counts keep the rounded
shapes): what `sparsefx.runtime.RecurringCounts` saves, with `--trajectory`. A `-frozen`
suffix freezes the top-budget masks at transform (s is still the density everywhere): the
fine-tune phase's step, one forward with fixed kept counts, where a searching step runs a
second forward whenever its K masks differ (`sparsefx.runtime.samples_agree`).

Every method first runs `--warmup` untimed steps (200): a searching step gets faster over
its first few hundred (oneDNN's primitive cache fills, s polarises and kept counts recur, which
then run exact shapes); `--trajectory K` prints the warm-up's median every K steps.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch
from common import count_flops, environment, format_table, summarize, time_interleaved
from torch import Tensor, nn
from torch._dynamo.utils import counters

import sparsefx
import sparsefx.compiled
import sparsefx.runtime
from sparsefx.runtime import StructureState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's examples/
from examples.models import (
    falcon_model,
    gemma2_model,
    gpt2_model,
    gpt_bigcode_model,
    hf_resnet_model,
    llama_model,
    olmo2_model,
    swinv2_model,
    t5_model,
    torch_encoder_model,
)

LR = 0.01
FLOP_STEPS = 20


def resnet() -> tuple[nn.Module, Tensor, Tensor]:
    model = hf_resnet_model()
    return model, torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))


def swinv2() -> tuple[nn.Module, Tensor, Tensor]:
    model = swinv2_model()
    return model, torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))


def _decoder(build: Callable[[], nn.Module]) -> Callable[[], tuple[nn.Module, Tensor, Tensor]]:
    """A causal LM and 8 sequences of 128 tokens (labels = inputs), drawn after its init."""

    def batch() -> tuple[nn.Module, Tensor, Tensor]:
        model = build()
        ids = torch.randint(0, 512, (8, 128))
        return model, ids, ids

    return batch


MODELS: dict[str, Callable[[], tuple[nn.Module, Tensor, Tensor]]] = {
    "resnet": resnet,
    "gpt2": _decoder(gpt2_model),
    "gpt-bigcode": _decoder(gpt_bigcode_model),
    "llama": _decoder(llama_model),
    "gemma2": _decoder(gemma2_model),
    "falcon": _decoder(falcon_model),
    "falcon-mq": _decoder(lambda: falcon_model(multi_query=True)),
    "olmo2": _decoder(olmo2_model),
    "torch-encoder": _decoder(torch_encoder_model),
    "t5": _decoder(t5_model),
    "t5-eager": _decoder(lambda: t5_model("eager")),
    "swinv2": swinv2,
}
DIAGNOSTICS = ("-same-masks", "-via-ops", "-never-exact", "-frozen")
METHODS = {
    "sparsefx": {},
    "sparsefx-sg": {"sparse_gradients": True},
    "sparsefx-streams": {"prune_streams": True},
    "sparsefx-streams-sg": {"prune_streams": True, "sparse_gradients": True},
    "sparsefx-flops": {"budget": "flops"},
}


def _reusing_masks(step: Callable[[], Tensor], structure: StructureState) -> Callable[[], Tensor]:
    """`step` with the masks of its first call at every call (the `-same-masks` diagnostic)."""
    masks = structure.sample(structure.config.samples)

    def same_masks(num_samples: int) -> Tensor:
        return masks[:num_samples]

    def reusing() -> Tensor:
        structure.sample = same_masks  # instance attribute: only this model's structure
        try:
            return step()
        finally:
            del structure.sample

    return reusing


def _never_exact(step: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """`step` with no sampled kept counts ever counted as recurring (the `-never-exact`
    diagnostic): `RecurringCounts.recur` reads `RECURRING` at every call."""

    def rounded() -> Tensor:
        recurring, sparsefx.runtime.RECURRING = sparsefx.runtime.RECURRING, sys.maxsize
        try:
            return step()
        finally:
            sparsefx.runtime.RECURRING = recurring

    return rounded


@contextlib.contextmanager
def _through_ops() -> Iterator[None]:
    """Programs compiled inside keep calling the custom ops (the `-via-ops` diagnostic)."""
    direct = sparsefx.runtime._direct_calls
    sparsefx.runtime._direct_calls = lambda gm, record_gradients=True: gm
    try:
        yield
    finally:
        sparsefx.runtime._direct_calls = direct


def _step(model: nn.Module, run: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    run.train()

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = run(x, labels=y).loss
        loss.backward()
        opt.step()
        return loss

    return step


def steps_for(
    name: str, density: float, methods: list[str]
) -> tuple[dict[str, Callable[[], Tensor]], dict]:
    model, x, y = MODELS[name]()
    steps = {"dense": _step(model, model, x, y)}
    groups = {}
    for method in methods:
        diagnostic = next((d for d in DIAGNOSTICS if method.endswith(d)), None)
        if diagnostic and "-compiled" in method:
            raise SystemExit(f"{method}: {diagnostic} is a diagnostic of eager methods only")
        twin = copy.deepcopy(model)
        base = method.removesuffix(diagnostic or "").removesuffix("-compiled")
        options = {"density": density, "seed": 0, **METHODS[base]}
        if method.endswith("-compiled"):
            steps[method] = _step(
                twin, torch.compile(twin, backend="sparsefx", options=options), x, y
            )
            graphs = counters["stats"]["unique_graphs"]
            steps[method]()  # compiles, so that the runtime (and its groups) exists
            if counters["stats"]["unique_graphs"] == graphs:
                raise RuntimeError(f"Dynamo compiled nothing for {name}/{method}: it runs eagerly")
            groups[method] = len(sparsefx.groups(twin))
        else:
            config = sparsefx.SparseConfig(**options)
            with _through_ops() if diagnostic == "-via-ops" else contextlib.nullcontext():
                sparse = sparsefx.transform(twin, (x,), example_kwargs={"labels": y}, config=config)
            groups[method] = len(sparsefx.groups(sparse))
            steps[method] = _step(twin, sparse, x, y)
            if method.endswith("-same-masks"):
                steps[method] = _reusing_masks(steps[method], sparse.structure)
            if method.endswith("-never-exact"):
                steps[method] = _never_exact(steps[method])
            if method.endswith("-frozen"):
                sparsefx.freeze(sparse)
    return steps, groups


def _profile(step: Callable[[], Tensor], steps: int, rows: int) -> str:
    """torch.profiler's table of the ops of `steps` calls of `step`, by self CPU time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _minor_faults(step: Callable[[], Tensor], steps: int) -> float:
    """Minor page faults a step: the allocator mapping fresh memory. glibc maps large buffers
    afresh and returns them on free in some processes and not in others (its mmap threshold
    adapts), which moves a dense step's time by up to ~20% between processes."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps


@contextlib.contextmanager
def _agreements() -> Iterator[list[bool]]:
    """Records, per sampled step, whether its K masks agreed (`sparsefx.runtime.samples_agree`:
    the step then runs one forward instead of K), eager and compiled alike."""
    agreed: list[bool] = []
    samples_agree = sparsefx.runtime.samples_agree

    def recorded(masks: Tensor) -> bool:
        agreed.append(samples_agree(masks))
        return agreed[-1]

    with (
        mock.patch.object(sparsefx.compiled, "samples_agree", recorded),
        mock.patch.object(sparsefx.runtime, "samples_agree", recorded),
    ):
        yield agreed


def _time_steps(step: Callable[[], Tensor], steps: int) -> list[float]:
    """Seconds of each of `steps` calls of `step`."""
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return seconds


def _trajectory(seconds: list[float], agreed: list[bool], chunk: int) -> str:
    """'steps a-b: median ms' for each `chunk` consecutive steps, and in how many of them a
    sampled step's K masks agreed (where the method samples)."""
    lines = []
    for i in range(0, len(seconds), chunk):
        part = seconds[i : i + chunk]
        line = f"  steps {i:4d}-{i + len(part) - 1:4d}: {1e3 * statistics.median(part):7.1f}"
        if agreed:
            line += f"   masks agreed in {sum(agreed[i : i + chunk])}/{len(part)}"
        lines.append(line)
    return "\n".join(lines)


def _gflop(flops: float | None) -> str:
    return "n/a" if flops is None else f"{flops / 1e9:.2f}"


def _ratio(dense: float, flops: float | None) -> str:
    return "n/a" if flops is None else f"{dense / flops:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet,gpt2")
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument(
        "--methods",
        default=",".join([*METHODS, *(f"{m}-compiled" for m in METHODS)]),
        help="sparsefx methods; a -compiled suffix runs torch.compile(backend='sparsefx')",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--warmup",
        type=int,
        default=200,
        help="untimed steps per method first: a training run's steady state. A searching "
        "step's time falls over its first few hundred steps (ResNet), as oneDNN builds a "
        "primitive for each rounded conv shape and kept counts start to recur and run exact "
        "shapes (sparsefx.runtime.RecurringCounts); --trajectory shows it",
    )
    parser.add_argument(
        "--trajectory",
        type=int,
        default=0,
        metavar="K",
        help="print each method's median step time over every K warm-up steps, and in how "
        "many of them its K masks agreed (one forward instead of K)",
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds × 2 steps")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, print torch.profiler's top N ops by self CPU time (per step) "
        "of each method's steps",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    print("sparsefx on real models: one training step (model loss + SGD), side by side")
    print(
        f"torch {env['torch']} | {env['threads']} threads | CPU: {env['cpu']} "
        f"({env['cores']} logical cores) | load at start: {env['load_avg']}"
    )
    print(f"density {args.density}; {args.rounds} rounds × {args.steps} steps, medians")
    start, rows, results = time.perf_counter(), [], {}
    for name in args.models.split(","):
        steps, groups = steps_for(name, args.density, args.methods.split(","))
        for method, step in steps.items():  # steady state: cached conv shapes, recurring counts
            with _agreements() as agreed:
                warmup = _time_steps(step, args.warmup)
            if args.trajectory:
                print(f"{name}/{method} warm-up, median ms per {args.trajectory} steps:")
                print(_trajectory(warmup, agreed, args.trajectory), flush=True)
        # Dynamo skips a frame called under a TorchDispatchMode such as FlopCounterMode, and
        # then runs that code eagerly for good: compiled steps report their eager twin's FLOPs.
        # A sparse step runs one forward where its K masks agree and K where they do not
        # (`sparsefx.runtime.samples_agree`): its FLOPs are a mean over FLOP_STEPS steps.
        flops = {
            m: count_flops(s, min_steps=2 if m == "dense" else FLOP_STEPS, min_seconds=0.0)
            for m, s in steps.items()
            if not m.endswith("-compiled")
        }
        times = time_interleaved(steps, args.rounds, args.steps)
        faults = {m: _minor_faults(s, args.steps) for m, s in steps.items()}
        if args.profile:
            for method, step in steps.items():
                print(
                    f"{name}/{method}: ops by self CPU time over 5 steps (profiler overhead included)"
                )
                print(_profile(step, 5, args.profile))
        dense = summarize(times["dense"])
        for method, seconds in times.items():
            summary = summarize(seconds)
            speedup = dense.median_ms / summary.median_ms
            rows.append(
                [
                    name,
                    method,
                    str(groups.get(method, "")),
                    f"{summary.median_ms:.1f}",
                    f"{100 * summary.spread:.0f}",
                    f"{speedup:.2f}x",
                    _gflop(flops.get(method.removesuffix("-compiled"))),
                    _ratio(flops["dense"], flops.get(method.removesuffix("-compiled"))),
                    f"{faults[method]:.0f}",
                ]
            )
            results[f"{name}/{method}"] = {
                "ms": summary.median_ms,
                "speedup": speedup,
                "gflop": flops.get(method.removesuffix("-compiled"), float("nan")) / 1e9,
                "minor_faults": faults[method],
            }
        print(f"[{time.perf_counter() - start:6.0f}s] {name} done", flush=True)
    headers = [
        "model", "method", "groups", "ms/step", "IQR%", "speedup", "GFLOP/step", "FLOP×",
        "faults/step",
    ]  # fmt: skip
    print(format_table(headers, rows))
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "results": results}, indent=2))


if __name__ == "__main__":
    main()
