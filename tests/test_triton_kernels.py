"""The Triton kernels and ops against float64 references, for every dtype and the edge cases
(one kept channel, counts that are not multiples of 16, empty groups, bad indices).

They run on CUDA when a GPU is present, else on CPU tensors under Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported on a machine without an
NVIDIA device).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from tests.conftest import triton_device

DEVICE = triton_device()  # skips the module, naming the hardware, before the Triton imports

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from sparsefx.kernels import triton_kernels as tk  # noqa: E402
from sparsefx.kernels import triton_ops  # noqa: E402
from sparsefx.kernels.triton_ops import compact_linear, gather_block  # noqa: E402
from sparsefx.policy import keep_minimum, project_to_budget  # noqa: E402
from sparsefx.policy.estimator import score_function  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# max |error| / (|x| |W| scale): fp32 (TF32 on a GPU where torch allows it), bf16, fp16
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _idx(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


def _randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float) -> None:
    """Within the dtype's tolerance of a float64 reference, relative to the inputs' scale
    (the rounding of the output's own dtype included)."""
    error = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= TOLERANCE[dtype] * scale, (error, TOLERANCE[dtype] * scale)


# (weight out, weight in, kept out rows, kept in columns): counts off multiples of 16, a
# single kept channel, and sides with every channel
INDEX_CASES = [
    (29, 45, [0, 3, 4, 7, 8, 10, 11, 20, 28], [1, 2, 5, 8, 13, 21, 34, 40, 41, 42, 43, 44, 0]),
    (20, 33, [5], [7]),
    (17, 18, None, [0, 17]),
    (40, 24, list(range(0, 40, 2)), None),
]


def _sorted(values: list[int] | None) -> torch.Tensor | None:
    return None if values is None else _idx(sorted(values))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n_out", "n_in", "rows", "cols"), INDEX_CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_compact_linear_forward_and_backward_match_float64(dtype, n_out, n_in, rows, cols, relu):
    out_idx, in_idx = _sorted(rows), _sorted(cols)
    k_in = n_in if cols is None else len(cols)
    weight = _randn(n_out, n_in, dtype=dtype).requires_grad_()
    bias = _randn(n_out, dtype=dtype).requires_grad_()
    x = _randn(3, 11, k_in, dtype=dtype).requires_grad_()
    y = compact_linear(x, weight, bias, out_idx, in_idx, relu)
    grad = _randn(*y.shape, dtype=dtype)
    y.backward(grad)

    w64, b64, x64 = (t.detach().double().requires_grad_() for t in (weight, bias, x))
    w_kept = w64[out_idx] if out_idx is not None else w64
    w_kept = w_kept[:, in_idx] if in_idx is not None else w_kept
    b_kept = b64[out_idx] if out_idx is not None else b64
    z64 = torch.nn.functional.linear(x64, w_kept, b_kept)
    # ReLU's backward is gated by the kernel's own output, as aten's is by its own
    gate = (y.detach() > 0).double() if relu else torch.ones_like(z64)
    z64.backward(grad.double() * gate)

    scale = k_in**0.5 * 3
    _close(y, z64.detach().relu() if relu else z64.detach(), dtype, scale)
    _close(x.grad, x64.grad, dtype, scale * 2)
    _close(weight.grad, w64.grad, dtype, 33**0.5 * 3 * 2)
    _close(bias.grad, b64.grad, dtype, 33**0.5 * 3)
    kept = torch.zeros(n_out, n_in, dtype=torch.bool, device=DEVICE)
    r = out_idx if out_idx is not None else torch.arange(n_out, device=DEVICE)
    c = in_idx if in_idx is not None else torch.arange(n_in, device=DEVICE)
    kept[r[:, None], c] = True
    assert (weight.grad[~kept] == 0).all(), "dropped weights must get exact zeros"


@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_linear_reads_a_transposed_weight_by_strides(dtype):
    """GPT-2's Conv1D stores W as [in, out]; the op takes its transpose as a view."""
    stored = _randn(24, 19, dtype=dtype)
    x = _randn(8, 5, dtype=dtype)
    out_idx, in_idx = _idx([0, 4, 18]), _idx([1, 2, 3, 9, 23])
    y = compact_linear(x, stored.t(), None, out_idx, in_idx)
    expected = x.double() @ stored.double()[in_idx][:, out_idx]
    _close(y, expected, dtype, 5**0.5 * 3)


def test_compact_linear_sparse_gradient_holds_only_kept_rows():
    weight = _randn(12, 10).requires_grad_()
    bias = _randn(12).requires_grad_()
    out_idx, in_idx = _idx([2, 5, 11]), _idx([0, 3, 4, 9])
    x = _randn(6, 4)
    compact_linear(x, weight, bias, out_idx, in_idx, True, True).sum().backward()
    reference = weight.detach().clone().requires_grad_()
    ref_bias = bias.detach().clone().requires_grad_()
    compact_linear(x, reference, ref_bias, out_idx, in_idx, True).sum().backward()
    assert weight.grad.is_sparse
    assert torch.equal(weight.grad.coalesce().indices()[0], out_idx)
    torch.testing.assert_close(weight.grad.to_dense(), reference.grad)
    torch.testing.assert_close(bias.grad, ref_bias.grad)


def test_empty_groups_give_empty_outputs_and_zero_gradients():
    weight = _randn(7, 5).requires_grad_()
    bias = _randn(7).requires_grad_()
    none = _idx([])
    x = _randn(4, 0).requires_grad_()
    y = compact_linear(x, weight, bias, _idx([1, 6]), none)  # no kept input: y = bias
    torch.testing.assert_close(y, bias.detach()[[1, 6]].expand(4, 2))
    y.sum().backward()
    assert (weight.grad == 0).all() and x.grad.shape == (4, 0)
    torch.testing.assert_close(bias.grad, torch.tensor([0, 4, 0, 0, 0, 0, 4.0], device=DEVICE))
    x = _randn(4, 5)
    assert compact_linear(x, weight, bias, none, None).shape == (4, 0)


def test_no_kept_inputs_with_relu_gate_the_bias_gradient():
    """With no kept input columns y = relu(bias[out_idx]): a negative bias gets no gradient."""
    weight = _randn(7, 5).requires_grad_()
    bias = torch.tensor([1.0, -1, 2, -2, 3, -3, 4], device=DEVICE).requires_grad_()
    y = compact_linear(_randn(4, 0), weight, bias, _idx([1, 2, 3, 4]), _idx([]), True)
    torch.testing.assert_close(y, torch.tensor([0.0, 2, 0, 3], device=DEVICE).expand(4, 4))
    y.sum().backward()
    torch.testing.assert_close(bias.grad, torch.tensor([0, 0, 4, 0, 4, 0, 0.0], device=DEVICE))


@pytest.mark.parametrize(
    ("bad", "message"),
    [([3, 1], "sorted"), ([1, 1], "sorted, unique"), ([0, 9], r"in \[0, 7\)")],
)
def test_bad_indices_are_rejected_with_a_clear_error(bad, message):
    if DEVICE == "cuda":  # there the check is a device-side assert, fatal to the process
        pytest.skip("the message of an index error is checked on CPU (interpreter) only")
    weight, x = _randn(7, 5), _randn(2, 5)
    with pytest.raises(RuntimeError, match=message):
        compact_linear(x, weight, None, _idx(bad), None)
    with pytest.raises(RuntimeError, match=message):
        gather_block(_randn(7, 5, 3, 3), _idx(bad), None)


def test_index_check_compiles_once_for_every_kept_count():
    """The ops' index check traces without a guard on the kept count: a compiled graph with
    symbolic kept counts must not recompile when a group keeps exactly two channels (the
    keep-minimum rule makes that common), as comparing idx[1:] with idx[:-1] did."""

    def checked(idx: torch.Tensor) -> torch.Tensor:
        triton_ops._check_index(idx, 10, "idx")
        return idx + 1

    compiled = torch.compile(checked, backend="eager", dynamic=True)
    for kept in (3, 2, 4, 5, 2):
        compiled(torch.arange(kept, device=DEVICE))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_index_dtype_and_rank_are_checked_on_every_device():
    weight, x = _randn(7, 5), _randn(2, 5)
    with pytest.raises(ValueError, match="int64"):
        compact_linear(x, weight, None, _idx([1, 2]).int(), None)
    with pytest.raises(ValueError, match="1-D"):
        gather_block(_randn(7, 5, 3), _idx([1, 2])[None], None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rows", "cols"), [([1, 4], [0, 2, 3]), (None, [4]), ([5], None), ([0, 1, 2, 3, 4, 5], [1])]
)
def test_gather_block_and_its_scatter_are_exact(dtype, rows, cols):
    weight = _randn(6, 5, 3, 3, dtype=dtype).requires_grad_()
    out_idx, in_idx = _sorted(rows), _sorted(cols)
    kept = gather_block(weight, out_idx, in_idx)
    expected = weight.detach()
    expected = expected[out_idx] if out_idx is not None else expected
    expected = expected[:, in_idx] if in_idx is not None else expected
    assert torch.equal(kept, expected)
    grad = _randn(*kept.shape, dtype=dtype)
    kept.backward(grad)
    reference = weight.detach().clone().requires_grad_()
    reference_kept = reference[out_idx] if out_idx is not None else reference
    reference_kept = reference_kept[:, in_idx] if in_idx is not None else reference_kept
    reference_kept.backward(grad)
    assert torch.equal(weight.grad, reference.grad)


def test_gather_block_sparse_gradient():
    weight = _randn(6, 5, 3).requires_grad_()
    out_idx, in_idx = _idx([1, 4]), _idx([0, 3])
    gather_block(weight, out_idx, in_idx, True).sum().backward()
    assert weight.grad.is_sparse
    dense = torch.zeros(6, 5, 3, device=DEVICE)
    dense[out_idx[:, None], in_idx] = 1
    assert torch.equal(weight.grad.to_dense(), dense)


def test_ops_pass_opcheck():
    """Eager runs the kernels; the traced (fake) path runs the reference: they must agree."""
    weight, x, bias = _randn(9, 7), _randn(4, 3), _randn(9)
    out_idx, in_idx = _idx([0, 2, 8]), _idx([1, 4, 6])
    linear = torch.ops.sparsefx.compact_linear.default
    torch.library.opcheck(linear, (x, weight, bias, out_idx, in_idx, True), atol=1e-5, rtol=1e-5)
    blocks = torch.ops.sparsefx.gather_block.default
    torch.library.opcheck(blocks, (_randn(9, 7, 3), out_idx, in_idx))


def test_autotuning_keeps_only_tiles_that_fit_hopper_shared_memory():
    """The bounds come from building the kernels for sm_90 without a GPU (triton.compile to
    cubin): float32 tiles past 232448 bytes of shared memory failed to fit there."""
    configs = [
        triton.Config({"BLOCK_M": a, "BLOCK_J": b, "BLOCK_R": r}, num_stages=s, num_warps=w)
        for a, b, r, s, w in tk.TILES
    ]

    def kept(dtype: torch.dtype, weight=None, **flags) -> list[tuple[int, int, int, int]]:
        operands = (dtype, dtype, weight or dtype)  # A, gate, B
        named = {
            n: torch.empty(1, dtype=d) for n, d in zip(("a", "gate", "b"), operands, strict=True)
        }
        return [(*c.kwargs.values(), c.num_stages) for c in tk.prune_tiles(configs, named, **flags)]

    assert (128, 256, 64, 3) in kept(torch.bfloat16, GATE=True, PRECISION=None)
    # under autocast a float32 weight's tiles count twice a bfloat16 input's
    assert (128, 256, 64, 3) not in kept(torch.bfloat16, torch.float32, GATE=True, PRECISION=None)
    assert (128, 256, 64, 3) not in kept(torch.float32, GATE=False, PRECISION="tf32")
    assert (128, 128, 64, 3) not in kept(torch.float32, GATE=True, PRECISION="tf32")
    assert all(a * b <= 128 * 128 for a, b, _, _ in kept(torch.float32, PRECISION="ieee"))
    assert (32, 32, 32, 2) in kept(torch.float32, GATE=True, PRECISION="ieee")


def test_autotuning_caches_a_tile_per_launch_that_prune_tiles_tells_apart():
    """Triton's autotuner benchmarks only on a cache miss, and its key is the named
    arguments plus the tensors' dtypes. A ReLU-gated input gradient of a square layer has the
    forward's sizes and dtypes (the gate's placeholder is A): without GATE and PRECISION in
    the key it would reuse the forward's tile, which may not fit with a gate's second tile."""
    for kernel in (tk._gather_matmul_kernel, tk._weight_grad_kernel):
        assert {"GATE", "PRECISION"} <= set(kernel.keys), kernel.keys


# -- fused sampling ------------------------------------------------------------------------


def _groups(*sizes: int) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], device=DEVICE)


