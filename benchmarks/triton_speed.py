"""The Triton kernels (issue 5) against cuBLAS on pre-gathered compact operands and against
the dense GEMM, forward and backward, and the end-to-end sparse training step against dense
torch.compile. Needs a CUDA GPU; ``--smoke`` runs the same code at toy sizes (on CPU under
TRITON_INTERPRET=1) to check the plumbing, and its timings mean nothing.

    .venv/bin/python benchmarks/triton_speed.py [--dtype bf16] [--json benchmarks/results/triton_speed.json]
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/triton_speed.py --smoke

Kernel rows: x [M, n] @ W[n, n]^T with M tokens, `density` of W's rows and of its columns
kept (random sorted indices). "cuBLAS" multiplies operands gathered beforehand (the gather
not timed): the bar is triton >= 0.9x of it. "dense" is the full GEMM. Backward = dx and dW;
the Triton dW writes straight into the full-size gradient (its zero fill of the dropped
entries is one memset, timed in its own column). Before timing, the Triton results and
cuBLAS's are checked against a float64 product of the same operands; the error columns give
the largest error as a fraction of the largest entry (Triton must stay under 1e-2 for half
types and TF32, the rounding of a bfloat16 result alone reaching 2^-8, and 1e-5 for IEEE
float32).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import build_mlp, format_table
from torch import Tensor, nn
from torch._library.triton import set_wrap_triton_enabled

import sparsefx
from sparsefx.kernels import interpreting
from sparsefx.kernels import triton_kernels as tk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's examples/

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench(fn: Callable[[], object], device: str) -> float:
    """Median milliseconds of fn: triton's do_bench on a GPU, a plain loop elsewhere."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def max_error(result: Tensor, reference: Tensor) -> float:
    """Largest absolute error as a fraction of the largest reference entry. An elementwise
    relative bound does not fit a low-precision product: an entry that sums thousands of terms
    to near zero keeps the rounding error of its largest partial sums. cuBLAS may also reduce
    split-K partials in bfloat16 (torch's allow_bf16_reduced_precision_reduction default)."""
    return float((result.double() - reference).abs().max() / reference.abs().max())


def kernel_rows(tokens: int, width: int, densities: list[float], dtype, device: str) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(tokens, width, device=device, dtype=dtype)
    weight = torch.randn(width, width, device=device, dtype=dtype) / width**0.5
    grad_y = torch.randn(tokens, width, device=device, dtype=dtype)
    return [row for density in densities for row in _rows_at(density, x, weight, grad_y, device)]


