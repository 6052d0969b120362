"""Triton kernels of the compact ops: gather-GEMM, weight-gradient scatter, weight block
gather/scatter, fused mask sampling, budget projection.

They run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before
triton is imported), which is how the test suite checks them without a GPU. Every kernel
accumulates in float32 (the projection in float64) and reads weights by index: no gathered
weight copy exists in the linear path. The graph ops' launchers call their kernels through
``torch.library.wrap_triton``, so torch.compile traces them inside the triton_ops of
``kernels/triton_ops.py``; the sampler and the projection run outside graphs (the
runtime's structure update) and launch directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton as _wrap_triton

from sparsefx.kernels import interpreting

__all__ = [
    "block_copy",
    "gather_matmul",
    "project_budget",
    "sample_compact",
    "weight_grad",
]


def wrap_triton(kernel):
    """``torch.library.wrap_triton``, except for an interpreted kernel, which launches as it
    is: torch 2.11 rejects an InterpretedFunction, 2.13 returns it unwrapped itself."""
    return kernel if interpreting() else _wrap_triton(kernel)


TILES = [  # (outer, outer, reduction, stages, warps)
    (128, 256, 64, 3, 8),
    (128, 128, 64, 3, 8),
    (128, 128, 32, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 32, 32, 4, 2),
    (32, 32, 32, 2, 2),
]
"""Hopper tiles down to 32x32x32 for small kept counts; `prune_tiles` drops those that
cannot fit a launch's dtype."""
SHARED_MEMORY = 232448
"""Bytes of shared memory one block may use on sm_90 (H100/H200)."""


def _matmul_configs(names: tuple[str, str, str]) -> list[triton.Config]:
    """`TILES` as configs with these block names (outer, outer, reduction); the interpreter
    gets one small tile (autotuning there would only cost time)."""
    a, b, r = names
    if interpreting():
        return [triton.Config({a: 16, b: 16, r: 16}, num_warps=1)]
    return [
        triton.Config({a: ta, b: tb, r: tr}, num_stages=stages, num_warps=warps)
        for ta, tb, tr, stages, warps in TILES
    ]


