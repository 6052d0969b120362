"""Trace sparsefx's GPU (Triton) training path on a CPU-only machine: a compile/trace check
for GPU regressions, not a numerical one.

Method. A fake Triton driver reporting an NVIDIA sm_90 target (warp size 32) is made the
active driver, so every Triton kernel the run reaches is compiled for real, ttir -> ttgir ->
llir -> ptx -> cubin with the ptxas bundled in the triton wheel, exactly as a launch on an
H100/H200 would compile it (same signature, ==1 / divisible-by-16 specialisation, constexprs,
autotuner configs after `prune_tiles`); only the final module load and the launch are
no-ops. Outputs of the kernels are therefore uninitialised memory (losses are garbage;
nothing here checks numbers). sparsefx's Triton path is then forced on for CPU tensors, and
every model trains a few steps (sampled masks, the structure update, then one eval call)
through

* ``transform``: ``sparsefx.transform(model, ..., SparseConfig(kernels="triton"))``: the
  compact graphs call the triton_ops, whose launchers run ``JITFunction.run`` (the
  autotuner "benchmarks" every pruned config by compiling it), and the runtime runs the
  fused sampler and projection kernels;
* ``compile``: ``torch.compile(model, backend="sparsefx", options={..., "kernels":
  "triton"})``: Dynamo, AOTAutograd and Inductor trace the triton_ops with fake tensors
  (``wrap_triton`` -> ``triton_kernel_wrapper_functional``), Inductor lowers them as
  user-defined Triton kernels and its generated module compiles every config it keeps
  (``CachingAutotuner.precompile``), then launches through the same fake driver.

A (model, mode) passes when it raises nothing, launched at least one of sparsefx's graph
kernels (``_gather_matmul_kernel``, ``_weight_grad_kernel``, ``_block_copy_kernel``), no
compile of a config failed (the autotuners skip a config whose ptxas or resource check
fails: here such a failure is reported) and no kernel asks for more than sm_90's 232448
bytes of shared memory. The compile mode also reports Dynamo's graph count.

What is patched (written against triton 3.9 and torch 2.13; internals, expect breakage on
other versions):

* triton: ``triton.runtime.driver.driver.set_active(FakeCudaDriver())``, a ``DriverBase``
  with ``get_current_target() == GPUTarget("cuda", 90, 32)``, a ``utils`` whose
  ``load_binary`` records the cubin instead of loading it and whose
  ``get_device_properties`` reports sm_90's shared memory, a ``launcher_cls`` that records
  the launch and does nothing, and a benchmarker that calls the kernel once (compiling the
  config) and returns a constant time. ``triton.compile`` / ``triton.compiler.compile`` are
  wrapped to record every compile's outcome (the autotuners swallow ``OutOfResources`` and
  ``PTXASError``).
* sparsefx (the narrowest switches of its Triton path): ``sparsefx.runtime.triton_selected``
  returns True for ``kernels="triton"`` on CPU, and ``triton_ops._triton_runs_on`` is True
  for any CPU fp32/bf16/fp16 tensor, fake tensors included (sparsefx itself sends CPU tensors
  to the Triton kernels only under ``TRITON_INTERPRET=1``, and fake tensors never, so without
  this compile-mode tracing on a CPU traces the reference bodies). ``triton_kernels.
  sample_compact`` and ``project_budget`` run their kernels (compiled, no-op launch) and
  then return the plain-torch result instead of uninitialised memory, since the runtime
  turns the sampler's counts and indices into shapes and index checks.
* Inductor: ``CachingAutotuner._create_compile_meta`` turns the device type "cpu" of a
  user-defined Triton kernel into "cuda" with compute capability 90 (Inductor otherwise
  targets the triton-cpu backend for CPU tensors, which is not installed:
  ``0 compatible backends for target (cpu)``); ``compile_threads = 1`` (the patches live in
  this process) and the FX graph, AOTAutograd and local autotuning caches are off
  (``--inductor-cache`` keeps them), so that every run lowers its graphs again and compiles
  every config Inductor keeps (with the autotuning cache a rerun compiles only the config
  the last run picked).

Limits: nothing executes on a GPU, so no numerical result, no device-side assert, no race,
no launch failure of the driver itself (grid limits, launch bounds), no timing; Inductor
autotunes by timing no-op launches, so its choice of config means nothing. The host code
between launches runs on CPU tensors with garbage values, so a bug that only shows with a
real kernel's values is not caught. The Inductor launcher path taken is the one Inductor
takes for a "cpu" device type (no static CUDA launcher, no CUDA streams), not the CUDA one.
The Triton compiles are cached in ``TRITON_CACHE_DIR`` (default ``~/.triton/cache``): a cold
first run is slow: on a 2-core VM with a cold cache, every model took 26 minutes in the
transform mode and 38 in the compile mode (the two modes run at once as two processes;
GPT-2 and BERT about 5-11 minutes each); with the cache warm the transform mode takes
seconds per model and the compile mode mostly Inductor's own lowering.

Usage: .venv/bin/python benchmarks/fake_gpu_trace.py [--models mlp,gpt2] [--modes transform]
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would replace every kernel
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated

import argparse
import itertools
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
from torch import Tensor, nn
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver as triton_driver

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sparsefx  # noqa: E402
import sparsefx.runtime  # noqa: E402
from examples import models as examples  # noqa: E402
from sparsefx.kernels import interpreting  # noqa: E402

assert not interpreting(), "TRITON_INTERPRET must be unset"
import sparsefx.kernels.triton_kernels as K  # noqa: E402
import sparsefx.kernels.triton_ops as ops  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED = 232448  # sm_90: bytes of shared memory one block may use
GRAPH_KERNELS = {"_gather_matmul_kernel", "_weight_grad_kernel", "_block_copy_kernel"}
MODES = ("transform", "compile")


# ------------------------------------------------------------------ what a run records
@dataclass
class Record:
    launches: Counter = field(default_factory=Counter)
    cubins: dict = field(default_factory=dict)  # (kernel, cubin hash) -> bytes
    compiles: int = 0
    compile_errors: list = field(default_factory=list)
    over_shared: list = field(default_factory=list)
    bad_targets: list = field(default_factory=list)


RECORD = Record()


# ------------------------------------------------------------------ the fake sm_90 driver
class FakeUtils:
    """`driver.active.utils`: loading a module records its cubin and returns dummy handles."""

    def load_binary(self, name, kernel, shared, device):
        if kernel[:4] != b"\x7fELF":
            RECORD.compile_errors.append(f"{name}: binary is not an ELF cubin")
        RECORD.cubins[(name, hash(kernel))] = len(kernel)
        return 1, 1, 0, 0, 1024  # module, function, n_regs, n_spills, max threads per block

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        return {
            "max_shared_mem": MAX_SHARED,
            "max_num_regs": 65536,
            "multiprocessor_count": 132,
            "warpSize": 32,
            "sm_clock_rate": 1980000,
            "mem_clock_rate": 2619000,
            "mem_bus_width": 5120,
        }


class FakeLauncher:
    """`driver.active.launcher_cls`: built once per loaded kernel; launching does nothing."""

    def __init__(self, src, metadata):
        self.name = metadata.name
        if metadata.target != TARGET:
            RECORD.bad_targets.append(f"{self.name}: {metadata.target}")
        if metadata.shared > MAX_SHARED:
            RECORD.over_shared.append(f"{self.name}: {metadata.shared} B shared memory")

    def __call__(self, *args):
        RECORD.launches[self.name] += 1


class FakeCudaDriver(DriverBase):
    def __init__(self):
        self.utils = FakeUtils()
        self.launcher_cls = FakeLauncher

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return TARGET.arch // 10, TARGET.arch % 10

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **kwargs):
            kernel_call()  # compiles the config (the autotuner records what fails)
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(1)

    def clear_cache(self, cache):
        pass


def _recording(compile_fn):
    def compile(src, target=None, options=None, **kwargs):
        RECORD.compiles += 1
        name = getattr(getattr(src, "fn", None), "__name__", "?")
        try:
            return compile_fn(src, target=target, options=options, **kwargs)
        except Exception as e:
            first = f"{type(e).__name__}: {e}".strip().splitlines()
            RECORD.compile_errors.append(f"{name} {options}: {first[0] if first else ''}")
            raise

    return compile


# ------------------------------------------------------------------ sparsefx's Triton path on CPU
def _sample_compact(s, offsets, num_samples, seed, *, exact, eps):
    """The fused sampler's kernel (compiled, launched as a no-op), then its outputs computed
    in plain torch: (seed)-keyed Bernoulli masks with the keep-minimum rule, each group's
    sorted kept indices at its offset, the kept counts, psi of the score form."""
    from sparsefx.policy.estimator import score_function

    ORIGINAL["sample_compact"](s, offsets, num_samples, seed, exact=exact, eps=eps)
    generator = torch.Generator(device=s.device).manual_seed(seed % 2**63)
    probabilities = torch.nan_to_num(s.float(), 0.5).clamp(0, 1)
    u = torch.rand((num_samples, s.shape[0]), generator=generator, device=s.device)
    masks = u < probabilities
    bounds = offsets.tolist()
    indices = torch.zeros((num_samples, s.shape[0]), dtype=torch.int64, device=s.device)
    counts = torch.zeros((num_samples, len(bounds) - 1), dtype=torch.int32, device=s.device)
    for g, (a, b) in enumerate(itertools.pairwise(bounds)):
        need = min(2, b - a)
        top = a + probabilities[a:b].topk(need).indices
        for k in range(num_samples):
            if int(masks[k, a:b].sum()) < need:
                masks[k, top] = True
            kept = masks[k, a:b].nonzero().squeeze(1)
            indices[k, a : a + len(kept)] = kept
            counts[k, g] = len(kept)
    psi = score_function(masks, probabilities, "exact" if exact else "paper", eps).float()
    return masks, indices, counts, psi


def _project_budget(z, costs, budget, *, iterations=64):
    """The projection kernel (compiled, no-op launch), then the CPU projection's result."""
    from sparsefx.policy.projection import project_to_budget

    ORIGINAL["project_budget"](z, costs, budget, iterations=iterations)
    return project_to_budget(torch.nan_to_num(z, 0.5), costs, budget)