def _rows_at(density: float, x: Tensor, weight: Tensor, grad_y: Tensor, device: str) -> list[dict]:
    """Forward and backward rows at one density (same kept count for rows and columns)."""
    tokens, width = x.shape
    dtype = x.dtype
    kept = max(1, round(density * width))
    out_idx = torch.randperm(width, device=device)[:kept].sort().values
    in_idx = torch.randperm(width, device=device)[:kept].sort().values
    x_c, w_c = x[:, in_idx].contiguous(), weight[out_idx][:, in_idx].contiguous()
    dy_c = grad_y[:, out_idx].contiguous()
    w_grad = torch.zeros_like(weight)

    # launched as the sparsefx::* ops launch them at run time (torch.library.triton_op turns
    # wrap_triton's HOP dispatch off for real tensors): through the HOP, each call rebuilt the
    # pruned autotuner and re-tuned 8 tiles, ~1 s a call on the first H200 run
    def triton_forward() -> Tensor:
        with set_wrap_triton_enabled(False):
            return tk.gather_matmul(x_c, weight, out_idx, in_idx, b_transposed=False)

    def triton_backward() -> tuple[Tensor, None]:
        with set_wrap_triton_enabled(False):
            dx = tk.gather_matmul(dy_c, weight, in_idx, out_idx, b_transposed=True)
            return dx, tk.weight_grad(dy_c, x_c, w_grad, out_idx, in_idx)

    # correctness before timing anything: the Triton results and cuBLAS's, each against a
    # float64 product of the same pre-gathered operands
    x64, w64, dy64 = x_c.double(), w_c.double(), dy_c.double()
    dx, _ = triton_backward()
    checks = {  # pass: (triton, cuBLAS, float64 reference)
        "forward": (triton_forward(), x_c @ w_c.t(), x64 @ w64.t()),
        "dx": (dx, dy_c @ w_c, dy64 @ w64),
        "dW": (w_grad[out_idx][:, in_idx], dy_c.t() @ x_c, dy64.t() @ x64),
    }
    errors = {name: [max_error(r, ref) for r in (t, c)] for name, (t, c, ref) in checks.items()}
    ieee = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    tolerance = 1e-5 if ieee else 1e-2  # TF32 and half types round operands or results
    for name, (triton_error, _) in errors.items():
        if not triton_error <= tolerance:
            raise AssertionError(
                f"Triton {name} at density {density}: max error {triton_error:.2e} of the "
                f"largest entry, over {tolerance:.0e} (cuBLAS: {errors[name][1]:.2e})"
            )

    timings = {
        ("forward", "dense"): lambda: F.linear(x, weight),
        ("forward", "cublas"): lambda: F.linear(x_c, w_c),
        ("forward", "triton"): triton_forward,
        ("backward", "dense"): lambda: (grad_y @ weight, grad_y.t() @ x),
        ("backward", "cublas"): lambda: (dy_c @ w_c, dy_c.t() @ x_c),
        ("backward", "triton"): triton_backward,
        ("backward", "zero fill"): lambda: w_grad.zero_(),
    }
    ms = {key: bench(fn, device) for key, fn in timings.items()}
    rows = []
    for direction in ("forward", "backward"):
        flops = 2 * tokens * kept * kept * (1 if direction == "forward" else 2)
        triton_ms = ms[(direction, "triton")]
        passes = ["forward"] if direction == "forward" else ["dx", "dW"]
        triton_error, cublas_error = (max(errors[p][i] for p in passes) for i in (0, 1))
        rows.append(
            {
                "density": density,
                "kept": kept,
                "pass": direction,
                "dense_ms": ms[(direction, "dense")],
                "cublas_ms": ms[(direction, "cublas")],
                "triton_ms": triton_ms,
                "zero_fill_ms": ms.get((direction, "zero fill")),
                "vs_cublas": ms[(direction, "cublas")] / triton_ms,
                "vs_dense": ms[(direction, "dense")] / triton_ms,
                "tflops": flops / triton_ms / 1e9,
                "triton_error": triton_error,
                "cublas_error": cublas_error,
            }
        )
    return rows


def _hf_resnet(device: str) -> tuple[nn.Module, Tensor, Tensor]:
    from examples.models import hf_resnet_model

    model = hf_resnet_model().to(device)
    x = torch.randn(32, 3, 32, 32, device=device)
    return model, x, torch.randint(0, 10, (32,), device=device)


def _mlp(device: str) -> tuple[nn.Module, Tensor, Tensor]:
    model = build_mlp().to(device)
    return model, torch.randn(256, 512, device=device), torch.randint(0, 10, (256,), device=device)