def prune_tiles(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotuning candidates whose pipelined operand tiles fit in shared memory (every stage
    holds an [outer, reduction] tile of the first operand, twice with a ReLU gate, and a
    [reduction, outer] tile of the second, each counted in its own dtype: under autocast a
    float32 weight meets a half-type input), without the 128x256 tile for IEEE float32,
    which spills registers. Ahead-of-time builds for sm_90 without a GPU (triton.compile to
    cubin) showed the float32 configs this drops exceed the limit; they would fail to launch
    and cost compile time on every new autotuning key. The count is an upper bound: the
    mixed-dtype 128x256x64 tile it drops with a gate built at 131584 bytes, but spilled
    registers there (`benchmarks/triton_builds.py --only autocast`). The smallest tile always
    stays."""
    first, _, second = list(named_args.values())[:3]  # (A, gate, B) / (G, gate, X)
    operands = 2 if kwargs.get("GATE") else 1
    kept = []
    for config in configs:
        outer_a, outer_b, reduction = config.kwargs.values()
        row = operands * outer_a * first.element_size() + outer_b * second.element_size()
        tiles = row * reduction * config.num_stages
        spills = kwargs.get("PRECISION") == "ieee" and outer_a * outer_b > 128 * 128
        if tiles <= SHARED_MEMORY and not spills:
            kept.append(config)
    return kept or configs[-1:]


def _autotuned(blocks: tuple[str, str, str], key: list[str]):
    """Autotuning over `TILES` for a GEMM kernel with these block names (outer, outer,
    reduction), keyed by bucketed sizes, pruned by `prune_tiles`. The key also holds what
    `prune_tiles` reads besides the operands' dtypes (which Triton adds itself): a tile tuned
    for an ungated launch may not fit a gated one of the same sizes."""
    return triton.autotune(
        configs=_matmul_configs(blocks),
        key=[*key, "GATE", "PRECISION"],
        prune_configs_by={"early_config_prune": prune_tiles},
    )


def _bucket(n: int | torch.SymInt) -> int:
    """Autotuning key of a size: its next power of two, so per-step kept counts that change
    by a few channels reuse one tuned config instead of re-tuning every step. A symbolic size
    (torch.compile tracing) uses its hint, without a guard: the key is a tuning choice, not
    a shape the graph depends on."""
    if isinstance(n, torch.SymInt):
        hint = n.node.hint
        n = hint if isinstance(hint, int) else 1024
    return 1 << max(n - 1, 0).bit_length()


@_autotuned(("BLOCK_M", "BLOCK_J", "BLOCK_R"), ["KEY_M", "KEY_J", "KEY_R"])
@triton.jit
def _gather_matmul_kernel(
    a_ptr,
    gate_ptr,
    b_ptr,
    bias_ptr,
    c_ptr,
    j_idx_ptr,
    r_idx_ptr,
    M,
    J,
    R,
    KEY_M,
    KEY_J,
    KEY_R,
    stride_am,
    stride_ar,
    stride_bj,
    stride_br,
    stride_cm,
    stride_cj,
    HAS_J_IDX: tl.constexpr,
    HAS_R_IDX: tl.constexpr,
    GATE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """C[m, j] = act(sum_r A'[m, r] * B[jb(j), rb(r)] + bias[jb(j)]), jb/rb the index lists
    (identity when absent) and A' = A where GATE > 0 (ReLU's backward), else A."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_m = offs_m < M
    mask_j = offs_j < J
    if HAS_J_IDX:
        rows_b = tl.load(j_idx_ptr + offs_j, mask=mask_j, other=0)
    else:
        rows_b = offs_j.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        if HAS_R_IDX:
            cols_b = tl.load(r_idx_ptr + offs_r, mask=mask_r, other=0)
        else:
            cols_b = offs_r.to(tl.int64)
        a_off = offs_m[:, None].to(tl.int64) * stride_am + offs_r[None, :] * stride_ar
        a_mask = mask_m[:, None] & mask_r[None, :]
        a = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)
        if GATE:
            gate = tl.load(gate_ptr + a_off, mask=a_mask, other=0.0)
            a = tl.where(gate > 0, a, tl.zeros_like(a))
        b_off = cols_b[:, None] * stride_br + rows_b[None, :] * stride_bj
        b = tl.load(b_ptr + b_off, mask=mask_r[:, None] & mask_j[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        else:  # a float32 weight under autocast is read in A's half type, not cast whole
            b = b.to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_b, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    c_off = offs_m[:, None].to(tl.int64) * stride_cm + offs_j[None, :] * stride_cj
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_j[None, :])


@_autotuned(("BLOCK_N", "BLOCK_K", "BLOCK_M"), ["KEY_M", "KEY_N", "KEY_K"])
@triton.jit
def _weight_grad_kernel(
    g_ptr,
    gate_ptr,
    x_ptr,
    w_grad_ptr,
    b_grad_ptr,
    row_idx_ptr,
    col_idx_ptr,
    M,
    N,
    K,
    KEY_M,
    KEY_N,
    KEY_K,
    stride_gm,
    stride_gn,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    HAS_ROW_IDX: tl.constexpr,
    HAS_COL_IDX: tl.constexpr,
    GATE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """W_grad[row(n), col(k)] = sum_m G'[m, n] X[m, k] and b_grad[row(n)] = sum_m G'[m, n]:
    the compact weight gradient written straight into its full-size (or row-compact) place."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        g_off = offs_m[:, None].to(tl.int64) * stride_gm + offs_n[None, :] * stride_gn
        g_mask = mask_m[:, None] & mask_n[None, :]
        g = tl.load(g_ptr + g_off, mask=g_mask, other=0.0)
        if GATE:
            gate = tl.load(gate_ptr + g_off, mask=g_mask, other=0.0)
            g = tl.where(gate > 0, g, tl.zeros_like(g))
        x_off = offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
        x = tl.load(x_ptr + x_off, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            g, x = g.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION)
        if HAS_BIAS:
            bias_acc += tl.sum(g.to(tl.float32), axis=0)
    if HAS_ROW_IDX:
        rows = tl.load(row_idx_ptr + offs_n, mask=mask_n, other=0)
    else:
        rows = offs_n.to(tl.int64)
    if HAS_COL_IDX:
        cols = tl.load(col_idx_ptr + offs_k, mask=mask_k, other=0)
    else:
        cols = offs_k.to(tl.int64)
    w_off = rows[:, None] * stride_wn + cols[None, :] * stride_wk
    w_mask = mask_n[:, None] & mask_k[None, :]
    tl.store(w_grad_ptr + w_off, acc.to(w_grad_ptr.dtype.element_ty), mask=w_mask)
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(b_grad_ptr + rows, bias_acc.to(b_grad_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _block_copy_kernel(
    full_ptr,
    compact_ptr,
    row_idx_ptr,
    col_idx_ptr,
    numel,
    J,
    S,
    stride_f0,
    stride_f1,
    HAS_ROW_IDX: tl.constexpr,
    HAS_COL_IDX: tl.constexpr,
    GATHER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """compact[i, j, s] <-> full[row(i), col(j), s] (GATHER: read full, else write it)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    s = offs % S
    ij = offs // S
    i = ij // J
    j = ij % J
    if HAS_ROW_IDX:
        i = tl.load(row_idx_ptr + i, mask=mask, other=0)
    if HAS_COL_IDX:
        j = tl.load(col_idx_ptr + j, mask=mask, other=0)
    full_off = i * stride_f0 + j * stride_f1 + s
    if GATHER:
        tl.store(compact_ptr + offs, tl.load(full_ptr + full_off, mask=mask), mask=mask)
    else:
        tl.store(full_ptr + full_off, tl.load(compact_ptr + offs, mask=mask), mask=mask)


# a new seed every step: specialising it (divisible by 16 or not) would compile two variants
@triton.jit(do_not_specialize=["seed"])
def _sample_kernel(
    s_ptr,
    offsets_ptr,
    masks_ptr,
    idx_ptr,
    counts_ptr,
    psi_ptr,
    seed,
    N,
    G,
    eps,
    EXACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (group g, sample k): m = u < s with Philox uniforms u keyed by (seed, k, i);
    a group left with fewer than min(2, size) channels is topped up with its most probable
    dropped ones (`policy.keep_minimum`); writes the mask, the group's sorted kept indices at
    its offset, the kept count, and psi(m, s) of the score form."""
    g = tl.program_id(0)
    k = tl.program_id(1)
    start = tl.load(offsets_ptr + g)
    end = tl.load(offsets_ptr + g + 1)
    need = tl.minimum(end - start, 2)
    row = k.to(tl.int64) * N
    count = tl.zeros((), dtype=tl.int32)
    for b0 in range(start, end, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        inside = offs < end
        s = tl.load(s_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        keep = (tl.rand(seed, row + offs) < s) & inside
        count += tl.sum(keep.to(tl.int32), axis=0)
    first = tl.full((), -1, dtype=tl.int64)
    second = tl.full((), -1, dtype=tl.int64)
    if count < need:  # top up with the most probable channels, while still short
        first = _argmax_excluding(s_ptr, start, end, first, BLOCK)
        s_first = tl.load(s_ptr + first).to(tl.float32)
        if count + (tl.rand(seed, row + first) >= s_first).to(tl.int32) < need:
            second = _argmax_excluding(s_ptr, start, end, first, BLOCK)
    kept = tl.zeros((), dtype=tl.int32)
    for b0 in range(start, end, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        inside = offs < end
        s = tl.load(s_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        keep = (tl.rand(seed, row + offs) < s) | (offs == first) | (offs == second)
        keep = keep & inside
        position = kept + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(idx_ptr + row + start + position, (offs - start).to(tl.int64), mask=keep)
        tl.store(masks_ptr + row + offs, keep.to(tl.int8), mask=inside)
        sc = tl.minimum(tl.maximum(s, eps), 1.0 - eps)
        var = sc * (1.0 - sc)
        if not EXACT:
            var = tl.sqrt(var)
        psi = (keep.to(tl.float32) - sc) / var
        tl.store(psi_ptr + row + offs, psi, mask=inside)
        kept += tl.sum(keep.to(tl.int32), axis=0)
    tl.store(counts_ptr + k * G + g, kept)


@triton.jit
def _argmax_excluding(s_ptr, start, end, excluded, BLOCK: tl.constexpr):
    """Index of the largest s in [start, end) other than `excluded` (lowest index on ties)."""
    best = tl.full((), -1.0, dtype=tl.float32)
    best_idx = tl.full((), -1, dtype=tl.int64)
    for b0 in range(start, end, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        valid = (offs < end) & (offs != excluded)
        s = tl.load(s_ptr + offs, mask=valid, other=-1.0).to(tl.float32)
        s = tl.where(valid, s, -1.0)
        block_best = tl.max(s, axis=0)
        block_idx = tl.argmax(s, axis=0)
        if block_best > best:
            best = block_best
            best_idx = (b0 + block_idx).to(tl.int64)
    return best_idx


@triton.jit
def _load_z_and_costs(z_ptr, c_ptr, offs, inside):
    """z and c at `offs` in float64 (0 and 1 outside the vector: no cost, no budget use)."""
    z = tl.load(z_ptr + offs, mask=inside, other=0.0).to(tl.float64)
    return z, tl.load(c_ptr + offs, mask=inside, other=1.0).to(tl.float64)


@triton.jit
def _project_kernel(z_ptr, c_ptr, s_ptr, N, budget_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """s = clamp(z - v c, 0, 1) with the smallest v >= 0 meeting c @ s <= budget (one
    program, float64): bisection on v, then the exact solve on the linear piece of
    f(v) = c @ clamp(z - v c, 0, 1) that the final bracket lies on. The budget comes as a
    float64 tensor: a Python float argument is float32 in a compiled launch (and in triton
    3.6's interpreter), up to 1e-7 off, which the bisection would then meet exactly."""
    budget = tl.load(budget_ptr)
    f0 = tl.zeros((), dtype=tl.float64)
    hi = tl.zeros((), dtype=tl.float64)
    for b0 in range(0, N, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        inside = offs < N
        z, c = _load_z_and_costs(z_ptr, c_ptr, offs, inside)
        f0 += tl.sum(tl.where(inside, c * tl.minimum(tl.maximum(z, 0.0), 1.0), 0.0), axis=0)
        hi = tl.maximum(hi, tl.max(tl.where(inside, z / c, 0.0), axis=0))
    v = tl.zeros((), dtype=tl.float64)
    if f0 > budget:
        lo = tl.zeros((), dtype=tl.float64)
        for _ in range(ITERS):
            mid = (lo + hi) * 0.5
            f = tl.zeros((), dtype=tl.float64)
            for b0 in range(0, N, BLOCK):
                offs = b0 + tl.arange(0, BLOCK)
                inside = offs < N
                z, c = _load_z_and_costs(z_ptr, c_ptr, offs, inside)
                s = tl.minimum(tl.maximum(z - mid * c, 0.0), 1.0)
                f += tl.sum(tl.where(inside, c * s, 0.0), axis=0)
            if f > budget:
                lo = mid
            else:
                hi = mid
        # On the bracket's piece, f(w) = A - w Q: A and Q from the channels' states there.
        mid = (lo + hi) * 0.5
        a = tl.zeros((), dtype=tl.float64)
        q = tl.zeros((), dtype=tl.float64)
        for b0 in range(0, N, BLOCK):
            offs = b0 + tl.arange(0, BLOCK)
            inside = offs < N
            z, c = _load_z_and_costs(z_ptr, c_ptr, offs, inside)
            t = z - mid * c
            one = inside & (t >= 1.0)
            free = inside & (t > 0.0) & (t < 1.0)
            a += tl.sum(tl.where(one, c, 0.0) + tl.where(free, c * z, 0.0), axis=0)
            q += tl.sum(tl.where(free, c * c, 0.0), axis=0)
        v = hi
        if q > 0:
            v = tl.minimum(tl.maximum((a - budget) / q, lo), hi)
    for b0 in range(0, N, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        inside = offs < N
        z, c = _load_z_and_costs(z_ptr, c_ptr, offs, inside)
        s = tl.minimum(tl.maximum(z - v * c, 0.0), 1.0)
        tl.store(s_ptr + offs, s.to(s_ptr.dtype.element_ty), mask=inside)


# -- launchers --------------------------------------------------------------------------------


def _dot_options(dtype: torch.dtype) -> dict:
    """tl.dot's input precision: float32 operands follow torch's matmul precision setting
    (TF32 only where torch would use it too); half types need none. The interpreter
    multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584), so there bfloat16
    operands are widened first: their products are exact in float32 either way."""
    upcast = dtype == torch.bfloat16 and interpreting()
    if upcast or (dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"):
        return {"PRECISION": "ieee", "UPCAST": upcast}
    return {"PRECISION": "tf32" if dtype == torch.float32 else None, "UPCAST": False}


def gather_matmul(
    a: Tensor,
    b: Tensor,
    j_idx: Tensor | None,
    r_idx: Tensor | None,
    *,
    b_transposed: bool,
    bias: Tensor | None = None,
    relu: bool = False,
    gate: Tensor | None = None,
) -> Tensor:
    """C = A' @ B_sel with B_sel[r, j] = B[jb(j), rb(r)] (``b_transposed``: B[rb(r), jb(j)]),
    plus bias[jb] and ReLU; A' is A masked by gate > 0. A and gate are [M, R], contiguous."""
    m, r = a.shape
    j = b.shape[1 if b_transposed else 0] if j_idx is None else j_idx.shape[0]
    out = a.new_empty((m, j))
    if out.numel() == 0:
        return out
    stride_j, stride_r = b.stride() if not b_transposed else b.stride()[::-1]

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(j, meta["BLOCK_J"]))

    wrap_triton(_gather_matmul_kernel)[grid](
        a, gate, b, bias, out, j_idx, r_idx,
        m, j, r, _bucket(m), _bucket(j), _bucket(r),
        a.stride(0), a.stride(1), stride_j, stride_r, out.stride(0), out.stride(1),
        HAS_J_IDX=j_idx is not None, HAS_R_IDX=r_idx is not None, GATE=gate is not None,
        HAS_BIAS=bias is not None, RELU=relu, **_dot_options(a.dtype),
    )  # fmt: skip
    return out


def weight_grad(
    grad: Tensor,
    x: Tensor,
    w_grad: Tensor,
    row_idx: Tensor | None,
    col_idx: Tensor | None,
    *,
    b_grad: Tensor | None = None,
    gate: Tensor | None = None,
) -> None:
    """w_grad[row(n), col(k)] = (G' ^T X)[n, k] and b_grad[row(n)] = G'.sum(0), in place
    (G, gate [M, N] and X [M, K] contiguous; w_grad's other entries are left alone)."""
    m, n = grad.shape
    k = x.shape[1]
    if n == 0:
        return
    if k == 0:  # no kept input columns: only the bias gradient is nonzero
        if b_grad is not None:
            gated = grad if gate is None else grad * (gate > 0)
            sums = gated.sum(0, dtype=torch.float32).to(b_grad.dtype)
            b_grad.copy_(sums) if row_idx is None else b_grad.index_copy_(0, row_idx, sums)
        return

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))

    wrap_triton(_weight_grad_kernel)[grid](
        grad, gate, x, w_grad, b_grad, row_idx, col_idx,
        m, n, k, _bucket(m), _bucket(n), _bucket(k),
        grad.stride(0), grad.stride(1), x.stride(0), x.stride(1), w_grad.stride(0), w_grad.stride(1),
        HAS_ROW_IDX=row_idx is not None, HAS_COL_IDX=col_idx is not None, GATE=gate is not None,
        HAS_BIAS=b_grad is not None, **_dot_options(grad.dtype),
    )  # fmt: skip


_COPY_BLOCK = 1024


def block_copy(
    full: Tensor, compact: Tensor, row_idx: Tensor | None, col_idx: Tensor | None, *, gather: bool
) -> None:
    """compact[i, j, ...] = full[row(i), col(j), ...] (gather) or the reverse scatter, in
    place; both contiguous, with the same trailing (spatial) sizes."""
    numel = compact.numel()
    if numel == 0:
        return
    rows, cols = compact.shape[0], compact.shape[1]
    spatial = numel // (rows * cols)
    wrap_triton(_block_copy_kernel)[(triton.cdiv(numel, _COPY_BLOCK),)](
        full, compact, row_idx, col_idx,
        numel, cols, spatial, full.stride(0), full.stride(1),
        HAS_ROW_IDX=row_idx is not None, HAS_COL_IDX=col_idx is not None, GATHER=gather,
        BLOCK=_COPY_BLOCK,
    )  # fmt: skip


def sample_compact(
    s: Tensor, offsets: Tensor, num_samples: int, seed: int, *, exact: bool, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One launch over all groups and samples: masks bool [K, N]; kept indices int64 [K, N]
    (group g's sorted kept indices, relative to the group, at offsets[g]..+counts[k, g]);
    counts int32 [K, G]; psi float32 [K, N] (DESIGN §3's score function of the mask)."""
    n, groups = s.shape[0], offsets.shape[0] - 1
    masks = torch.empty((num_samples, n), dtype=torch.int8, device=s.device)
    indices = torch.empty((num_samples, n), dtype=torch.int64, device=s.device)
    counts = torch.empty((num_samples, groups), dtype=torch.int32, device=s.device)
    psi = torch.empty((num_samples, n), dtype=torch.float32, device=s.device)
    if groups:
        _sample_kernel[(groups, num_samples)](
            s, offsets, masks, indices, counts, psi, seed, n, groups, eps,
            EXACT=exact, BLOCK=256,
        )  # fmt: skip
    return masks.bool(), indices, counts, psi


def project_budget(
    z: Tensor, costs: Tensor, budget: float | Tensor, *, iterations: int = 64
) -> Tensor:
    """Projection of z onto {0 <= s <= 1, costs @ s <= budget} in one launch (no host sync,
    also for a budget computed on the device as a 0-d tensor): the same set and answer as
    ``policy.project_to_budget``, found by float64 bisection and an exact solve on the final
    linear piece."""
    s = torch.empty_like(z)
    if z.numel():
        if isinstance(budget, Tensor):
            exact_budget = budget.to(device=z.device, dtype=torch.float64).reshape(1)
        else:
            exact_budget = torch.full((1,), budget, dtype=torch.float64, device=z.device)
        _project_kernel[(1,)](z, costs, s, z.shape[0], exact_budget, ITERS=iterations, BLOCK=1024)
    return s