def _triton_selected(choice, device):
    return choice == "triton" or ORIGINAL["triton_selected"](choice, device)


def _triton_runs_on(x: Tensor) -> bool:
    return x.dtype in ops._KERNEL_DTYPES and x.device.type in ("cpu", "cuda")


ORIGINAL: dict[str, Any] = {}


def install(inductor_cache: bool = False) -> None:
    """Every patch the module docstring lists."""
    import torch._functorch.config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime import triton_heuristics

    triton_driver.set_active(FakeCudaDriver())
    triton.compile = _recording(triton.compile)
    triton.compiler.compile = triton.compile

    ORIGINAL["triton_selected"] = sparsefx.runtime.triton_selected
    sparsefx.runtime.triton_selected = _triton_selected
    ops._triton_runs_on = _triton_runs_on
    ORIGINAL["sample_compact"], K.sample_compact = K.sample_compact, _sample_compact
    ORIGINAL["project_budget"], K.project_budget = K.project_budget, _project_budget

    create_compile_meta = triton_heuristics.CachingAutotuner._create_compile_meta

    def _create_compile_meta(self, cfg):
        meta = create_compile_meta(self, cfg)
        if meta.get("device_type") == "cpu":
            meta["device_type"], meta["cc"] = TARGET.backend, TARGET.arch
        return meta

    triton_heuristics.CachingAutotuner._create_compile_meta = _create_compile_meta
    inductor_config.compile_threads = 1
    if not inductor_cache:
        inductor_config.fx_graph_cache = False
        inductor_config.autotune_local_cache = False  # else a rerun compiles only the best config
        torch._functorch.config.enable_autograd_cache = False
    # "Could not find an active CPU backend" (Inductor's triton-cpu check), once per kernel
    warnings.filterwarnings("ignore", message="Could not find an active CPU backend")