def _training_step(model: nn.Module, run: nn.Module, x, y, criterion, device: str):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    run.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = run(x, labels=y) if criterion is None else run(x)
        loss = out.loss if criterion is None else criterion(out, y)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def step_rows(models: dict[str, float], device: str, steps: int) -> list[dict]:
    """Dense torch.compile against sparsefx (compiled and eager with the default kernels,
    Triton on CUDA; and compiled with kernels="torch", "-aten") at each model's density;
    median of `steps` timed steps after warm-up, methods interleaved."""
    rows = []
    builders = {"mlp": _mlp, "hf-resnet": _hf_resnet}
    for name, density in models.items():
        methods = {}
        for method in ("dense-compiled", "sparsefx-compiled", "sparsefx-compiled-aten", "sparsefx"):
            torch.manual_seed(0)
            model, x, y = builders[name](device)
            criterion = nn.CrossEntropyLoss() if name == "mlp" else None
            options = {"density": density, "seed": 0}
            if method == "dense-compiled":
                run = torch.compile(model)
            elif method.startswith("sparsefx-compiled"):
                if method.endswith("-aten"):  # the same step without the Triton kernels
                    options["kernels"] = "torch"
                run = torch.compile(model, backend="sparsefx", options=options)
            else:
                kwargs = {} if criterion is not None else {"labels": y}
                config = sparsefx.SparseConfig(**options)
                run = sparsefx.transform(model, (x,), example_kwargs=kwargs, config=config)
            if method.startswith("sparsefx-compiled"):
                run.eval()(x)  # a compiled model has its sparsefx runtime after one call
            if criterion is not None and method != "dense-compiled":
                criterion = sparsefx.wrap_loss(run, criterion)
            methods[method] = _training_step(model, run, x, y, criterion, device)
        times: dict[str, list[float]] = {m: [] for m in methods}
        for step in methods.values():
            for _ in range(3):
                step()  # compile and warm up
        for _ in range(steps):
            for method, step in methods.items():
                start = time.perf_counter()
                step()
                times[method].append(1e3 * (time.perf_counter() - start))
        dense = sorted(times["dense-compiled"])[steps // 2]
        for method, values in times.items():
            median = sorted(values)[steps // 2]
            rows.append(
                {"model": name, "density": density, "method": method, "ms": median,
                 "vs_dense_compiled": dense / median}
            )  # fmt: skip
    return rows


def print_kernel_table(kernels: list[dict]) -> None:
    print(
        format_table(
            ["density", "kept", "pass", "dense ms", "cuBLAS ms", "triton ms", "zero fill ms",
             "vs cuBLAS", "vs dense", "TFLOP/s", "triton err", "cuBLAS err"],
            [
                [f"{r['density']}", str(r["kept"]), r["pass"], f"{r['dense_ms']:.3f}",
                 f"{r['cublas_ms']:.3f}", f"{r['triton_ms']:.3f}",
                 "" if r["zero_fill_ms"] is None else f"{r['zero_fill_ms']:.3f}",
                 f"{r['vs_cublas']:.2f}x", f"{r['vs_dense']:.2f}x", f"{r['tflops']:.1f}",
                 f"{r['triton_error']:.1e}", f"{r['cublas_error']:.1e}"]
                for r in kernels
            ],
        ),
        flush=True,
    )  # fmt: skip


def print_step_table(steps: list[dict]) -> None:
    print(
        format_table(
            ["model", "density", "method", "ms/step", "vs dense compiled"],
            [
                [r["model"], str(r["density"]), r["method"], f"{r['ms']:.2f}",
                 f"{r['vs_dense_compiled']:.2f}x"]
                for r in steps
            ],
        ),
        flush=True,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: plumbing check only")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per method")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not (args.smoke and interpreting()):
        raise SystemExit(
            "benchmarks/triton_speed.py times CUDA kernels and needs a GPU; on a CPU run "
            "`TRITON_INTERPRET=1 .venv/bin/python benchmarks/triton_speed.py --smoke` to check it"
        )
    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name} | torch {torch.__version__} | dtype {args.dtype}", flush=True)
    payload = {"device": name, "torch": torch.__version__, "kernels": [], "steps": []}

    def save() -> None:  # after every table: a run cut short by a time limit keeps its rows
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(payload, indent=2))

    tokens, width = (64, 96) if args.smoke else (8192, 4096)
    payload["kernels"] = kernel_rows(tokens, width, [0.5, 0.25, 0.1], dtype, device)
    print_kernel_table(payload["kernels"])
    save()
    models = {"mlp": 0.1} if args.smoke else {"mlp": 0.1, "hf-resnet": 0.25}
    failed = []
    for model, density in models.items():
        try:  # one model's failure is reported, and the other models still run
            rows = step_rows({model: density}, device, 1 if args.smoke else args.steps)
        except Exception:
            traceback.print_exc()
            failed.append(model)
            continue
        payload["steps"] += rows
        print_step_table(rows)
        save()
    if failed:
        raise SystemExit(f"training steps failed for: {', '.join(failed)} (tracebacks above)")


if __name__ == "__main__":
    main()
