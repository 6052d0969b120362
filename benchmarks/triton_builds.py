"""Ahead-of-time builds of sparsefx's Triton kernels for NVIDIA Hopper (cuda sm_90, warp 32),
without a GPU: compile evidence, not a timing (issue 5; the interpreter that runs the tests
does not reject what the real compiler rejects).

Pipeline: triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)) runs
ttir -> ttgir -> llir -> ptx -> cubin (ptxas bundled in the triton wheel).

Signatures/constexprs/attrs are derived exactly as a real launch derives them: the kernel's
own JIT binder (create_function_from_signature + JITFunction._pack_args) is run on CPU
tensors with the launchers' argument layout, so i32/i64 choice, ==1 specialisation of ints
(becomes constexpr) and 16-divisibility attributes match what the GPU launch would see.

Usage: .venv/bin/python benchmarks/triton_builds.py [--jobs N] [--quick] [--only SUBSTRING]
(about 13 minutes for all cases on 2 cores; --quick keeps the all-off/all-on flag sets).
It uses triton internals (the launch binder), written against triton 3.9.
"""

from __future__ import annotations

import os
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "sparsefx-sm90"))
os.environ.setdefault("TRITON_ALWAYS_COMPILE", "1")

import argparse
import itertools
import re
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import create_function_from_signature

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparsefx.kernels import interpreting

assert not interpreting(), "TRITON_INTERPRET must be unset"
import sparsefx.kernels.triton_kernels as K  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
MAX_DYN_SMEM = 232448  # sm_90 max dynamic shared memory per block
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

KERNELS = {
    "gather_matmul": K._gather_matmul_kernel.fn,
    "weight_grad": K._weight_grad_kernel.fn,
    "block_copy": K._block_copy_kernel,
    "sample": K._sample_kernel,
    "project": K._project_kernel,
}
assert isinstance(K._gather_matmul_kernel.fn, triton.runtime.jit.JITFunction)


def t(shape, dtype):
    return torch.empty(shape, dtype=dtype)


def dot_opts(dtype, highest):
    """K._dot_options without depending on the global matmul precision."""
    if dtype == torch.float32:
        return {"PRECISION": "ieee" if highest else "tf32", "UPCAST": False}
    return {"PRECISION": None, "UPCAST": False}


DTYPES = [  # (label, dtype, highest-precision?)
    ("fp32/tf32", torch.float32, False),
    ("fp32/ieee", torch.float32, True),
    ("bf16", torch.bfloat16, False),
    ("fp16", torch.float16, False),
]


def cfg_dict(c):
    return dict(c.kwargs), {"num_warps": c.num_warps, "num_stages": c.num_stages}


# ------------------------------------------------------------------ case builders
def gm_case(
    dtype, highest, flags, cfg, sizes=(4096, 768, 1024), b_transposed=False, big=False, wdtype=None
):
    """Mirror of K.gather_matmul's launch (`wdtype`: the weight's and bias's dtype, float32
    under autocast while A is a half type)."""
    has_j, has_r, gate, bias, relu = flags
    m, j, r = sizes
    a = t((m, r), dtype)
    full_out, full_in = j + 64, r + 64  # weight [out, in]
    b = t((full_in, full_out) if b_transposed else (full_out, full_in), wdtype or dtype)
    j_idx = t((j,), torch.int64) if has_j else None
    r_idx = t((r,), torch.int64) if has_r else None
    out = t((m, j), dtype)
    stride_j, stride_r = b.stride() if not b_transposed else b.stride()[::-1]
    M = m if not big else 2**31 + 16  # forces i64 scalar
    args = (
        a, t((m, r), dtype) if gate else None, b, t((full_out,), wdtype or dtype) if bias else None,
        out, j_idx, r_idx,
        M, j, r, K._bucket(m), K._bucket(j), K._bucket(r),
        a.stride(0), a.stride(1), stride_j, stride_r, out.stride(0), out.stride(1),
    )  # fmt: skip
    consts, opts = cfg_dict(cfg)
    kw = dict(
        HAS_J_IDX=has_j,
        HAS_R_IDX=has_r,
        GATE=gate,
        HAS_BIAS=bias,
        RELU=relu,
        **dot_opts(dtype, highest),
        **consts,
    )
    return args, kw, opts