# ------------------------------------------------------------------ models
@dataclass
class Case:
    model: nn.Module
    args: tuple
    kwargs: dict
    target: Tensor | None  # labels of a logits model (trained through wrap_loss)
    options: dict


def _mlp() -> Case:
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)
    )
    return Case(model, (torch.randn(32, 64),), {}, torch.randint(0, 10, (32,)), {})


def _cnn() -> Case:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 4),
    )  # fmt: skip
    return Case(model, (torch.randn(4, 3, 8, 8),), {}, torch.randint(0, 4, (4,)), {})


def _gpt2() -> Case:
    model, kwargs = examples.gpt2()  # vocab 512, 4 layers, n_embd 256; 2 x 64 tokens
    return Case(model, (), kwargs, None, {})


def _bert() -> Case:
    from tests.test_hf_models import _bert  # the HF tests' small config (hidden 16, 2 layers)

    ids = torch.randint(0, 64, (2, 8))
    return Case(_bert(), (), {"input_ids": ids, "labels": torch.tensor([0, 2])}, None, {})


def _vit() -> Case:
    from tests.test_hf_models import _vit  # 8 x 8 images, 4 x 4 patches, hidden 16

    x = torch.randn(2, 3, 8, 8)
    return Case(_vit(), (x,), {"labels": torch.tensor([0, 2])}, None, {})


