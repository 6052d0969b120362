"""The compact custom ops: registration (opcheck), gradients against float64 finite
differences and against gather-then-dense references, exact zeros for dropped weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsefx.kernels import (
    block_index,
    compact_batch_norm,
    compact_conv,
    compact_linear,
    scatter_channels,
    update_running_stats,
)


def _idx(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _linear_args(in_idx, out_idx):
    x = torch.randn(
        3, 5 if in_idx is None else len(in_idx), dtype=torch.float64, requires_grad=True
    )
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    return x, w, b, in_idx, out_idx


INDEX_CASES = [(None, None), (_idx(0, 3), None), (None, _idx(1, 2, 5)), (_idx(4), _idx(0))]


@pytest.mark.parametrize(("in_idx", "out_idx"), INDEX_CASES)
def test_linear_opcheck_and_gradcheck(in_idx, out_idx):
    args = _linear_args(in_idx, out_idx)
    torch.library.opcheck(torch.ops.sparsefx.linear.default, args)
    assert torch.autograd.gradcheck(
        lambda x, w, b: compact_linear(x, w, b, in_idx, out_idx), args[:3]
    )


@pytest.mark.parametrize(("in_idx", "out_idx"), INDEX_CASES)
def test_conv_opcheck_and_gradcheck(in_idx, out_idx):
    x = torch.randn(
        2, 4 if in_idx is None else len(in_idx), 5, 5, dtype=torch.float64, requires_grad=True
    )
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    conv = ([2, 1], [1, 0], [1, 1])
    in_idx = None if in_idx is None else in_idx.clamp(max=3)
    torch.library.opcheck(torch.ops.sparsefx.conv.default, (x, w, b, in_idx, out_idx, *conv))
    fn = lambda x, w, b: compact_conv(x, w, b, in_idx, out_idx, *conv)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_conv_matches_gather_then_dense_and_scatters_zero_gradients():
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, requires_grad=True)
    in_idx, out_idx = _idx(1, 3), _idx(0, 4)
    y = compact_conv(x, w, None, in_idx, out_idx, [1, 1], [1, 1], [1, 1])
    w_ref = w.detach().clone().requires_grad_()
    y_ref = F.conv2d(x, w_ref[out_idx][:, in_idx], padding=1)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad)
    kept = torch.zeros_like(w, dtype=torch.bool)
    kept[out_idx[:, None], in_idx] = True
    assert torch.count_nonzero(w.grad[~kept]) == 0


def test_conv_with_no_input_channels_gives_bias():
    x = torch.randn(2, 0, 5, 5)
    w, b = torch.randn(3, 4, 3, 3), torch.randn(3)
    y = compact_conv(x, w, b, _idx(), None, [1, 1], [1, 1], [1, 1])
    assert y.shape == (2, 3, 5, 5)
    torch.testing.assert_close(y, b.view(1, 3, 1, 1).expand_as(y))


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_opcheck_and_gradcheck(training):
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    mean, var = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    idx = _idx(1, 4)
    args = (x, w, b, mean, var, idx, training, 1e-5)
    torch.library.opcheck(torch.ops.sparsefx.batch_norm.default, args)
    fn = lambda x, w, b: compact_batch_norm(x, w, b, mean, var, idx, training, 1e-5)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_running_stats_update_only_kept_channels_like_batch_norm():
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    mean, var = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    idx = _idx(0, 3)
    _, save_mean, save_invstd = compact_batch_norm(x, None, None, mean, var, idx, True, 1e-5)
    update_running_stats(x, mean, var, idx, save_mean, save_invstd, 0.1, 1e-5)
    ref_mean, ref_var = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    F.batch_norm(x, ref_mean, ref_var, training=True, momentum=0.1)
    torch.testing.assert_close(mean[idx], ref_mean)
    torch.testing.assert_close(var[idx], ref_var)
    untouched = _idx(1, 2, 4)
    assert torch.equal(mean[untouched], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(var[untouched], torch.ones(3, dtype=torch.float64))


def test_scatter_channels_and_block_index():
    x = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    idx = _idx(0, 2)
    torch.library.opcheck(torch.ops.sparsefx.scatter_channels.default, (x, idx, 1, 4))
    full = scatter_channels(x, idx, 1, 4)
    assert torch.equal(full[:, idx], x.detach()) and torch.count_nonzero(full[:, [1, 3]]) == 0
    assert torch.autograd.gradcheck(lambda t: scatter_channels(t, idx, 1, 4), (x,))
    assert block_index(_idx(0, 2), 3).tolist() == [0, 1, 2, 6, 7, 8]
    assert block_index(idx, 1) is idx
