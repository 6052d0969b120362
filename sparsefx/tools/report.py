"""What sparsefx did to a model, as data and as text.

A `Report` holds, for each graph sparsefx rewrote, its node listings (the captured aten
graph, the compact training graph, the score graph and, under torch.compile, the graph
Dynamo captured), every node annotated with what the analysis and the passes decided, plus
the group table, the ops left dense and why, the scatters, and the costs from the cost
model. `sparsefx.diff` builds one and shows the listings as a unified diff;
`sparsefx.explain` shows the annotations alone, for logs.

Listings are stable across runs: node names are the graph's own (torch.export names nodes
deterministically and the passes rewrite nodes in place), and symbolic sizes are renamed:
``s0, s1, ...`` for the inputs' dynamic dims by first appearance, and ``k_i`` for the kept
channels of group i (the cost model's symbols). Compact shapes come from running the
rewritten graph on fake tensors whose index inputs have symbolic lengths.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import sympy
import torch
from torch import Tensor, fx
from torch._dispatch.python import enable_python_dispatcher
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export.graph_signature import InputKind
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

from sparsefx.analysis import META, DenseOp, Group, Layout, build_cost_model, ops
from sparsefx.capture import CapturedGraph, first_line
from sparsefx.config import SparseConfig
from sparsefx.kernels import layout_index
from sparsefx.runtime import GraphRecord, SparseRuntime

__all__ = ["GraphReport", "GroupRow", "Line", "Listing", "Report", "build_report"]

aten = torch.ops.aten
_WEIGHT_GATHERS = ("sparsefx::gather_weight", "sparsefx::gather_block")
"""The ops that read a weight's kept rows and columns: the aten path's and the Triton one
(registered only where triton imports, so matched by name)."""
_DTYPES = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "b8",
}


@dataclass(frozen=True)
class Line:
    """One node of a listing: ``name: f32[s0, k_1, 8, 8] = aten.conv2d(x, w)  # note``."""

    node: str
    code: str
    note: str
    groups: tuple[str, ...] = ()
    """Symbols (``k_i``) of the groups this node touches."""

    def render(self) -> str:
        return f"{self.code}  # {self.note}" if self.note else self.code


@dataclass
class Listing:
    title: str
    lines: list[Line]
    problem: str | None = None
    """Why some shapes are missing (fake propagation stopped at a node)."""

    def text(self) -> list[str]:
        return [line.render() for line in self.lines]


@dataclass
class GraphReport:
    """One graph: how it was captured, rewritten and scored."""

    title: str
    captured: Listing
    compact: Listing
    score: Listing | None
    dynamo: Listing | None
    graph_break: str | None
    dense: list[DenseOp]
    scatters: list[DenseOp]


@dataclass
class GroupRow:
    symbol: str
    """``k_i``: this group's kept count in shapes and in the cost model's expressions."""
    name: str
    size: int
    stream: bool
    producers: list[str]
    mask_points: list[str]
    members: list[str]
    """``parameter[dim]`` of every parameter dim the group's channels index."""
    channel_cost: float
    """c_i of one channel in the budget (1 for budget="channels")."""
    channel_flops: float
    """Forward FLOPs per example of one more kept channel, at the target operating point."""
    probabilities: tuple[float, float, float]
    """min, mean and max of the keep probabilities s."""
    expected_kept: float
    kept: int
    """Kept channels in the masks the costs are evaluated at (`Costs.masks`)."""


@dataclass
class Costs:
    """Forward linear/conv FLOPs per example and parameters, from the cost model."""

    masks: str
    """Which masks `flops[1]`/`params[1]` are evaluated at."""
    flops: tuple[float, float, float]
    """Dense, at the masks, expected under s."""
    params: tuple[float, float, float]
    flops_expr: sympy.Expr
    params_expr: sympy.Expr
    scope: str = ""
    """Which graph the costs cover, when there are several."""