def wg_case(dtype, highest, flags, cfg, sizes=(4096, 768, 1024), wdtype=None, big=False):
    """Mirror of K.weight_grad's launch."""
    has_row, has_col, gate, bias = flags
    m, n, k = sizes
    g = t((m, n), dtype)
    x = t((m, k), dtype)
    w_grad = t((n + 64, k + 64), wdtype or dtype)
    b_grad = t((n + 64,), wdtype or dtype)
    M = m if not big else 2**31 + 16
    args = (
        g, t((m, n), dtype) if gate else None, x, w_grad, b_grad if bias else None,
        t((n,), torch.int64) if has_row else None, t((k,), torch.int64) if has_col else None,
        M, n, k, K._bucket(m), K._bucket(n), K._bucket(k),
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), w_grad.stride(0), w_grad.stride(1),
    )  # fmt: skip
    consts, opts = cfg_dict(cfg)
    kw = dict(
        HAS_ROW_IDX=has_row,
        HAS_COL_IDX=has_col,
        GATE=gate,
        HAS_BIAS=bias,
        **dot_opts(dtype, highest),
        **consts,
    )
    return args, kw, opts


def bc_case(dtype, has_row, has_col, gather, spatial=9, big=False):
    rows, cols = 64, 48
    compact = t((rows, cols, spatial), dtype)
    full = t((rows + 8, cols + 8, spatial), dtype)
    numel = compact.numel() if not big else 2**31 + 16
    args = (
        full, compact, t((rows,), torch.int64) if has_row else None,
        t((cols,), torch.int64) if has_col else None,
        numel, cols, spatial, full.stride(0), full.stride(1),
    )  # fmt: skip
    kw = dict(HAS_ROW_IDX=has_row, HAS_COL_IDX=has_col, GATHER=gather, BLOCK=K._COPY_BLOCK)
    return args, kw, {}


def sample_case(exact, seed, sdtype=torch.float32, block=256):
    n, groups, k = 1000, 7, 4
    s = t((n,), sdtype)
    offsets = t((groups + 1,), torch.int64)
    args = (
        s, offsets, t((k, n), torch.int8), t((k, n), torch.int64), t((k, groups), torch.int32),
        t((k, n), torch.float32), seed, n, groups, 1e-6,
    )  # fmt: skip
    return args, dict(EXACT=exact, BLOCK=block), {}


def project_case(dtype=torch.float32, cdtype=torch.float32, n=1000):
    z = t((n,), dtype)
    args = (z, t((n,), cdtype), torch.empty_like(z), n, t((1,), torch.float64))
    return args, dict(ITERS=64, BLOCK=1024), {}


