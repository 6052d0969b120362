"""The compact custom ops: registration (opcheck), gradients (gradcheck in float64), exact
zeros for dropped weights, and equality with gather-then-dense references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from sparsefx.kernels import block_index, gather_weight, group_norm_direct, scatter_channels


def _idx(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


INDEX_CASES = [
    (_idx(0, 3), None),
    (None, _idx(1, 2, 3)),
    (_idx(4), _idx(0)),
    (_idx(0, 2, 5), _idx(1, 3)),
]


@pytest.mark.parametrize(("out_idx", "in_idx"), INDEX_CASES)
@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 3, 3)])
def test_gather_weight_opcheck_and_gradcheck(out_idx, in_idx, shape):
    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.sparsefx.gather_weight.default, (weight, out_idx, in_idx))
    assert torch.autograd.gradcheck(lambda w: gather_weight(w, out_idx, in_idx), (weight,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gathered_conv_matches_dense_and_dropped_weights_get_exact_zeros(dtype):
    x = torch.randn(2, 2, 6, 6, dtype=dtype)
    weight = torch.randn(5, 4, 3, 3, dtype=dtype, requires_grad=True)
    in_idx, out_idx = _idx(1, 3), _idx(0, 4)
    y = F.conv2d(x, gather_weight(weight, out_idx, in_idx), padding=1)
    reference = weight.detach().clone().requires_grad_()
    y_ref = F.conv2d(x, reference[out_idx][:, in_idx], padding=1)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(weight.grad, reference.grad)
    kept = torch.zeros_like(weight, dtype=torch.bool)
    kept[out_idx[:, None], in_idx] = True
    assert torch.count_nonzero(weight.grad[~kept]) == 0


def test_scatter_channels_opcheck_gradcheck_and_zeros():
    x = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    idx = _idx(0, 2)
    torch.library.opcheck(torch.ops.sparsefx.scatter_channels.default, (x, idx, 1, 4))
    full = scatter_channels(x, idx, 1, 4)
    assert torch.equal(full[:, idx], x.detach())
    assert torch.count_nonzero(full[:, [1, 3]]) == 0
    assert torch.autograd.gradcheck(lambda t: scatter_channels(t, idx, 1, 4), (x,))


def test_block_index_maps_channels_to_flattened_blocks():
    assert block_index(_idx(0, 2), 3).tolist() == [0, 1, 2, 6, 7, 8]
    idx = _idx(1)
    assert block_index(idx, 1) is idx


@pytest.mark.parametrize(("out_idx", "in_idx"), INDEX_CASES)
def test_sparse_gradient_equals_the_dense_one_and_holds_only_kept_rows(out_idx, in_idx):
    weight = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    grad_c = torch.randn_like(gather_weight(weight, out_idx, in_idx))
    (dense,) = torch.autograd.grad(gather_weight(weight, out_idx, in_idx), weight, grad_c)
    (sparse,) = torch.autograd.grad(gather_weight(weight, out_idx, in_idx, True), weight, grad_c)
    torch.testing.assert_close(sparse.to_dense(), dense, rtol=0, atol=0)
    if out_idx is not None:
        assert sparse.is_sparse and sparse.is_coalesced()
        assert sparse.indices().squeeze(0).tolist() == out_idx.tolist()
    torch.library.opcheck(torch.ops.sparsefx.gather_weight.default, (weight, out_idx, in_idx, True))


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "stride", "padding", "dilation", "groups"),
    [
        ((2, 3, 7, 7), (4, 3, 3, 3), [1, 1], [1, 1], [1, 1], 1),
        ((2, 4, 8, 6), (6, 2, 3, 2), [2, 1], [0, 1], [1, 2], 2),
        ((3, 2, 9), (5, 2, 3), [1], [2], [1], 1),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_opaque_conv_equals_aten_conv_with_its_gradients(
    x_shape, w_shape, stride, padding, dilation, groups, bias
):
    """sparsefx::conv (the torch.compile backend's conv) is aten.convolution, gradients too."""
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(w_shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(w_shape[0], dtype=torch.float64, requires_grad=True) if bias else None
    args = (x, weight, b, stride, padding, dilation, groups)
    torch.library.opcheck(torch.ops.sparsefx.conv.default, args)
    torch.autograd.gradcheck(lambda *t: torch.ops.sparsefx.conv(*t, *args[3:]), args[:3])
    transposed = (False, [0] * len(stride), groups)
    with FlopCounterMode(display=False) as aten_counter:
        expected = torch.ops.aten.convolution(x, weight, b, stride, padding, dilation, *transposed)
    with FlopCounterMode(display=False) as op_counter:
        torch.testing.assert_close(torch.ops.sparsefx.conv(*args), expected)
    assert op_counter.get_total_flops() == aten_counter.get_total_flops() > 0
    grad = torch.randn_like(expected)
    operands = (grad, x.detach(), weight.detach(), bias, stride, padding, dilation, groups)
    for mask in ([True, True, True], [False, True, False]):  # empties where not asked for
        backward_args = (*operands, 1, None, None, mask)
        torch.library.opcheck(torch.ops.sparsefx.conv_backward.default, backward_args)


@pytest.mark.parametrize(
    ("k_in", "k_out", "full_in", "full_out"), [(5, 13, 8, 16), (9, 3, 12, None)]
)
@pytest.mark.parametrize("spatial", [1, 2])
def test_bucketed_convolution_pads_counts_and_equals_the_exact_convolution(
    k_in, k_out, full_in, full_out, spatial
):
    """Rounded-up zero channels leave the output and every gradient exactly as they are,
    and the convolution aten runs has the rounded counts (capped at the dense ones)."""
    from sparsefx.kernels import bucketed_convolution

    g = torch.Generator().manual_seed(0)
    size = (5,) * spatial
    x = torch.randn(2, k_in, *size, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(k_out, k_in, *(3,) * spatial, dtype=torch.float64, generator=g)
    w.requires_grad_(True)
    b = torch.randn(k_out, dtype=torch.float64, generator=g, requires_grad=True)
    conv = F.conv1d if spatial == 1 else F.conv2d
    stride, padding = [2] * spatial, [1] * spatial
    with FlopCounterMode(display=False) as counter:
        y = bucketed_convolution(x, w, b, stride, padding, [1] * spatial, 8, full_in, full_out)
    expected = conv(x, w, b, stride=2, padding=1)
    torch.testing.assert_close(y, expected)
    grads = torch.autograd.grad(y.square().sum(), (x, w, b))
    wanted = torch.autograd.grad(expected.square().sum(), (x, w, b))
    for got, want in zip(grads, wanted, strict=True):
        torch.testing.assert_close(got, want)
    torch.library.opcheck(
        torch.ops.sparsefx.bucketed_convolution.default,
        (x, w, b, stride, padding, [1] * spatial, 8, full_in, full_out),
    )
    grad = torch.randn_like(expected)
    # fake shapes, empty gradients (left out, or no bias), no aliasing between outputs
    for has_bias, mask in ((True, [True] * 3), (True, [False, True, False]), (False, [True] * 3)):
        torch.library.opcheck(
            torch.ops.sparsefx.conv_backward.default,
            (grad, x.detach(), w.detach(), has_bias, stride, padding, [1] * spatial, 1, 8,
             full_in, full_out, mask),
        )  # fmt: skip
    run_in = min(-(-k_in // 8) * 8, full_in)
    run_out = k_out if full_out is None else min(-(-k_out // 8) * 8, full_out)
    positions = expected[0, 0].numel()
    assert counter.get_total_flops() == 2 * 2 * positions * run_in * run_out * 3**spatial
    # its backward op counts the gradients of the rounded convolution it runs
    padded_x = F.pad(x.detach(), (0, 0) * spatial + (0, run_in - k_in))
    padded_w = F.pad(w.detach(), (0, 0) * spatial + (0, run_in - k_in, 0, run_out - k_out))
    padded_grad = F.pad(grad, (0, 0) * spatial + (0, run_out - k_out))
    for mask in ([True, True, False], [False, True, False]):
        with FlopCounterMode(display=False) as op_counter:
            torch.ops.sparsefx.conv_backward(
                grad, x.detach(), w.detach(), True, stride, padding, [1] * spatial, 1, 8,
                full_in, full_out, mask,
            )  # fmt: skip
        with FlopCounterMode(display=False) as aten_counter:
            torch.ops.aten.convolution_backward(
                padded_grad, padded_x, padded_w, None, stride, padding, [1] * spatial, False,
                [0] * spatial, 1, mask,
            )  # fmt: skip
        assert op_counter.get_total_flops() == aten_counter.get_total_flops() > 0


def test_single_output_pixel_convolutions_are_not_rounded():
    """A convolution with one output pixel runs as GEMMs, which cache no oneDNN primitive:
    the bucketed ops (and the fused gather's) run its exact counts, unpadded, on the window."""
    from sparsefx.kernels.compact import gathered_bucketed_convolution_direct

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(13, 5, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    options = ([2, 2], [1, 1], [1, 1])  # one output pixel reading taps 1..2 of each dim
    exact_flops = 2 * 2 * 13 * 5 * 2 * 2
    with FlopCounterMode(display=False) as counter:
        y = torch.ops.sparsefx.bucketed_convolution(x, w, None, *options, 8, 8, 16)
    assert counter.get_total_flops() == exact_flops
    torch.testing.assert_close(y, F.conv2d(x, w, None, 2, 1))
    grad = torch.randn_like(y)
    with FlopCounterMode(display=False) as counter:
        torch.ops.sparsefx.conv_backward(
            grad, x.detach(), w.detach(), False, *options, 1, 8, 8, 16, [True, True, False]
        )
    assert counter.get_total_flops() == 2 * exact_flops
    full = torch.randn(16, 8, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    out_idx, in_idx = torch.arange(13), torch.arange(5)
    with _AtenCalls() as calls:
        y = gathered_bucketed_convolution_direct(
            x, full, out_idx, in_idx, False, None, *options, 8, 8, 16
        )
        y.backward(grad)
    assert not calls.seen & {torch.ops.aten.constant_pad_nd.default, torch.ops.aten.cat.default}
    torch.testing.assert_close(y, F.conv2d(x, full[:13, :5], None, 2, 1))


def _direct_call_cases():
    """(op, its arguments) of each compact op an eager program calls directly."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=g)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=g)
    conv_weight = torch.randn(5, 3, 3, 3, dtype=torch.float64, generator=g)
    bias = torch.randn(5, dtype=torch.float64, generator=g)
    ops = torch.ops.sparsefx
    return [
        (ops.gather_weight.default, (weight, _idx(0, 2, 5), _idx(1, 3), False)),
        (ops.gather_weight.default, (weight, _idx(1, 4), None, True)),
        (ops.scatter_channels.default, (x, _idx(0, 2, 4), 1, 6)),
        (ops.bucketed_convolution.default, (x, conv_weight, bias, [1, 1], [1, 1], [1, 1], 8, 8, 16)),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(4))
def test_direct_calls_equal_their_ops_with_gradients(case):
    """What eager programs call instead of the ops (kernels.compact.DIRECT_CALLS) computes
    the same values and gradients, bitwise, with and without autograd."""
    from sparsefx.kernels.compact import DIRECT_CALLS

    op, args = _direct_call_cases()[case]
    function, body = DIRECT_CALLS[op]
    tensors = [
        i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()
    ]

    def call_on(call, *leaves):
        """`call` with the floating-point tensors of `args` replaced by `leaves`."""
        inputs = list(args)
        for i, leaf in zip(tensors, leaves, strict=True):
            inputs[i] = leaf
        return call(*inputs)

    def run(call):
        leaves = [args[i].clone().requires_grad_() for i in tensors]
        out = call_on(call, *leaves)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        return out.detach(), [g.to_dense() for g in grads]

    expected, expected_grads = run(op)
    got, got_grads = run(function)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(body(*args), expected, rtol=0, atol=0)
    sparse_grad = op is torch.ops.sparsefx.gather_weight.default and args[3]
    if not sparse_grad:  # gradcheck compares dense Jacobians only
        leaves = tuple(args[i].clone().requires_grad_() for i in tensors)
        assert torch.autograd.gradcheck(lambda *t: call_on(function, *t), leaves)
        assert torch.autograd.gradgradcheck(lambda *t: call_on(function, *t), leaves)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "stride"),
    [
        ((1, 2, 3, 3), (5, 3, 2, 2), 1),
        ((3, 2, 1, 1), (5, 3, 3, 3), 1),
        ((3, 2, 2, 2), (5, 3, 3, 3), 2),
    ],
)
def test_gathered_bucketed_convolution_has_exact_first_and_second_derivatives(
    x_shape, w_shape, stride
):
    """The fused gather + rounded convolution saves its padded weight copy for backward; a
    backward with create_graph (a gradient penalty) differentiated that detached copy, and
    the weight's second-order gradient came out wrong by ~2% under sampled masks. Also where
    the output is one pixel, read through one tap or a 2×2 window, which run as GEMMs."""
    from sparsefx.kernels.compact import gathered_bucketed_convolution_direct

    g = torch.Generator().manual_seed(2)
    x = torch.randn(x_shape, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(w_shape, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    out_idx, in_idx = _idx(0, 2, 4), _idx(0, 2)

    def conv(x, weight, bias):
        return gathered_bucketed_convolution_direct(
            x, weight, out_idx, in_idx, False, bias, [stride] * 2, [1, 1], [1, 1], 8, 3, 5
        )

    def reference(x, weight, bias):
        return F.conv2d(x, weight[out_idx][:, in_idx], bias, stride=stride, padding=1)

    leaves = (x, weight, bias)
    torch.testing.assert_close(conv(*leaves), reference(*leaves))
    assert torch.autograd.gradcheck(conv, leaves)
    assert torch.autograd.gradgradcheck(conv, leaves)


@pytest.mark.parametrize("sparse_gradients", [False, True])
def test_eager_steps_call_no_custom_op_and_match_the_op_graphs(sparse_gradients):
    """A transformed model's training step and score forward dispatch no sparsefx op (they
    call the bodies directly, a gather and its bucketed convolution as one node), and its
    graph gives the loss and gradients of the graph with the ops (the one
    `sparsefx.explain` and the diff tool show), bitwise."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import sparsefx
    from sparsefx.kernels import compact
    from sparsefx.kernels.pooling import max_pool2d_direct

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.namespace)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.MaxPool2d(3, 2, 1), torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 4),
    )  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    config = sparsefx.SparseConfig(
        density=0.5, seed=0, conv_channel_multiple=8, sparse_gradients=sparse_gradients
    )
    sparse = sparsefx.transform(model, (x,), config=config)
    criterion = sparsefx.wrap_loss(sparse, lambda out: out.square().mean())
    with Ops() as seen:
        criterion(sparse(x)).backward()
    assert "aten" in seen.names and "sparsefx" not in seen.names

    program, (record,) = sparse._programs[sparse._modes()][0], sparse.runtime.graphs
    fused = torch.ops.sparsefx.gather_weight.default, compact.gathered_bucketed_convolution_direct
    assert [sum(n.target is t for n in program.graph.graph.nodes) for t in fused] == [0, 2]
    assert any(n.target is max_pool2d_direct for n in program.graph.graph.nodes)
    assert any(n.target is max_pool2d_direct for n in program.score.graph.nodes)
    assert any(
        n.target is torch.ops.sparsefx.bucketed_convolution.default
        for n in record.compact.graph.nodes
    )
    indices = sparse.structure.indices(sparse.structure.sample(1)[0])
    results = []
    for graph in (program.graph, record.compact):
        model.zero_grad()
        (out,) = graph(*program.arguments(model, [x], indices))
        out.square().mean().backward()
        results.append([out.detach(), *(p.grad.to_dense() for p in model.parameters())])
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_gathered_bucketed_convolution_differentiates_its_autocast_twice():
    """Under autocast the input was cast inside the autograd.Function, so a penalty on the
    weight's gradient had no derivative path to the input through it (~half its size)."""
    from sparsefx.kernels.compact import gathered_bucketed_convolution_direct

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 6, generator=g)
    weight = torch.randn(5, 4, 3, 3, generator=g, requires_grad=True)
    out_idx, in_idx = _idx(0, 2, 4), _idx(0, 1, 3)

    def penalty_gradient(conv):
        leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(leaf)
        (grad,) = torch.autograd.grad(out.float().square().sum(), weight, create_graph=True)
        return torch.autograd.grad(grad.square().sum(), leaf)[0]

    got = penalty_gradient(
        lambda t: gathered_bucketed_convolution_direct(
            t, weight, out_idx, in_idx, False, None, [1, 1], [1, 1], [1, 1], 8, 4, 5
        )
    )
    expected = penalty_gradient(lambda t: F.conv2d(t, weight[out_idx][:, in_idx], padding=1))
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-1)


class _PoolLayouts(TorchDispatchMode):
    """Whether each max_pool2d_with_indices it sees pools a channels-last (not also
    contiguous) input."""

    def __init__(self):
        super().__init__()
        self.channels_last: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.max_pool2d_with_indices.default:
            x = args[0]
            self.channels_last.append(
                x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            )
        return func(*args, **(kwargs or {}))


def _pooling_inputs() -> list[torch.Tensor]:
    """NCHW inputs for max pooling: plain, ties (a ReLU's zeros and repeated integers),
    NaN and -inf; a single channel and a 1x1 map are contiguous in both layouts."""
    g = torch.Generator().manual_seed(4)
    plain = torch.randn(2, 5, 7, 7, dtype=torch.float64, generator=g)
    ties = torch.randint(-1, 2, (2, 5, 7, 7), generator=g).double().relu()
    special = plain.clone()
    special[0, 1, 2, 2], special[1, 3, 0, 0], special[1, 4, 5, 6] = math.nan, -math.inf, math.inf
    return [plain, ties, special, plain[:, :1].contiguous(), plain[:, :, :1, :1].contiguous()]


_POOLINGS = [((3, 3), (2, 2), (1, 1), (1, 1), False), ((2, 3), (1, 2), (0, 1), (2, 1), True)]


@pytest.mark.parametrize(
    ("case", "options"),
    [(case, options) for case in range(5) for options in _POOLINGS[: 1 if case == 4 else 2]],
)  # a 1x1 map takes only the first pooling
def test_channels_last_max_pool_equals_atens_bitwise(case, options):
    """kernels.pooling pools a CPU NCHW tensor channels-last (ATen's NCHW CPU kernel is
    scalar): the same values, NCHW layout and input gradient as aten.max_pool2d, bitwise,
    including on tied windows (which maximum gets the gradient) and NaN."""
    from sparsefx.kernels.pooling import max_pool2d_direct

    x = _pooling_inputs()[case]
    outs, grads = [], []
    for pool in (torch.ops.aten.max_pool2d.default, max_pool2d_direct):
        leaf = x.clone().requires_grad_()
        with _PoolLayouts() as layouts:
            out = pool(leaf, *options)
        if pool is max_pool2d_direct:  # channels-last where that is another layout
            assert layouts.channels_last == [case < 3]
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out))
        outs.append(out.detach())
        grads.append(leaf.grad)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    assert outs[1].stride() == outs[0].stride() and grads[1].stride() == grads[0].stride()
    with torch.no_grad(), _PoolLayouts() as layouts:  # the score forwards' path
        out = max_pool2d_direct(x.clone().requires_grad_(), *options)
    assert layouts.channels_last == [case < 3]
    torch.testing.assert_close(out, outs[0], rtol=0, atol=0, equal_nan=True)
    if case == 0:
        leaf = x.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda t: max_pool2d_direct(t, *options), (leaf,))
        assert torch.autograd.gradgradcheck(lambda t: max_pool2d_direct(t, *options), (leaf,))