@dataclass
class Report:
    """What sparsefx did to a model: returned by `sparsefx.diff`, printed by `explain`."""

    model: str
    mode: str
    """"transform" or "compile"."""
    config: SparseConfig
    groups: list[GroupRow]
    costs: Costs | None
    graphs: list[GraphReport]
    couplings: nx.Graph = field(default_factory=nx.Graph, repr=False)
    """Producers (nodes, with attribute ``group``: a symbol or None) and the joins that
    couple them (edges, with attribute ``kinds``)."""

    def __str__(self) -> str:
        return self.text()

    def text(self, *, diff: bool = True, context: int = 3, sympy: bool = False) -> str:
        """The report as text: `diff` shows each graph as a unified diff of its listings
        with `context` lines around changes; without it every compact node is listed with
        its annotation. `sympy` adds the cost model's expressions."""
        return "\n".join(_text(self, diff=diff, context=context, show_sympy=sympy)) + "\n"

    def html(self) -> str:
        """A self-contained HTML page (no network): side-by-side graphs, collapsible groups
        and a drawing of the coupling groups."""
        from sparsefx.tools.html import render_html

        return render_html(self)

    def save_html(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.html(), encoding="utf-8")
        return path


def build_report(
    model: str, mode: str, config: SparseConfig, runtime: SparseRuntime | None,
    records: Sequence[GraphRecord],
) -> Report:  # fmt: skip
    """The report of `records` (graphs of one model); `runtime` holds its groups, if any."""
    groups = runtime.groups if runtime is not None else []
    symbols = {g.name: f"k_{i}" for i, g in enumerate(groups)}
    graphs = [_graph_report(record, groups, symbols, config) for record in records]
    source = next((r for r in records if r.analysis.groups), records[0] if records else None)
    if runtime is None or source is None:
        costs = _dense_costs(source.captured) if source is not None else None
        return Report(model, mode, config, [], costs, graphs, _couplings(source, {}))
    rows, costs = _groups_and_costs(runtime, symbols)
    if len(records) > 1:
        costs.scope = f"graph {records.index(source) + 1} of {len(records)}, {source.title}"
    producers = {p: symbols[g.name] for g in groups for p in g.producers}
    return Report(model, mode, config, rows, costs, graphs, _couplings(source, producers))


# -- groups and costs --------------------------------------------------------------------------


def _groups_and_costs(
    runtime: SparseRuntime, symbols: dict[str, str]
) -> tuple[list[GroupRow], Costs]:
    structure = runtime.structure
    mask = runtime.current_mask()
    s = structure.probabilities.detach().float().cpu()
    kept = [int(m.sum()) for m in structure.split(mask)]
    expected = structure.expected_counts()
    rows = []
    for i, group in enumerate(runtime.groups):
        part = s[structure.offsets[i] : structure.offsets[i + 1]]
        rows.append(
            GroupRow(
                symbols[group.name],
                group.name,
                group.size,
                group.stream,
                list(group.producers),
                list(dict.fromkeys(group.mask_points)),
                _members(group),
                float(structure.costs[structure.offsets[i]]),
                0.0,  # set below from the cost model
                (float(part.min()), float(part.mean()), float(part.max())),
                expected[i],
                kept[i],
            )
        )
    cost = runtime.cost_model
    flops_per_channel = cost.channel_costs("flops", runtime.config.density)
    for row, flops in zip(rows, flops_per_channel, strict=True):
        row.channel_flops = flops
    masks = (
        "the masks of the last training forward"
        if structure.last is not None
        else "the frozen masks"
        if structure.fixed is not None
        else "the eval (top-budget) masks"
    )

    def evaluate(which: str) -> tuple[float, float, float]:
        return tuple(cost.evaluate(which, k) for k in (cost.sizes, kept, expected))  # type: ignore[return-value]

    return rows, Costs(masks, evaluate("flops"), evaluate("params"), cost.flops, cost.params)


def _members(group: Group) -> list[str]:
    """``weight[dim]``, with the range of that dim when the group indexes only part of it
    (a concat's piece, q/k/v in a fused weight, a slice)."""
    names = []
    for m in group.slices:
        span = group.size * m.block
        whole = m.offset == 0 and span == m.extent
        names.append(f"{m.fqn}[{m.dim}]" + ("" if whole else f"[{m.offset}:{m.offset + span}]"))
    return list(dict.fromkeys(names))