def build_cases(quick=False):
    cases = []
    gm_cfgs = K._gather_matmul_kernel.configs
    wg_cfgs = K._weight_grad_kernel.configs

    def ext(configs):  # largest and smallest tile
        return [configs[0], configs[-1]]

    def cfgname(c):
        return "x".join(str(v) for v in c.kwargs.values()) + f"/w{c.num_warps}s{c.num_stages}"

    def every_flag_set(kernel, kind, configs, flag_names):
        """Every on/off combination of the kernel's flags at its largest and smallest tile
        (`quick`: all off and all on)."""
        for (dl, dt, hi), cfg, flags in itertools.product(
            DTYPES, ext(configs), itertools.product([0, 1], repeat=len(flag_names))
        ):
            if quick and len(set(flags)) > 1:
                continue
            named = " ".join(f"{n}={f:d}" for n, f in zip(flag_names, flags, strict=True))
            name = f"{kernel} {dl} {cfgname(cfg)} {named}"
            cases.append((kernel, name, (kind, dt, hi, tuple(map(bool, flags)), cfg, {})))

    every_flag_set("gather_matmul", "gm", gm_cfgs, ["J_IDX", "R_IDX", "GATE", "BIAS", "RELU"])
    # every tile config, realistic flag sets (forward: idx+bias+relu; backward dx: transposed+gate)
    for (dl, dt, hi), cfg in itertools.product(DTYPES, gm_cfgs[1:-1]):
        cases.append(
            (
                "gather_matmul",
                f"gather_matmul {dl} {cfgname(cfg)} fwd J/R_IDX BIAS RELU",
                ("gm", dt, hi, (True, True, False, True, True), cfg, {}),
            )
        )
        cases.append(
            (
                "gather_matmul",
                f"gather_matmul {dl} {cfgname(cfg)} bwd-dx transposed J/R_IDX GATE",
                ("gm", dt, hi, (True, True, True, False, False), cfg, {"b_transposed": True}),
            )
        )
    for (dl, dt, hi), cfg in itertools.product(DTYPES, ext(gm_cfgs)):
        cases.append(
            (
                "gather_matmul",
                f"gather_matmul {dl} {cfgname(cfg)} odd sizes 100x77x333, transposed",
                (
                    "gm",
                    dt,
                    hi,
                    (True, True, True, True, True),
                    cfg,
                    {"sizes": (100, 77, 333), "b_transposed": True},
                ),
            )
        )
        cases.append(
            (
                "gather_matmul",
                f"gather_matmul {dl} {cfgname(cfg)} i64 M",
                ("gm", dt, hi, (True, True, True, True, True), cfg, {"big": True}),
            )
        )
    # autocast: a half-type A with the float32 weight (and bias), at every tile
    for (dl, dt, hi), cfg in itertools.product(DTYPES[2:], gm_cfgs):
        for kind, flags, extra in (
            ("fwd J/R_IDX BIAS RELU", (True, True, False, True, True), {}),
            ("bwd-dx transposed J/R_IDX GATE", (True, True, True, False, False), {"b_transposed": True}),
        ):  # fmt: skip
            cases.append(
                (
                    "gather_matmul",
                    f"gather_matmul autocast {dl} x fp32 weight {cfgname(cfg)} {kind}",
                    ("gm", dt, hi, flags, cfg, {"wdtype": torch.float32, **extra}),
                )
            )
    every_flag_set("weight_grad", "wg", wg_cfgs, ["ROW_IDX", "COL_IDX", "GATE", "BIAS"])
    for (dl, dt, hi), cfg in itertools.product(DTYPES, wg_cfgs[1:-1]):
        cases.append(
            (
                "weight_grad",
                f"weight_grad {dl} {cfgname(cfg)} all flags",
                ("wg", dt, hi, (True, True, True, True), cfg, {}),
            )
        )
    for (dl, dt, hi), cfg in itertools.product(DTYPES, ext(wg_cfgs)):
        cases.append(
            (
                "weight_grad",
                f"weight_grad {dl} {cfgname(cfg)} odd sizes 100x77x333",
                ("wg", dt, hi, (True, True, True, True), cfg, {"sizes": (100, 77, 333)}),
            )
        )
        cases.append(
            (
                "weight_grad",
                f"weight_grad {dl} {cfgname(cfg)} i64 M",
                ("wg", dt, hi, (True, True, True, True), cfg, {"big": True}),
            )
        )
    for dt, hr, hc, g in itertools.product(
        [torch.float32, torch.bfloat16, torch.float16], [0, 1], [0, 1], [0, 1]
    ):
        cases.append(
            (
                "block_copy",
                f"block_copy {str(dt)[6:]} ROW_IDX={hr} COL_IDX={hc} GATHER={g}",
                ("bc", dt, bool(hr), bool(hc), bool(g), {}),
            )
        )
    for g in (True, False):
        cases.append(
            (
                "block_copy",
                f"block_copy fp32 spatial=1 GATHER={g:d}",
                ("bc", torch.float32, True, True, g, {"spatial": 1}),
            )
        )
        cases.append(
            (
                "block_copy",
                f"block_copy fp32 i64 numel GATHER={g:d}",
                ("bc", torch.float32, True, True, g, {"big": True}),
            )
        )
    for exact, seed in itertools.product([True, False], [12345, 2**40 + 7, 2**63 + 5]):
        cases.append(
            (
                "sample",
                f"sample EXACT={exact:d} seed={seed} ({'i32' if seed < 2**31 else 'i64' if seed < 2**63 else 'u64'})",
                ("sa", exact, seed, {}),
            )
        )
    cases.append(
        (
            "sample",
            "sample EXACT=1 seed=16 (int div16) BLOCK=1024",
            ("sa", True, 16, {"block": 1024}),
        )
    )
    cases.append(("project", "project fp32 ITERS=64 BLOCK=1024", ("pr", {})))
    cases.append(("project", "project fp32 N=1 (N specialised to constexpr 1)", ("pr", {"n": 1})))
    cases.append(("project", "project fp64 z / fp32 c", ("pr", {"dtype": torch.float64})))
    return cases