@pytest.mark.parametrize("exact", [False, True])
def test_sampler_compacts_every_group_and_returns_the_score_function(exact):
    offsets = _groups(1, 3, 40, 300, 17)
    s = torch.rand(361, device=DEVICE)
    s[1:4] = 0.0  # a group that samples nothing keeps its two most probable channels
    s[2] = 0.5
    s[3] = 0.25
    masks, indices, counts, psi = tk.sample_compact(s, offsets, 3, seed=2024, exact=exact, eps=1e-3)
    for k in range(3):
        for g in range(len(offsets) - 1):
            a, b = offsets[g].item(), offsets[g + 1].item()
            kept = indices[k, a : a + counts[k, g]]
            assert torch.equal(kept, masks[k, a:b].nonzero().squeeze(1)), (k, g)
            assert counts[k, g] >= min(2, b - a)
        assert masks[k, 2] and masks[k, 3]
    form = "exact" if exact else "paper"
    torch.testing.assert_close(psi, score_function(masks, s, form, 1e-3))


def test_sampler_is_reproducible_and_unbiased():
    offsets = _groups(200, 200)
    s = torch.linspace(0.05, 0.95, 400, device=DEVICE)
    samples = 32
    first = tk.sample_compact(s, offsets, samples, seed=7, exact=True, eps=1e-3)[0]
    again = tk.sample_compact(s, offsets, samples, seed=7, exact=True, eps=1e-3)[0]
    other = tk.sample_compact(s, offsets, samples, seed=8, exact=True, eps=1e-3)[0]
    assert torch.equal(first, again) and not torch.equal(first, other)
    # 32 x 400 Bernoulli draws: the mean of each decile of s within 4 standard errors
    frequency = first.float().mean(0).reshape(10, 40).mean(1)
    expected = s.reshape(10, 40).mean(1)
    stderr = (expected * (1 - expected) / (samples * 40)).sqrt()
    assert ((frequency - expected).abs() <= 4 * stderr).all()