def _dense_costs(captured: CapturedGraph) -> Costs:
    """Costs of a graph with nothing to prune: every column is the dense model."""
    cost = build_cost_model(captured.gm, captured.inputs, [])
    flops, params = cost.evaluate("flops", []), cost.evaluate("params", [])
    return Costs("nothing is pruned", (flops,) * 3, (params,) * 3, cost.flops, cost.params)


def _couplings(source: GraphRecord | None, producers: dict[str, str]) -> nx.Graph:
    """The coupling graph of the graph that holds the groups, its nodes named by module
    (``layer1.conv`` for a producer, ``attn.c_attn#1`` for a part of one) with their group
    symbol as attribute ``group``."""
    graph = nx.Graph()
    if source is None:
        return graph
    modules = _producer_modules(source)
    graph.add_nodes_from(source.analysis.couplings.nodes)
    graph.add_edges_from(source.analysis.couplings.edges(data=True))
    graph.add_nodes_from(producers)
    nx.set_node_attributes(graph, {n: producers.get(n) for n in graph.nodes}, "group")
    return nx.relabel_nodes(graph, {n: modules.get(n, n) for n in graph.nodes})


def _producer_modules(record: GraphRecord) -> dict[str, str]:
    """Producer node name (``addmm#1`` for a part) -> its module's name."""
    placeholders = record.captured.gm.graph.find_nodes(op="placeholder")
    state = {
        n.name: target for n, (_, target) in zip(placeholders, record.captured.inputs, strict=True)
    }
    names = {}
    for node in record.analysis.couplings.nodes:
        base, sep, part = node.partition("#")
        found = [n for n in record.captured.gm.graph.nodes if n.name == base]
        if found and ops.is_weight_op(found[0].target):
            weight = ops.weight_args(found[0])[1]
            module = state.get(getattr(weight, "name", ""), base).removesuffix(".weight")
            names[node] = module + sep + part
    return names


# -- one graph ---------------------------------------------------------------------------------


def _graph_report(
    record: GraphRecord, groups: list[Group], symbols: dict[str, str], config: SparseConfig
) -> GraphReport:
    notes = _Notes(record, symbols)
    values, names = _captured_values(record.captured.gm)
    captured = _listing("captured aten graph", record.captured.gm, values, names, notes)
    fake = _FakeShapes(record.captured.gm, groups, symbols, config.density)
    compact = fake.listing("compact graph", record.compact, notes)
    score = fake.listing("score graph", record.score, notes) if record.score else None
    dynamo = None
    if record.dynamo is not None:
        values, names = _captured_values(record.dynamo, key="example_value")
        dynamo = _listing("Dynamo graph", record.dynamo, values, names, _no_notes)
    return GraphReport(
        record.title,
        captured,
        compact,
        score,
        dynamo,
        record.graph_break,
        list(dict.fromkeys(record.analysis.dense)),
        list(dict.fromkeys(record.analysis.scatters)),  # one row per user, not per input
    )


def _listing(
    title: str,
    gm: fx.GraphModule,
    values: dict[fx.Node, Any],
    names: dict[sympy.Symbol, str],
    notes: Callable[[fx.Node], tuple[str, tuple[str, ...]]],
    problem: str | None = None,
) -> Listing:
    lines = []
    for node in gm.graph.nodes:
        shape = _value(values.get(node), names) if node.op != "output" else ""
        head = f"{node.name}: {shape}" if shape else node.name
        note, touched = notes(node)
        lines.append(Line(node.name, f"{head} = {_call(node)}", note, touched))
    return Listing(title, lines, problem)


def _no_notes(node: fx.Node) -> tuple[str, tuple[str, ...]]:
    return "", ()


def _captured_values(
    gm: fx.GraphModule, key: str = "val"
) -> tuple[dict[fx.Node, Any], dict[sympy.Symbol, str]]:
    """Node values recorded at capture, and names for their size symbols (by appearance
    in the inputs: the names torch gives them differ between versions)."""
    values = {node: node.meta.get(key) for node in gm.graph.nodes}
    names: dict[sympy.Symbol, str] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        for size in _sizes(values[node]):
            if isinstance(size, torch.SymInt):
                for symbol in sorted(size.node.expr.free_symbols, key=str):
                    names.setdefault(symbol, f"s{len(names)}")
    return values, names