def test_channels_last_max_pool_leaves_other_layouts_to_aten():
    """A channels-last input keeps its layout (ATen pools it fast already); an unbatched
    3-D one goes to ATen too."""
    from sparsefx.kernels.pooling import max_pool2d_direct

    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    out = max_pool2d_direct(x, (2, 2), (2, 2), (0, 0), (1, 1), False)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    unbatched = torch.randn(4, 6, 6)
    torch.testing.assert_close(
        max_pool2d_direct(unbatched, (2, 2), (2, 2), (0, 0), (1, 1), False),
        F.max_pool2d(unbatched, 2),
        rtol=0,
        atol=0,
    )


# fmt: off
SINGLE_PIXEL_CASES = [
    # x shape, weight shape, stride, padding, dilation, the (input, tap) ranges read per
    # spatial dim as (start, stop, step) (None: aten's convolution)
    ((2, 5, 1, 1), (4, 5, 3, 3), [1, 1], [1, 1], [1, 1], [((0, 1, 1), (1, 2, 1))] * 2),
    ((2, 5, 1, 1), (4, 5, 3, 3), [2, 2], [1, 1], [1, 1], [((0, 1, 1), (1, 2, 1))] * 2),
    ((2, 5, 1, 1), (4, 5, 5, 5), [1, 1], [4, 4], [2, 2], [((0, 1, 2), (2, 3, 1))] * 2),
    ((2, 5, 1, 1), (4, 5, 1, 3), [1, 1], [0, 1], [1, 1], [((0, 1, 1), (0, 1, 1)), ((0, 1, 1), (1, 2, 1))]),
    ((2, 5, 1), (4, 5, 3), [1], [1], [1], [((0, 1, 1), (1, 2, 1))]),
    ((2, 5, 1, 1, 1), (4, 5, 3, 3, 3), [1, 1, 1], [1, 1, 1], [1, 1, 1], [((0, 1, 1), (1, 2, 1))] * 3),
    # one output pixel from several input pixels: HF ResNet's stride-2 entry to 1×1 maps
    ((2, 5, 2, 2), (4, 5, 3, 3), [2, 2], [1, 1], [1, 1], [((0, 2, 1), (1, 3, 1))] * 2),
    ((2, 5, 2, 2), (4, 5, 1, 1), [2, 2], [0, 0], [1, 1], [((0, 1, 1), (0, 1, 1))] * 2),
    ((2, 5, 3, 3), (4, 5, 3, 3), [1, 1], [0, 0], [1, 1], [((0, 3, 1), (0, 3, 1))] * 2),
    ((2, 5, 3, 3), (4, 5, 2, 2), [1, 1], [0, 0], [2, 2], [((0, 3, 2), (0, 2, 1))] * 2),
    ((2, 5, 4, 3), (4, 5, 3, 3), [4, 3], [1, 1], [1, 1], [((0, 2, 1), (1, 3, 1))] * 2),
    ((2, 5, 2, 2), (4, 5, 3, 3), [1, 1], [1, 1], [1, 1], None),  # several output pixels
    ((2, 5, 1, 1), (4, 5, 2, 2), [1, 1], [1, 1], [2, 2], None),  # every tap on padding
]
# fmt: on


