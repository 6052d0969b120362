"""What sparsefx knows about aten ops, matched on overloads (never on names or modules).

Three roles matter for channel sparsity:

* producers/consumers: linear and convolution with a parameter weight. A producer's output
  channels can be pruned; a consumer gathers the input columns of its weight instead of
  reading a full-width activation. An embedding is a producer only: a lookup of its
  weight's rows, whose columns are its output channels.
* channel-wise ops: they act on each channel independently, so they run unchanged on a
  compact tensor that holds only the kept channels.
* zero-preserving ops: channel-wise with f(0) = 0, so they may also sit *after* a mask point
  (a zero channel stays zero, and skipping it is exact).

Joins (element-wise binary ops of two compact tensors, concat), shape ops that keep channels
(views that flatten or unflatten, permutes) and norms across features are classified here
too; analysis/dependency.py says what each does to a layout.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch._ops import OpOverload

from sparsefx import autograd_functions

aten = torch.ops.aten

LINEAR: frozenset[OpOverload] = frozenset({aten.linear.default})
ADDMM: frozenset[OpOverload] = frozenset({aten.addmm.default})
"""bias + x @ W with W shaped [in, out]: GPT-2's Conv1D (DESIGN §6)."""
CONVS: frozenset[OpOverload] = frozenset(
    {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
)
EMBEDDING: frozenset[OpOverload] = frozenset({aten.embedding.default})
"""embedding(W, tokens) = one_hot(tokens) @ W with W shaped [vocab, dim]: no FLOPs, and no
input channels (tokens are indices)."""
CHANNEL_NORMS: frozenset[OpOverload] = frozenset(
    {aten.batch_norm.default, aten.instance_norm.default}
)
"""Norms with statistics and affine parameters per channel (dim 1), and one signature:
``(input, weight, bias, running_mean, running_var, training or use_input_stats, momentum,
eps, cudnn_enabled)``. Given running statistics and normalising with the batch's, they update
those in place."""

POOLS: dict[OpOverload, int] = {
    aten.max_pool1d.default: 1,
    aten.max_pool2d.default: 2,
    aten.max_pool3d.default: 3,
    aten.avg_pool1d.default: 1,
    aten.avg_pool2d.default: 2,
    aten.avg_pool3d.default: 3,
    aten.adaptive_avg_pool1d.default: 1,
    aten.adaptive_avg_pool2d.default: 2,
    aten.adaptive_avg_pool3d.default: 3,
}
"""Pooling ops (single-output overloads) and how many trailing dims they pool; all f(0) = 0."""

ZERO_PRESERVING_UNARY: frozenset[OpOverload] = frozenset(
    {
        aten.relu.default,
        aten.relu_.default,
        aten.gelu.default,
        aten.gelu_.default,
        aten.silu.default,
        aten.silu_.default,
        aten.leaky_relu.default,
        aten.leaky_relu_.default,
        aten.tanh.default,
        aten.tanh_.default,
        aten.neg.default,  # RoPE's rotate_half: cat(-x2, x1)
        aten.neg_.default,
        aten.square.default,  # relu² MLPs (Nemotron, Arcee)
        aten.abs.default,
        aten.hardtanh.default,
        aten.hardtanh_.default,
        aten.relu6.default,
        aten.hardswish.default,
        aten.hardswish_.default,
        aten.mish.default,
        aten.elu.default,
        aten.selu.default,
        aten.erf.default,  # GELU written out: ESM's x * 0.5 * (1 + erf(x / sqrt(2)))
        aten.erfinv.default,
        aten.sin.default,
        aten.sinh.default,
        aten.asinh.default,
        aten.tan.default,
        aten.atan.default,
        aten.atanh.default,
        aten.expm1.default,
        aten.log1p.default,
        aten.sign.default,
        aten.sgn.default,
        aten.dropout.default,
        aten.feature_dropout.default,
        aten.clone.default,
        aten.contiguous.default,
        aten.alias.default,
        aten.to.dtype,
        aten.to.device,
        aten.to.dtype_layout,
        aten.to.other,
        aten._to_copy.default,
    }
)
"""Channel-wise and f(0) = 0, with the tensor as the first argument (a cast included)."""

OTHER_CHANNELWISE_UNARY: frozenset[OpOverload] = frozenset(
    {
        aten.sigmoid.default,
        aten.sigmoid_.default,
        aten.hardsigmoid.default,
        aten.softplus.default,
        aten.exp.default,
        aten.cos.default,
        aten.cosh.default,
        aten.erfc.default,
        aten.rsqrt.default,  # RMSNorm's rsqrt(mean(x^2) + eps), per head in Qwen3's q/k norms
        aten.clamp_min.default,  # F.normalize's norm clamped to eps
        aten.alpha_dropout.default,  # a dropped element becomes a negative saturation value
    }
)
"""Channel-wise but f(0) != 0: past a mask point, their output in dropped channels is
tracked as non-zero (it must not reach an op that needs zeros there)."""

TYPE_AS: frozenset[OpOverload] = frozenset({aten.type_as.default})
"""A cast to another tensor's dtype (Gemma's norms): channel-wise in its first argument; the
second one is read for its dtype only."""

AUTOGRAD_FUNCTION: OpOverload = autograd_functions.autograd_function._opoverload
"""A custom autograd.Function whose backward is not its forward's gradient, run whole so
that its backward runs (capture): it reads its inputs at full width."""

IN_PLACE_DROPOUT: dict[OpOverload, OpOverload] = {
    aten.dropout_.default: aten.dropout.default,
    aten.feature_dropout_.default: aten.feature_dropout.default,
    aten.alpha_dropout_.default: aten.alpha_dropout.default,
}
"""In-place dropout and its out-of-place op, which capture puts in its place unless a tensor
sharing its storage is read after it: then the mutation must reach that tensor, so what it
aliases stays dense."""

BINARY: frozenset[OpOverload] = frozenset(
    {
        aten.add.Tensor,
        aten.add_.Tensor,
        aten.add.Scalar,
        aten.sub.Tensor,
        aten.sub_.Tensor,
        aten.sub.Scalar,
        aten.mul.Tensor,
        aten.mul_.Tensor,
        aten.mul.Scalar,
        aten.div.Tensor,
        aten.div_.Tensor,
        aten.div.Scalar,
    }
)
"""Element-wise binary ops: joins of two compact tensors (residual add, gating mul), or
channel-wise with a scalar or a tensor broadcast over the channel dim."""

MUL: frozenset[OpOverload] = frozenset({aten.mul.Tensor, aten.mul_.Tensor, aten.mul.Scalar})
DIV: frozenset[OpOverload] = frozenset({aten.div.Tensor, aten.div_.Tensor, aten.div.Scalar})
CAT: frozenset[OpOverload] = frozenset({aten.cat.default, aten.stack.default})
"""Concatenation along a dim, or along a new one (stack: interleaved rotary embeddings)."""
PADS: frozenset[OpOverload] = frozenset({aten.pad.default, aten.constant_pad_nd.default})
"""Padding: channel-wise where it pads other dims than the channel dim."""
UNSUPPORTED_WEIGHT_OPS: frozenset[OpOverload] = frozenset(
    {
        aten.conv_transpose1d.default,
        aten.conv_transpose2d.input,
        aten.conv_transpose3d.input,
        aten.bilinear.default,
        aten.conv1d.padding,  # padding="same" with an even kernel (capture.explicit_conv_padding)
        aten.conv2d.padding,
        aten.conv3d.padding,
    }
)
"""Layers with a weight that sparsefx does not prune: listed in the dense report as such
(their inputs, if compact, are scattered to full width like any unsupported op's)."""

NORMS: frozenset[OpOverload] = frozenset(
    {
        aten.layer_norm.default,
        aten.native_layer_norm.default,
        aten.rms_norm.default,
        aten.group_norm.default,
    }
)
"""Normalise across features: every feature they read matters, so none of it is pruned."""

VIEWS: frozenset[OpOverload] = frozenset(
    {
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.flatten.using_ints,
        aten.unflatten.int,
    }
)
UNSQUEEZES: frozenset[OpOverload] = frozenset({aten.unsqueeze.default})
SQUEEZES: frozenset[OpOverload] = frozenset(
    {aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims}
)
"""Squeezes; ``squeeze()`` is rewritten to name the dims it removes in the dense graph (a
kept count of one would otherwise lose the channel dim)."""
EXPANDS: frozenset[OpOverload] = frozenset({aten.expand.default})
"""Broadcasts of other dims than the channel dim: channel-wise (grouped-query attention's
``repeat_kv`` is unsqueeze, expand, reshape)."""
PERMUTES: frozenset[OpOverload] = frozenset(
    {aten.permute.default, aten.transpose.int, aten.t.default}
)
SPLITS: frozenset[OpOverload] = frozenset(
    {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
)
SELECTS: frozenset[OpOverload] = frozenset({aten.select.int, aten.unbind.int})
"""One index of a dim (``x[:, i]``), or every index as separate tensors (``unbind``, a fused
qkv's q, k and v): channel-wise along other dims."""
SLICES: frozenset[OpOverload] = frozenset({aten.slice.Tensor, aten.narrow.default})
"""A contiguous range of one dim (``x[:, a:b]``, ``narrow``): channel-wise along other dims."""
WHERE: frozenset[OpOverload] = frozenset(
    {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf}
)
"""``where(cond, x, y)``: channel-wise where the condition and the other value broadcast
over the channel dim."""
MASKED_FILL: frozenset[OpOverload] = frozenset({aten.masked_fill.Scalar, aten.masked_fill.Tensor})
"""``x.masked_fill(mask, value)``, which is ``where(mask, value, x)``."""
SOFTMAX: frozenset[OpOverload] = frozenset(
    {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default}
)
"""Softmax or log-softmax over one dim: channel-wise (not zero-preserving) unless it is the
channel dim, which it normalises across like a LayerNorm (a dropped channel's exp(0) stays
in every kept channel's denominator), so what it reads there stays dense."""
ATTENTION: frozenset[OpOverload] = frozenset({aten.scaled_dot_product_attention.default})
MATMUL: frozenset[OpOverload] = frozenset({aten.matmul.default})
POW: frozenset[OpOverload] = frozenset({aten.pow.Tensor_Scalar})
REDUCTIONS: dict[OpOverload, int] = {
    aten.mean.dim: 1,
    aten.sum.dim_IntList: 1,
    aten.amax.default: 1,
    aten.max.dim: 1,
    aten.min.dim: 1,
    aten.linalg_vector_norm.default: 2,  # F.normalize: Swinv2's cosine attention
}
"""Reductions over given dims, and the position of their ``dim`` argument (``keepdim``
follows it): channel-wise (and zero-preserving) unless they reduce the channel dim."""
WITH_INDICES: frozenset[OpOverload] = frozenset({aten.max.dim, aten.min.dim})
"""Reductions that return (values, indices): Hiera's ``x.view(...).max(dim=1).values``."""
POSITIVE: frozenset[OpOverload] = frozenset(
    {aten.exp.default, aten.sigmoid.default, aten.softplus.default}
)
"""f(x) > 0 for every x: a denominator they compute is never zero."""
NONNEGATIVE: frozenset[OpOverload] = POSITIVE | frozenset(
    {aten.abs.default, aten.square.default, aten.relu.default, aten.linalg_vector_norm.default}
)
"""f(x) >= 0 for every x (plus a positive constant, a denominator that is never zero)."""
INDEX: frozenset[OpOverload] = frozenset({aten.index.Tensor})
"""``x[idx]``: channel-wise where no index tensor indexes the channel dim (Swinv2's bias
table, computed by an MLP, read at each pair of window positions)."""


def writes_running_statistics(node: fx.Node) -> bool:
    """A batch or instance norm that normalises with the batch's statistics and is given
    running ones: it updates those in place, which its schema does not declare."""
    if node.target not in CHANNEL_NORMS or len(node.args) < 6:
        return False
    running_mean, running_var, batch_statistics = node.args[3:6]
    return bool(batch_statistics) and (running_mean is not None or running_var is not None)


def has_side_effects(node: fx.Node) -> bool:
    """What dead-code elimination keeps: in-place writes, whether the schema declares them or
    not (running statistics: FX's own pass dropped a training BatchNorm whose output nothing
    read, and its statistics stopped updating), and higher-order ops (a ``no_grad`` or
    autocast region) whose body has any. Random draws go: FX's pass keeps them, so a
    dropout at the end of a branch the model throws away (CANINE's `final_char_encoder`
    under a classification head) kept the whole branch, which sparsefx ran and spent budget
    on while torch.compile, whose graph Dynamo had pruned, did neither. A dropped draw moves
    later draws along the random stream, as torch.compile's dead-code pass does: dropout's
    noise is sparsefx's own and never eager's bitwise anyway, other random ops' (``randn``)
    match eager's only where no dead draw came before them."""
    if node.is_impure(impure_random=False) or writes_running_statistics(node):
        return True
    return any(
        has_side_effects(inner)
        for body in _bodies(node)
        for inner in body.graph.nodes
        if inner.op not in ("placeholder", "output")
    )


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """`graph`, and the bodies of its higher-order ops, without the nodes no output reads
    that have no side effects; whether it changed. FX's own pass cleans bodies with its
    default rule, which drops a running-statistics update inside a ``no_grad`` region."""
    changed = False
    for node in reversed(graph.nodes):
        if not node.users and not has_side_effects(node):
            graph.erase_node(node)
            changed = True
    for body in {id(b): b for node in graph.nodes for b in _bodies(node)}.values():
        if eliminate_dead_code(body.graph):
            body.recompile()
            changed = True
    return changed


def _bodies(node: fx.Node) -> list[fx.GraphModule]:
    """The subgraphs a higher-order op runs (``wrap_with_set_grad_enabled``'s region)."""
    owner = node.graph.owning_module
    if owner is None or node.op != "call_function":
        return []
    bodies = []
    for arg in node.args:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            body = getattr(owner, str(arg.target), None)
            if isinstance(body, fx.GraphModule):
                bodies.append(body)
    return bodies


def aliases_input(node: object) -> bool:
    """A view or an in-place op, or one output of a split/chunk/unbind: it shares its first
    input's storage."""
    if isinstance(node, fx.Node) and node.target is operator.getitem:
        node = node.args[0]
    schema = getattr(getattr(node, "target", None), "_schema", None)
    return schema is not None and bool(schema.returns) and schema.returns[0].alias_info is not None


def is_conv(target: object) -> bool:
    return target in CONVS


def is_weight_op(target: object) -> bool:
    """linear, convolution, addmm or embedding: the ops whose weight channels sparsefx
    prunes."""
    return target in LINEAR or target in CONVS or target in ADDMM or target in EMBEDDING


@dataclass(frozen=True)
class WeightOperands:
    """Where a weight op's operands are, and which weight dims hold its channels."""

    input: int
    weight: int
    bias: int | None
    out_dim: int
    in_dim: int


def weight_operands(node: fx.Node) -> WeightOperands:
    if node.target in ADDMM:
        return WeightOperands(input=1, weight=2, bias=0, out_dim=1, in_dim=0)
    if node.target in EMBEDDING:  # the input is the tokens; in_dim indexes the vocabulary
        return WeightOperands(input=1, weight=0, bias=None, out_dim=1, in_dim=0)
    return WeightOperands(input=0, weight=1, bias=2, out_dim=0, in_dim=1)


def weight_args(node: fx.Node) -> tuple[object, object, object]:
    """(input, weight, bias) of a weight op; bias may be None."""
    if node.target in ADDMM:
        return node.args[1], node.args[2], node.args[0]
    if node.target in EMBEDDING:
        return node.args[1], node.args[0], None
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[0], node.args[1], bias


def is_plain_addmm(node: fx.Node) -> bool:
    """addmm(b, x, W) that is a linear layer: unscaled, b a vector. Also after the compact
    rewrite, whose bias is a new index_select of the captured bias, without metadata."""
    bias = node.args[0]
    scaled = len(node.args) > 3 or any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha"))
    if isinstance(bias, fx.Node) and bias.target is torch.ops.aten.index_select.default:
        bias = bias.args[0]
    return not scaled and isinstance(bias, fx.Node) and len(bias.meta["val"].shape) == 1