@triton.jit
def _uniforms_kernel(out_ptr, seed, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.rand(seed, offs.to(tl.int64)), mask=offs < N)


def test_sampler_draws_the_eager_rule_from_its_uniforms():
    """The fused sampler's masks are u < s with its Philox uniforms u, topped up by the eager
    `keep_minimum`: short groups gain their most probable dropped channels up to two, no more."""
    sizes, samples, seed = (1, 2, 5, 9, 300), 64, 11
    offsets = _groups(*sizes)
    s = torch.rand(sum(sizes), generator=torch.Generator().manual_seed(0)) * 0.4
    s = s.to(DEVICE)
    u = torch.empty(samples * s.numel(), device=DEVICE)
    _uniforms_kernel[(triton.cdiv(u.numel(), 1024),)](u, seed, u.numel(), BLOCK=1024)
    expected = keep_minimum(u.view(samples, -1) < s, s, offsets.tolist())
    masks, _, counts, _ = tk.sample_compact(s, offsets, samples, seed=seed, exact=True, eps=1e-3)
    assert torch.equal(masks, expected)
    assert (counts[:, 2:4] == 2).any(), "no group was topped up"


def test_sampler_without_groups():
    masks, _, counts, _ = tk.sample_compact(
        torch.zeros(0, device=DEVICE), _groups(), 2, seed=0, exact=False, eps=1e-3
    )
    assert masks.shape == (2, 0) and counts.shape == (2, 0)