@pytest.mark.parametrize("case", range(len(SINGLE_PIXEL_CASES)))
def test_single_output_pixel_convolutions_run_as_gemms_on_their_window(case):
    """A convolution whose output is a single pixel reads one window of the input with the
    kernel taps that do not fall on padding: the compact convolutions run it as GEMMs on that
    window (oneDNN convolves over the padding), with aten's values and gradients (zero for the
    input pixels and taps outside the window), and FlopCounterMode counts the GEMM."""
    from sparsefx.kernels.compact import (
        _convolution,
        _convolution_backward,
        _single_output_window,
    )

    x_shape, w_shape, stride, padding, dilation, ranges = SINGLE_PIXEL_CASES[case]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(x_shape, dtype=torch.float64, generator=g)
    weight = torch.randn(w_shape, dtype=torch.float64, generator=g)
    bias = torch.randn(w_shape[0], dtype=torch.float64, generator=g)
    window = _single_output_window(x.shape, weight.shape, stride, padding, dilation, 1)
    if ranges is None:
        assert window is None
    else:
        read = [[(s.start, s.stop, s.step or 1) for s in side] for side in window]
        assert read == [[r[side] for r in ranges] for side in (0, 1)]
    options = (stride, padding, dilation, False, [0] * len(stride), 1)
    expected = torch.ops.aten.convolution(x, weight, bias, *options)
    got = _convolution(x, weight, bias, stride, padding, dilation, 1)
    torch.testing.assert_close(got, expected)
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=g)
    for mask in ([True, True, True], [False, True, False], [True, False, True]):
        expected_grads = torch.ops.aten.convolution_backward(
            grad, x, weight, [w_shape[0]], stride, padding, dilation, False,
            [0] * len(stride), 1, mask,
        )  # fmt: skip
        got_grads = _convolution_backward(grad, x, weight, (True, *options[:3], 1), mask)
        for g_got, g_expected in zip(got_grads, expected_grads, strict=True):
            assert (g_got is None) == (g_expected is None)
            if g_got is not None:
                torch.testing.assert_close(g_got, g_expected)
    with FlopCounterMode(display=False) as counter:
        torch.ops.sparsefx.conv(x, weight, bias, stride, padding, dilation, 1)
    taps = (
        math.prod(w_shape[2:]) if ranges is None else math.prod(len(range(*r[1])) for r in ranges)
    )
    positions = math.prod(expected.shape[2:])
    assert counter.get_total_flops() == 2 * x_shape[0] * positions * 5 * 4 * taps


