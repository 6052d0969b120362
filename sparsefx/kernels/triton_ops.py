"""The Triton-backed compact ops (``torch.library.triton_op``): what the compact graph runs
on CUDA when ``SparseConfig(kernels=...)`` selects Triton (passes/kernels.py).

* ``sparsefx::compact_linear``: ``act(x @ W[out_idx][:, in_idx]^T + b[out_idx])`` by one
  gather-GEMM that reads W's rows and columns by index (no gathered copy), optionally with
  the ReLU that follows fused into its epilogue. Its backward is
  ``sparsefx::compact_linear_backward``: dx by the transposed gather-GEMM, and dW (with db)
  written by one kernel straight into the full-size gradient at (out_idx, in_idx).
* ``sparsefx::gather_block`` / ``sparsefx::scatter_block``: a weight's kept rows and
  columns (any trailing kernel dims) in one kernel, and its gradient's scatter back, around
  cuDNN's convolution.

Being triton_ops, torch.compile and torch.export see the kernels inside them. Each op falls
back to its plain-torch reference where Triton cannot run: CPU tensors without the
interpreter, and fake tensors under the interpreter (so compile-mode tracing on a CPU traces
the reference). Indices are sorted, unique, in-range int64 vectors (checked); float64 takes the reference too; ``None``
means every channel on that side.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op

from sparsefx.kernels import compact, interpreting
from sparsefx.kernels.triton_kernels import block_copy, gather_matmul, weight_grad

__all__ = ["compact_linear", "gather_block"]


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_runs_on(x: Tensor) -> bool:
    """The kernels take fp32/bf16/fp16 (fp32 accumulation); float64 takes the reference."""
    if x.dtype not in _KERNEL_DTYPES:
        return False
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and interpreting() and not is_fake(x)


def _check_index(idx: Tensor | None, size: int, what: str) -> None:
    """Sorted, unique and in [0, size): an asynchronous check on CUDA (no host sync)."""
    if idx is None:
        return
    if idx.dtype != torch.int64 or idx.dim() != 1:
        raise ValueError(f"{what} must be a 1-D int64 tensor, got {idx.dtype} {tuple(idx.shape)}")
    # each entry against its predecessor, the first against -1: both operands have idx's own
    # length, where idx[1:] > idx[:-1] would guard a symbolic length on len - 1 != 1 and
    # recompile a compiled graph for every group that keeps exactly two channels
    previous = torch.cat([idx[:1] - 1, idx[:-1]])
    valid = (idx > previous).all() & (idx >= 0).all() & (idx < size).all()
    torch._assert_async(
        valid, f"{what} must be sorted, unique and in [0, {size}) (kept channel indices)"
    )


def _rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[:-1].numel(), x.shape[-1]).contiguous()


# -- compact linear -----------------------------------------------------------------------


@triton_op("sparsefx::compact_linear", mutates_args=())
def compact_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out_idx: Tensor | None,
    in_idx: Tensor | None,
    relu: bool = False,
    sparse_grad: bool = False,
) -> Tensor:
    """act(x @ weight[out_idx][:, in_idx]^T + bias[out_idx]) with weight [out, in] (any
    strides), x [..., len(in_idx)]; act is ReLU when `relu`. Computed in x's dtype: under
    autocast x arrives in the half type and the weight is read in it (`_autocast_input`)."""
    if not _triton_runs_on(x):
        kept_bias = bias if bias is None or out_idx is None else bias.index_select(0, out_idx)
        kept = compact.gather_weight(weight, out_idx, in_idx).to(x.dtype)
        y = torch.nn.functional.linear(
            x, kept, None if kept_bias is None else kept_bias.to(x.dtype)
        )
        return y.relu() if relu else y
    _check_index(out_idx, weight.shape[0], "out_idx")
    _check_index(in_idx, weight.shape[1], "in_idx")
    y = gather_matmul(_rows(x), weight, out_idx, in_idx, b_transposed=False, bias=bias, relu=relu)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@triton_op("sparsefx::compact_linear_backward", mutates_args=())
def compact_linear_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    relu_output: Tensor | None,
    out_idx: Tensor | None,
    in_idx: Tensor | None,
    has_bias: bool,
    input_grad: bool,
    sparse_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dW, db) of `compact_linear`; ReLU's backward reads its output. dW is full-size
    [out, in] (zeros at dropped weights), or with `sparse_grad` only the kept rows
    [len(out_idx), in]; db is full-size (empty without bias); dx is empty unless
    `input_grad`."""
    rows = out_idx.shape[0] if sparse_grad and out_idx is not None else weight.shape[0]
    w_grad = weight.new_zeros((rows, weight.shape[1]))
    b_grad = weight.new_zeros(weight.shape[0]) if has_bias else weight.new_empty(0)
    if not _triton_runs_on(x):
        g = grad if relu_output is None else grad * (relu_output > 0)
        w_c = compact.gather_weight(weight, out_idx, in_idx).to(g.dtype)
        dx = g @ w_c if input_grad else x.new_empty(0)
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        dw_c = g2.t() @ x2
        row_idx = None if sparse_grad else out_idx
        w_grad = _place(w_grad, dw_c, row_idx, in_idx)
        if has_bias:
            b_grad = _place(b_grad, g2.sum(0), out_idx, None)
        return dx, w_grad, b_grad
    g2, x2 = _rows(grad), _rows(x)
    gate = None if relu_output is None else _rows(relu_output)
    dx = x.new_empty(0)
    if input_grad:
        dx = gather_matmul(g2, weight, in_idx, out_idx, b_transposed=True, gate=gate)
        dx = dx.reshape(x.shape)
    row_idx = None if sparse_grad else out_idx
    fused_bias = has_bias and not sparse_grad  # the bias rows are out_idx, not the buffer's
    weight_grad(g2, x2, w_grad, row_idx, in_idx, b_grad=b_grad if fused_bias else None, gate=gate)
    if has_bias and not fused_bias:
        g_sum = (g2 if gate is None else g2 * (gate > 0)).sum(0)
        b_grad = _place(b_grad, g_sum, out_idx, None)
    return dx, w_grad, b_grad