def _hf_resnet() -> Case:
    model, x = examples.hf_resnet()  # ResNet-18 layout, 10 labels; 2 x 3 x 32 x 32
    labels = torch.randint(0, 10, (x.shape[0],))
    return Case(model, (x,), {"labels": labels}, None, {"prune_streams": True})


def _mobilenet_v2() -> Case:
    model, x = examples.mobilenet_v2()
    return Case(model, (x,), {}, torch.randint(0, 10, (x.shape[0],)), {})


def _densenet() -> Case:
    from tests.test_coupling import DenseNetStyle  # the coupling tests' concat model

    return Case(DenseNetStyle(), (torch.randn(4, 3, 4, 4),), {}, torch.randint(0, 3, (4,)), {})


MODELS = {
    "mlp": _mlp,
    "cnn": _cnn,
    "gpt2": _gpt2,
    "bert": _bert,
    "vit": _vit,
    "hf_resnet": _hf_resnet,
    "mobilenet_v2": _mobilenet_v2,
    "densenet": _densenet,
}


# ------------------------------------------------------------------ one (model, mode)
@dataclass
class Result:
    model: str
    mode: str
    ok: bool = False
    seconds: float = 0.0
    detail: str = ""
    kernels: str = ""
    cubins: int = 0
    compiles: int = 0
    graphs: str = "-"
    error: str = ""