@pytest.mark.parametrize("case", range(len(SINGLE_PIXEL_CASES) + 2))
def test_eager_programs_aten_convolutions_take_the_one_output_pixel_gemm(case):
    """`convolution_direct`, what eager programs call for aten.conv{1,2,3}d (exact-count
    compact convolutions after freeze, dense ones): the aten op's values and autograd
    gradients; unbatched and grouped convolutions are the aten op itself."""
    from sparsefx.kernels.compact import ATEN_CONVOLUTIONS, convolution_direct

    ranges = None
    if case < len(SINGLE_PIXEL_CASES):
        x_shape, w_shape, stride, padding, dilation, ranges = SINGLE_PIXEL_CASES[case]
        groups = 1
    elif case == len(SINGLE_PIXEL_CASES):  # unbatched
        x_shape, w_shape, stride, padding, dilation, groups = (
            (5, 1, 1),
            (4, 5, 3, 3),
            [1, 1],
            [1, 1],
            [1, 1],
            1,
        )
    else:  # grouped
        x_shape, w_shape, stride, padding, dilation, groups = (
            (2, 4, 1, 1), (4, 2, 3, 3), [1, 1], [1, 1], [1, 1], 2,
        )  # fmt: skip
    g = torch.Generator().manual_seed(7)
    leaves = [
        torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
        for shape in (x_shape, w_shape, w_shape[:1])
    ]
    results = []
    for conv in (ATEN_CONVOLUTIONS[len(w_shape)], convolution_direct):
        with _AtenCalls() as calls:
            out = conv(*leaves, stride, padding, dilation, groups)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        results.append([out, *grads])
    # GEMMs where there is one output pixel, aten's convolution otherwise
    assert (torch.ops.aten.convolution.default in calls.seen) == (ranges is None)
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected)