# -- projection ----------------------------------------------------------------------------


@settings(max_examples=15)
@given(
    n=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
    fraction=st.floats(0.01, 1.5),
    spread=st.floats(0.1, 3.0),
)
def test_projection_kernel_matches_the_exact_projection(n, seed, fraction, spread):
    generator = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, generator=generator, dtype=torch.float64) * spread + 0.4).to(DEVICE)
    c = (torch.rand(n, generator=generator, dtype=torch.float64) * 4 + 0.25).to(DEVICE)
    budget = fraction * c.sum().item() * 0.5
    expected = project_to_budget(z, c, budget)
    actual = tk.project_budget(z, c, budget)
    torch.testing.assert_close(actual, expected, atol=1e-9, rtol=0)
    assert (c @ actual).item() <= budget * (1 + 1e-12)


def test_projection_kernel_float32_and_inside_the_set():
    z = torch.tensor([0.2, 0.5, 0.9, -0.3, 1.7], device=DEVICE)
    c = torch.ones(5, device=DEVICE)
    assert torch.equal(tk.project_budget(z, c, 10.0), z.clamp(0, 1))
    torch.testing.assert_close(tk.project_budget(z, c, 2.0), project_to_budget(z, c, 2.0))
    # a budget computed on the device (0-d float64) is read there, not synced to the host
    budget = torch.tensor(2.0, dtype=torch.float64, device=DEVICE)
    assert torch.equal(tk.project_budget(z, c, budget), tk.project_budget(z, c, 2.0))