class _FakeShapes:
    """Shapes of a rewritten graph: run it on fake tensors whose dynamic dims and index
    inputs have symbolic sizes (``s_i``; ``k_i`` for group i's kept count)."""

    def __init__(
        self, captured: fx.GraphModule, groups: list[Group], symbols: dict[str, str],
        density: float,
    ):  # fmt: skip
        self.shape_env = ShapeEnv()
        self.mode = FakeTensorMode(shape_env=self.shape_env)
        self.names: dict[sympy.Symbol, str] = {}
        self.inputs: dict[str, Tensor] = {}
        self.renamed: dict[sympy.Expr, torch.SymInt | int] = {}
        device = torch.device("cpu")
        with self.mode:
            for node in captured.graph.find_nodes(op="placeholder"):
                value = node.meta.get("val")
                if isinstance(value, Tensor):
                    sizes = [self._size(s) for s in value.shape]
                    device = value.device  # index inputs live where the parameters do
                    self.inputs[node.name] = torch.empty(
                        sizes, dtype=value.dtype, device=value.device
                    )
            self.kept = {
                g.name: torch.empty(
                    self._symbol(symbols[g.name], _hint(g.size, density)),
                    dtype=torch.int64,
                    device=device,
                )
                for g in groups
            }

    def _symbol(self, name: str, hint: int) -> torch.SymInt | int:
        symbol = self.shape_env.create_symbol(
            hint, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC
        )
        if not isinstance(symbol, sympy.Symbol):  # sizes 0 and 1 are always specialised
            return hint
        self.names[symbol] = name
        return self.shape_env.create_symintnode(symbol, hint=hint)

    def _size(self, size: Any) -> Any:
        """A capture-time size in this shape environment (same symbol, same name)."""
        if not isinstance(size, torch.SymInt):
            return size
        expr, hint = size.node.expr, size.node.hint
        if expr.is_number:  # export specialised this size
            return int(expr)
        if expr not in self.renamed:
            self.renamed[expr] = self._symbol(f"s{len(self.renamed)}", int(hint) if hint else 8)
        return self.renamed[expr]

    def _input(self, node: fx.Node) -> Any:
        meta = node.meta.get(META, {})
        if "index_of" in meta:
            return self.kept[meta["index_of"]]
        if node.name in self.inputs:
            return self.inputs[node.name]
        value = node.meta.get("val")  # a score graph's shared noise: a dropout input's shape
        if not isinstance(value, Tensor):
            return value
        sizes = [self._size(s) for s in value.shape]
        return torch.empty(sizes, dtype=value.dtype, device=value.device)

    def listing(
        self,
        title: str,
        gm: fx.GraphModule,
        notes: Callable[[fx.Node], tuple[str, tuple[str, ...]]],
    ) -> Listing:
        interpreter = fx.Interpreter(gm, garbage_collect_values=False)
        problem = None
        # The Python dispatcher runs composite ops through their symbolic-size decompositions,
        # as export does: torch 2.11's C++ matmul asks a transposed 3-D input of symbolic
        # size for its numel (nn.MultiheadAttention's in-projections).
        with (
            self.mode,
            enable_python_dispatcher(),
            torch.no_grad(),
            _silenced(logging.getLogger(FakeTensorMode.__module__)),
        ):
            args = [self._input(node) for node in gm.graph.find_nodes(op="placeholder")]
            try:
                interpreter.run(*args)
            except Exception as error:  # shapes are a convenience: say where they stop
                failed = next((n.name for n in gm.graph.nodes if n not in interpreter.env), "?")
                problem = (
                    f"shapes stop at {failed}, which failed on fake tensors: "
                    f"{type(error).__name__}: {first_line(error)}"
                )
        return _listing(title, gm, interpreter.env, self.names, notes, problem)