class _AtenCalls(TorchDispatchMode):
    """The aten overloads dispatched inside it (`seen`)."""

    def __init__(self):
        super().__init__()
        self.seen: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("batch", "size", "conv_channel_multiple"), [(2, 1, 8), (1, 4, 8), (2, 4, 8), (2, 1, 1)]
)
def test_inplace_activations_follow_compact_convolutions(batch, size, conv_channel_multiple):
    """A compact convolution's output takes an in-place op (ReLU(inplace=True)): outputs
    that were views (a single pixel's GEMM, a batch of one cut back from rounded counts,
    rounded input counts alone) made autograd refuse it."""
    import sparsefx

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(inplace=True),
        torch.nn.Flatten(), torch.nn.Linear(16 * size * size, 4),
    )  # fmt: skip
    x = torch.randn(batch, 3, size, size)
    config = sparsefx.SparseConfig(density=0.5, seed=0, conv_channel_multiple=conv_channel_multiple)
    sparse = sparsefx.transform(model, (x,), config=config)
    criterion = sparsefx.wrap_loss(sparse, lambda out: out.square().mean())
    for _ in range(2):
        criterion(sparse(x)).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_single_pixel_gemms_follow_aten_under_autocast_and_on_bad_arguments():
    """The GEMMs stand in for aten.convolution(_backward), which autocast leaves alone: a
    backward run inside an autocast region keeps float32 gradients (and the op's fake
    kernel's dtypes); conv2d's one-element lists are expanded as aten does; invalid
    arguments get aten's errors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sparsefx.kernels.compact import _convolution, convolution_direct

    g = torch.Generator().manual_seed(8)
    grad, x, w = (torch.randn(s, generator=g) for s in ((2, 4, 1, 1), (2, 5, 1, 1), (4, 5, 3, 3)))
    args = (True, [1, 1], [1, 1], [1, 1], 1, 1, None, None, [True, True, True])
    expected = torch.ops.aten.convolution_backward(
        grad, x, w, [4], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, True]
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.ops.sparsefx.conv_backward(grad, x, w, *args)
        with FakeTensorMode() as mode:
            fake = torch.ops.sparsefx.conv_backward(
                *(mode.from_tensor(t) for t in (grad, x, w)), *args
            )
    assert [t.dtype for t in got] == [t.dtype for t in fake] == [torch.float32] * 3
    for t_got, t_expected in zip(got, expected, strict=True):
        torch.testing.assert_close(t_got, t_expected)

    b = torch.randn(4, generator=g)
    torch.testing.assert_close(
        convolution_direct(x, w, b, [2], [1], [1], 1), F.conv2d(x, w, b, 2, 1)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct, aten = convolution_direct(x, w, b, [1], [1], [1], 1), F.conv2d(x, w, b, 1, 1)
    assert direct.dtype == aten.dtype == torch.bfloat16
    torch.testing.assert_close(direct, aten)
    with pytest.raises(RuntimeError, match="stride"):
        convolution_direct(x, w, b, [0, 0], [1, 1], [1, 1], 1)
    # a window cached for int options is not reused for float ones, which aten refuses
    convolution_direct(x, w, b, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises((RuntimeError, TypeError)):
        _convolution(x, w, b, [1, 1], [1.0, 1.0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="bias"):  # no broadcast of a one-element bias
        _convolution(x, w, b[:1], [1, 1], [1, 1], [1, 1], 1)
    meta = [t.to("meta") for t in (torch.randn(2, 5, 2, 2), w, b)]  # autocast has no meta
    assert _convolution(*meta, [2, 2], [1, 1], [1, 1], 1).shape == (2, 4, 1, 1)


_GROUP_NORM_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _GROUP_NORM_DEVICES)
@pytest.mark.parametrize("per_group", [1, 3])
def test_group_norm_op_equals_aten_group_norm_traced_and_eager(per_group, device):
    """``sparsefx::group_norm`` takes the channels per group: called as an op it runs the
    instance-norm form that torch.compile and torch.export trace, and eager programs call
    `group_norm_direct`. Both equal ``aten.group_norm`` (values and gradients), under
    autocast too, in its dtype (float32 on CUDA, the input's on CPU)."""
    torch.manual_seed(0)
    x = torch.randn(4, 12, 5, 3, dtype=torch.float64, device=device, requires_grad=True)
    weight, bias = (torch.randn(12, dtype=torch.float64, device=device) for _ in range(2))
    weight.requires_grad_()
    bias.requires_grad_()
    inputs = (x, weight, bias)
    op = torch.ops.sparsefx.group_norm

    def native() -> torch.Tensor:
        return F.group_norm(x, 12 // per_group, weight, bias, 1e-5)

    def traced() -> torch.Tensor:
        return op(x, per_group, weight, bias, 1e-5, False)

    def eager() -> torch.Tensor:
        return group_norm_direct(x, per_group, weight, bias, 1e-5, False)

    expected = native()
    grads = torch.autograd.grad(expected.sin().sum(), inputs)
    for form in (traced, eager):
        out = form()
        torch.testing.assert_close(out, expected)
        for got, want in zip(torch.autograd.grad(out.sin().sum(), inputs), grads, strict=True):
            torch.testing.assert_close(got, want)

    low = torch.bfloat16 if device == "cpu" else torch.float16
    x, weight, bias = x.detach().to(low), weight.detach().float(), bias.detach().float()
    with torch.autocast(device, dtype=low):
        expected = native()
        for form in (traced, eager):
            out = form()
            assert out.dtype == expected.dtype, form.__name__
            torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