def train(name: str, mode: str, steps: int) -> Result:
    global RECORD
    from torch._dynamo.utils import counters

    result = Result(name, mode)
    torch._dynamo.reset()
    counters.clear()
    RECORD = Record()
    start = time.time()
    try:
        torch.manual_seed(0)
        case = MODELS[name]()
        model = case.model
        options = {"density": 0.5, "seed": 0, "kernels": "triton", **case.options}
        if mode == "transform":
            config = sparsefx.SparseConfig(**options)
            sparse = sparsefx.transform(
                model, case.args, example_kwargs=case.kwargs or None, config=config
            )
        else:
            sparse = torch.compile(model, backend="sparsefx", options=options)
        criterion = None
        if case.target is not None:
            criterion = sparsefx.wrap_loss(sparse, F.cross_entropy)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        for _ in range(steps):
            out = sparse(*case.args, **case.kwargs)
            loss = criterion(out, case.target) if criterion else out.loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        sparse.eval()
        with torch.no_grad():
            sparse(*case.args, **case.kwargs)
        sparse.train()
        launched = set(RECORD.launches)
        problems = []
        if not launched & GRAPH_KERNELS:
            problems.append("no graph kernel launched (the Triton ops were not used)")
        problems += [f"config failed to compile: {e}" for e in RECORD.compile_errors]
        problems += [f"over sm_90 shared memory: {e}" for e in RECORD.over_shared]
        problems += [f"wrong target: {e}" for e in RECORD.bad_targets]
        result.ok = not problems
        result.detail = "; ".join(problems)
    except Exception as e:
        lines = traceback.format_exception_only(type(e), e)
        text = "".join(lines).strip().splitlines()
        result.detail = " | ".join(line.strip() for line in text[:3] if line.strip())
        result.error = traceback.format_exc()
    result.seconds = time.time() - start
    # names only: Inductor's autotuner times the no-op launches, so counts mean little
    result.kernels = ", ".join(
        k.strip("_").removesuffix("_kernel") for k in sorted(RECORD.launches)
    )
    result.cubins = len(RECORD.cubins)
    result.compiles = RECORD.compiles
    if mode == "compile":
        result.graphs = str(counters["stats"]["unique_graphs"])
    return result


def print_table(results: list[Result]) -> None:
    header = ("model", "mode", "result", "time", "graphs", "cubins", "kernels launched", "detail")
    rows = [
        (r.model, r.mode, "passed" if r.ok else "FAILED", f"{r.seconds:.0f}s", r.graphs,
         str(r.cubins), r.kernels or "-", r.detail or "")
        for r in results
    ]  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header[:-1])]
    for row in (header, (*("-" * w for w in widths), "------"), *rows):
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}"
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, of " + ", ".join(MODES)
    )
    parser.add_argument("--steps", type=int, default=2, help="training steps per model and mode")
    parser.add_argument(
        "--inductor-cache",
        action="store_true",
        help="keep Inductor's FX graph and AOTAutograd caches (faster reruns; a cache hit "
        "skips the lowering this checks)",
    )
    parser.add_argument("--quiet", action="store_true", help="no tracebacks after the table")
    ns = parser.parse_args()
    models = [m for m in ns.models.split(",") if m]
    modes = [m for m in ns.modes.split(",") if m]
    for unknown in set(models) - set(MODELS):
        parser.error(f"unknown model {unknown!r}: choose from {', '.join(MODELS)}")
    for unknown in set(modes) - set(MODES):
        parser.error(f"unknown mode {unknown!r}: choose from {', '.join(MODES)}")
    install(ns.inductor_cache)
    print(
        f"torch {torch.__version__}, triton {triton.__version__}, fake target {TARGET}, "
        f"{len(models)} models x {len(modes)} modes, {ns.steps} training steps + 1 eval call",
        flush=True,
    )
    start = time.time()
    results = []
    for name in models:
        for mode in modes:
            result = train(name, mode, ns.steps)
            results.append(result)
            status = "passed" if result.ok else "FAILED"
            print(
                f"  {name} / {mode}: {status} in {result.seconds:.0f}s ({result.compiles} "
                f"compiles, {result.cubins} cubins loaded)",
                flush=True,
            )
    print()
    print_table(results)
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)}/{len(results)} passed, {time.time() - start:.0f}s")
    if not ns.quiet:
        for r in failed:
            if r.error:
                print(f"\n=== {r.model} / {r.mode} ===\n{r.error}", end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