def _place(full: Tensor, part: Tensor, rows: Tensor | None, cols: Tensor | None) -> Tensor:
    """`full` with `part` written at [rows][:, cols] (None: every index), out of place."""
    if rows is None and cols is None:
        return part.to(full.dtype)
    if cols is None:
        return full.index_copy(0, rows, part.to(full.dtype))
    if rows is None:
        return full.index_copy(1, cols, part.to(full.dtype))
    return full.index_put((rows[:, None], cols), part.to(full.dtype))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, out_idx, in_idx, relu, sparse_grad = inputs
    ctx.save_for_backward(x, weight, output if relu else None, out_idx, in_idx)
    ctx.has_bias, ctx.sparse_grad, ctx.weight_shape = bias is not None, sparse_grad, weight.shape


def _linear_backward(ctx, grad):
    x, weight, relu_output, out_idx, in_idx = ctx.saved_tensors
    input_grad = ctx.needs_input_grad[0]
    dx, w_grad, b_grad = compact_linear_backward(
        grad, x, weight, relu_output, out_idx, in_idx, ctx.has_bias, input_grad, ctx.sparse_grad
    )
    if ctx.sparse_grad and out_idx is not None:
        w_grad = _row_sparse(w_grad, out_idx, ctx.weight_shape)
    return (
        dx if input_grad else None,
        w_grad,
        b_grad if ctx.has_bias else None,
        None,
        None,
        None,
        None,
    )


def _row_sparse(rows: Tensor, out_idx: Tensor, shape: torch.Size) -> Tensor:
    """The COO gradient holding only kept rows, as ``sparsefx::gather_weight`` returns it."""
    return torch.sparse_coo_tensor(
        out_idx[None], rows, shape, is_coalesced=True, check_invariants=False
    )


compact_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


def _autocast_input(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple:
    """Autocast for `compact_linear` as it casts ``aten.linear``, but x only: the op computes
    in x's dtype and its kernels read the kept weight and bias in it (a half-type x from an
    autocast conv once met the float32 weight in ``tl.dot``, which refuses mixed operands),
    so no full-size copy of the weight is made per call (dense autocast caches one per
    region; a compact op reads a few of its rows)."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return x, weight, bias


compact.register_autocast_rule(compact_linear, _autocast_input)


# -- weight blocks (the conv path) --------------------------------------------------------


@triton_op("sparsefx::gather_block", mutates_args=())
def gather_block(
    weight: Tensor, out_idx: Tensor | None, in_idx: Tensor | None, sparse_grad: bool = False
) -> Tensor:
    """weight[out_idx][:, in_idx] for a weight [out, in, *kernel] in one kernel; its
    backward scatters into the full-size gradient (or kept rows, `sparse_grad`)."""
    shape = list(weight.shape)
    if out_idx is not None:
        shape[0] = out_idx.shape[0]
    if in_idx is not None:
        shape[1] = in_idx.shape[0]
    if not _triton_runs_on(weight):
        return compact.gather_weight(weight, out_idx, in_idx)
    _check_index(out_idx, weight.shape[0], "out_idx")
    _check_index(in_idx, weight.shape[1], "in_idx")
    kept = weight.new_empty(shape)
    block_copy(weight.contiguous(), kept, out_idx, in_idx, gather=True)
    return kept


@triton_op("sparsefx::scatter_block", mutates_args=())
def scatter_block(
    grad: Tensor, out_idx: Tensor | None, in_idx: Tensor | None, size: list[int]
) -> Tensor:
    """zeros(size) with grad written at [out_idx][:, in_idx]: `gather_block`'s backward."""
    full = grad.new_zeros(size)
    if not _triton_runs_on(grad):
        return _place(full, grad, out_idx, in_idx)
    block_copy(full, grad.contiguous(), out_idx, in_idx, gather=False)
    return full


def _gather_setup(ctx, inputs, output):
    weight, out_idx, in_idx, sparse_grad = inputs
    ctx.save_for_backward(out_idx, in_idx)
    ctx.shape, ctx.sparse_grad = list(weight.shape), sparse_grad


def _gather_backward(ctx, grad):
    out_idx, in_idx = ctx.saved_tensors
    if ctx.sparse_grad and out_idx is not None:
        rows = scatter_block(grad, None, in_idx, [out_idx.shape[0], *ctx.shape[1:]])
        return _row_sparse(rows, out_idx, torch.Size(ctx.shape)), None, None, None
    return scatter_block(grad, out_idx, in_idx, ctx.shape), None, None, None


gather_block.register_autograd(_gather_backward, setup_context=_gather_setup)