@contextlib.contextmanager
def _silenced(logger: logging.Logger):
    """Fake tensors log an op whose meta kernel fails (baddbmm's, with a symbolic batch) as
    an error with its traceback; the listing says where shapes stop instead."""
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _hint(size: int, density: float) -> int:
    """A kept count to trace with: typical, and not 0 or 1 (which would be specialised)."""
    return min(size, max(2, round(size * density)))


def _sizes(value: Any) -> tuple:
    return tuple(value.shape) if isinstance(value, Tensor) else ()


# -- formatting nodes --------------------------------------------------------------------------


def _value(value: Any, names: dict[sympy.Symbol, str]) -> str:
    """``f32[s0, k_1, 8, 8]``; tuples of tensors in parentheses; symbolic ints as ``sym``."""
    if isinstance(value, Tensor):
        dtype = _DTYPES.get(value.dtype, str(value.dtype).removeprefix("torch."))
        return f"{dtype}[{', '.join(_dim(s, names) for s in value.shape)}]"
    if isinstance(value, list | tuple):
        parts = [_value(v, names) for v in value]
        return f"({', '.join(p or '?' for p in parts)})" if any(parts) else ""
    if isinstance(value, torch.SymInt) and not value.node.expr.is_number:
        return f"sym {_dim(value, names)}"
    return ""  # a plain or specialised int (sizes are part of the shapes that use them)


def _dim(size: Any, names: dict[sympy.Symbol, str]) -> str:
    if not isinstance(size, torch.SymInt):
        return str(size)
    expr = size.node.expr
    return str(expr.xreplace({s: sympy.Symbol(names[s]) for s in expr.free_symbols if s in names}))


def _call(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return f"output({_arg(node.args[0])})"
    if node.op == "get_attr":
        return f"self.{node.target}"
    args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
    if node.op == "call_method":
        return f"{_arg(node.args[0])}.{node.target}({', '.join(args[1:])})"
    return f"{_target(node)}({', '.join(args)})"


def _target(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        overload = target._overloadname
        base = f"{target.namespace}.{target._opname}"
        return base if overload == "default" else f"{base}.{overload}"
    if node.op == "call_module":
        return f"self.{target}"
    if target is operator.getitem:
        return "getitem"
    name = fx.node._get_qualified_name(target)  # type: ignore[arg-type]
    return name.removeprefix("_operator.").removeprefix("sparsefx.kernels.compact.")


def _arg(arg: Any) -> str:
    if isinstance(arg, fx.Node):
        return arg.name
    if isinstance(arg, tuple):
        return f"({', '.join(_arg(a) for a in arg)}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, list):
        return f"[{', '.join(_arg(a) for a in arg)}]"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k!r}: {_arg(v)}" for k, v in arg.items()) + "}"
    if isinstance(arg, torch.dtype | torch.device | torch.memory_format | torch.layout):
        return str(arg)
    return repr(arg)


# -- annotations -------------------------------------------------------------------------------