def make(spec):
    kind = spec[0]
    if kind == "gm":
        _, dt, hi, flags, cfg, extra = spec
        return gm_case(dt, hi, flags, cfg, **extra)
    if kind == "wg":
        _, dt, hi, flags, cfg, extra = spec
        return wg_case(dt, hi, flags, cfg, **extra)
    if kind == "bc":
        _, dt, hr, hc, g, extra = spec
        return bc_case(dt, hr, hc, g, **extra)
    if kind == "sa":
        _, exact, seed, extra = spec
        return sample_case(exact, seed, **extra)
    if kind == "pr":
        return project_case(**spec[1])
    raise ValueError(kind)


def resource_usage(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run(
            [os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
        ).stdout
    finally:
        os.remove(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return (
        {"regs": int(m[1]), "stack": int(m[2]), "static_smem": int(m[3]), "local": int(m[4])}
        if m
        else {}
    )


def compile_one(item):
    kname, name, spec = item
    fn = KERNELS[kname]
    t0 = time.time()
    try:
        args, kw, opts = make(spec)
        backend = triton.compiler.make_backend(TARGET)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        kwargs = dict(kw, **opts)
        bound, specialization, options = binder(*args, **kwargs)
        _, signature, constexprs, attrs = fn._pack_args(
            backend, kwargs, bound, specialization, options
        )
        src = ASTSource(fn, signature, constexprs, attrs)
        ck = triton.compile(src, target=TARGET, options=opts)
        md = ck.metadata
        asm = ck.asm
        info = {
            "stages": [k for k in ("ttir", "ttgir", "llir", "ptx", "cubin") if k in asm],
            "cubin_bytes": len(asm.get("cubin", b"")),
            "shared": md.shared,
            "num_warps": md.num_warps,
            "sig": {k: v for k, v in signature.items() if v != "constexpr"},
            **resource_usage(asm["cubin"]),
        }
        ttgir = asm["ttgir"]
        info["wgmma"] = "warp_group_dot" in ttgir
        if "#ttg.nvidia_mma<{versionMajor = 3" in ttgir:
            info["mma"] = "v3"
        else:
            info["mma"] = "v2" if "nvidia_mma" in ttgir else "-"
        return kname, name, True, info, time.time() - t0
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        return kname, name, False, msg + "\n" + traceback.format_exc(limit=3), time.time() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None, help="substring filter on case name")
    ns = ap.parse_args()
    cases = build_cases(ns.quick)
    if ns.only:
        cases = [c for c in cases if ns.only in c[1]]
    print(
        f"triton {triton.__version__}, target {TARGET}, {len(cases)} cases, ptxas: "
        + subprocess.run(
            [os.path.join(BIN, "ptxas-blackwell"), "--version"], capture_output=True, text=True
        ).stdout.splitlines()[-1],
        flush=True,
    )
    t0 = time.time()
    fails, results = 0, []
    with ProcessPoolExecutor(ns.jobs) as ex:
        for kname, name, ok, info, dt in ex.map(compile_one, cases):
            results.append((kname, name, ok, info, dt))
            if ok:
                warn = (" SMEM>232448!" if info["shared"] > MAX_DYN_SMEM else "") + (
                    " SPILL(stack)!" if info.get("stack") else ""
                )
                print(
                    f"OK   {dt:6.1f}s  {name}  [regs={info.get('regs')} stack={info.get('stack')} local={info.get('local')} "
                    f"shared={info['shared']} mma={info['mma']} wgmma={info['wgmma']} "
                    f"stages={'/'.join(info['stages'])} cubin={info['cubin_bytes']}B]{warn}",
                    flush=True,
                )
            else:
                fails += 1
                print(f"FAIL {dt:6.1f}s  {name}\n    " + info.replace("\n", "\n    "), flush=True)
    print(
        f"\n{len(cases) - fails}/{len(cases)} OK, {fails} failed, total {time.time() - t0:.1f}s wall"
    )
    # signature sample per kernel
    seen = set()
    for kname, name, ok, info, _ in results:
        if ok and kname not in seen:
            seen.add(kname)
            print(f"signature[{kname}] ({name}): {info['sig']}")


if __name__ == "__main__":
    main()