class _Notes:
    """What the analysis and the passes decided for each node, in words."""

    def __init__(self, record: GraphRecord, symbols: dict[str, str]):
        self.symbols = symbols
        placeholders = record.captured.gm.graph.find_nodes(op="placeholder")
        self.inputs = {
            node.name: spec for node, spec in zip(placeholders, record.captured.inputs, strict=True)
        }
        self.dense = {d.node: d.reason for d in record.analysis.dense}
        self.scatters = {d.node: d.reason for d in record.analysis.scatters}

    def __call__(self, node: fx.Node) -> tuple[str, tuple[str, ...]]:
        meta = node.meta.get(META, {})
        parts = self._input(node, meta) if node.op == "placeholder" else self._op(node, meta)
        if "mask_point" in meta:
            parts.append(f"mask point of {self._names(meta['mask_point'])}")
        reason = meta.get("dense_reason") or self.dense.get(node.name)
        if reason:
            parts.append(f"dense: {reason}")
        touched = [*self._groups_of(meta)]
        return "; ".join(parts), tuple(dict.fromkeys(touched))

    def _input(self, node: fx.Node, meta: dict) -> list[str]:
        if "index_of" in meta:
            return [f"kept channel indices of {self.symbols[meta['index_of']]}"]
        if meta.get("role") == "shared_noise":
            return ["dropout noise of the training forward (shared)"]
        kind, target = self.inputs.get(node.name, (InputKind.USER_INPUT, node.name))
        if kind == InputKind.PARAMETER:
            return [f"parameter {target}"]
        if kind == InputKind.BUFFER:
            return [f"buffer {target}"]
        if kind == InputKind.CONSTANT_TENSOR:
            return [f"constant {target}"]
        return ["model input"]

    def _op(self, node: fx.Node, meta: dict) -> list[str]:
        role, parts = meta.get("role"), []
        if role == "producer":
            parts.append(f"prunable producer of {self.symbols[meta['group']]}")
        if "in_layout" in meta:
            parts.append(f"gathers input columns of {self._layout(meta['in_layout'])}")
        if "contracted" in meta:
            parts.append(f"sums over the kept features of {self._layout(meta['contracted'])}")
        if meta.get("grouped"):
            parts.append("grouped conv: gathers the rows of kept conv groups, one group each")
        if role == "channelwise" and "layout" in meta:
            parts.append(f"compact {self._layout(meta['layout'])}")
        if role == "scatter":
            users = [u.name for u in node.users]
            why = "; ".join(dict.fromkeys(self.scatters[u] for u in users if u in self.scatters))
            groups = self._names(meta["groups"])
            parts.append(f"scatter {groups} to full width for {', '.join(users)}: {why}")
        if role == "dropout_noise":
            parts.append(
                "dropout noise, shared with the score forwards"
                if meta["shared"]
                else "dropout noise of a compact tensor, drawn in every forward"
            )
        op = node.target.name() if isinstance(node.target, torch._ops.OpOverload) else ""
        if op in _WEIGHT_GATHERS:
            parts.append(f"kept rows/columns of {self._state(node.args[0])}")
        elif op == "sparsefx::compact_linear":
            weight = node.args[1]  # an addmm's weight arrives transposed
            if isinstance(weight, fx.Node) and weight.target is aten.t.default:
                weight = weight.args[0]
            parts.append(f"Triton gather-GEMM on kept rows/columns of {self._state(weight)}")
        elif node.target is aten.index_select.default and self._state(node.args[0]):
            parts.append(f"kept entries of {self._state(node.args[0])}")
        elif node.target is aten.index_copy_.default:
            parts.append(f"writes kept channels' statistics back to {self._state(node.args[0])}")
        elif node.target is layout_index:
            parts.append("kept feature indices of a blocked or multi-piece layout")
        elif op == "sparsefx::group_norm":
            parts.append(f"group norm of the kept norm groups, {node.args[1]} channels each")
        return parts

    def _groups_of(self, meta: dict) -> Iterable[str]:
        if "group" in meta:
            yield self.symbols[meta["group"]]
        for key in ("layout", "in_layout", "contracted"):
            if isinstance(meta.get(key), Layout):
                yield from (self.symbols[g] for g in meta[key].groups)
        for key in ("groups", "mask_point"):
            yield from (self.symbols[g] for g in meta.get(key, ()))
        if "index_of" in meta:
            yield self.symbols[meta["index_of"]]

    def _state(self, arg: Any) -> str:
        if isinstance(arg, fx.Node) and arg.name in self.inputs:
            return self.inputs[arg.name][1]
        return ""

    def _names(self, groups: Iterable[str]) -> str:
        return ", ".join(self.symbols[g] for g in groups)

    def _layout(self, layout: Layout) -> str:
        pieces = [
            f"{p.size} dense"
            if p.group is None
            else self.symbols[p.group] + (f" (block {p.block})" if p.block > 1 else "")
            for p in layout.pieces
        ]
        body = pieces[0] if len(pieces) == 1 else f"[{' | '.join(pieces)}]"
        return f"{body} on dim {layout.dim}"


# -- text --------------------------------------------------------------------------------------


def _text(report: Report, *, diff: bool, context: int, show_sympy: bool) -> list[str]:
    config = report.config
    out = [
        f"sparsefx {'diff' if diff else 'explain'}: {report.model} ({report.mode} mode), "
        f"density {config.density}, budget {config.budget}, prune_streams "
        f"{config.prune_streams}, sparse_gradients {config.sparse_gradients}",
        "",
    ]
    out += _group_table(report.groups)
    if report.costs is not None:
        out += _cost_table(report.costs, show_sympy)
    for i, graph in enumerate(report.graphs, 1):
        out += ["", f"== graph {i} of {len(report.graphs)}: {graph.title} =="]
        if graph.graph_break:
            out.append(f"ends at a graph break: {graph.graph_break}")
        out += _ops_table("left dense", graph.dense)
        out += _ops_table("read at full width (a scatter before them)", graph.scatters)
        if graph.dynamo is not None and diff:
            out += ["", f"-- {graph.dynamo.title} (what torch.compile handed to sparsefx) --"]
            out += graph.dynamo.text()
        out += ["", _LEGEND]
        if diff:
            out += [f"-- {graph.captured.title} -> {graph.compact.title} --"]
            out += _unified(graph.captured, graph.compact, context)
        else:
            out += [f"-- {graph.compact.title} --", *graph.compact.text()]
        if graph.score is not None:
            out += [
                "",
                f"-- {graph.compact.title} -> {graph.score.title} (pure forward of masks 2..K) --",
            ]
            out += _unified(graph.compact, graph.score, context)
        out += [
            f"note: {listing.title}: {listing.problem}"
            for listing in (graph.compact, graph.score)
            if listing and listing.problem
        ]
    return out


_LEGEND = (
    "listing: name: dtype[shape] = op(args)  # what sparsefx did; k_i = kept channels of group "
    "i, s_i = a dynamic input size; nodes without a note run unchanged"
)


def _unified(before: Listing, after: Listing, context: int) -> list[str]:
    lines = list(
        difflib.unified_diff(
            before.text(), after.text(), before.title, after.title, n=context, lineterm=""
        )
    )
    return lines or ["(no changes)"]


def _group_table(groups: list[GroupRow]) -> list[str]:
    if not groups:
        return ["groups: none (nothing to prune; every linear/conv is listed under 'left dense')"]
    rows = [
        [
            g.symbol,
            g.name,
            str(g.size),
            str(g.kept),
            f"{g.expected_kept:.2f}",
            "/".join(f"{p:.3f}" for p in g.probabilities),
            f"{g.channel_cost:.4g}",
            f"{g.channel_flops:,.0f}",
            "yes" if g.stream else "",
        ]
        for g in groups
    ]
    header = ["sym", "group", "size", "kept", "E[kept]", "s min/mean/max", "cost/ch", "FLOPs/ch"]
    header.append("stream")
    out = [f"groups ({len(groups)})", *_table(header, rows)]
    for g in groups:
        out.append(
            f"  {g.symbol}: producers {', '.join(g.producers)}; mask points {', '.join(g.mask_points)}"
        )
        out.append(f"  {' ' * len(g.symbol)}  members {', '.join(g.members)}")
    return out


def _cost_table(costs: Costs, show_sympy: bool) -> list[str]:
    def row(name: str, values: tuple[float, float, float]) -> list[str]:
        dense = values[0] or 1.0
        return [
            name,
            f"{values[0]:,.0f}",
            f"{values[1]:,.0f} ({values[1] / dense:.1%})",
            f"{values[2]:,.0f} ({values[2] / dense:.1%})",
        ]

    out = [
        "",
        f"cost (cost model: forward linear/conv FLOPs per example; parameters of pruned "
        f"layers counted at kept channels; 'masks' = {costs.masks})"
        + (f"; of {costs.scope}, the graph holding the groups" if costs.scope else ""),
        *_table(
            ["", "dense", "masks", "expected under s"],
            [row("FLOPs", costs.flops), row("params", costs.params)],
        ),
    ]
    if show_sympy:
        out += [f"  FLOPs  = {costs.flops_expr}", f"  params = {costs.params_expr}"]
    return out


def _ops_table(title: str, ops: list[DenseOp]) -> list[str]:
    if not ops:
        return [f"{title}: none"]
    return [
        f"{title} ({len(ops)})",
        *_table(["node", "op", "reason"], [[d.node, d.op, d.reason] for d in ops]),
    ]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
