"""The HTML form of a `Report`: one self-contained page (inline CSS, SVG and script; no
network), for reading a model's rewrite in a browser.

Each graph is shown side by side, captured against compact, with changed, added and removed
nodes highlighted; groups are collapsible, and clicking a group's symbol highlights every
node that touches it. The coupling groups are drawn with networkx and matplotlib (SVG with
text kept as text, so group names stay searchable).
"""

from __future__ import annotations

import difflib
import io
from html import escape

import networkx as nx

from sparsefx.tools.report import GraphReport, GroupRow, Line, Listing, Report

__all__ = ["render_html"]

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; }
td, th { padding: 2px 8px; text-align: left; vertical-align: top; }
table.data th { border-bottom: 1px solid #999; } table.data td { border-bottom: 1px solid #eee; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre, .sxs td { font: 12px/1.35 ui-monospace, monospace; }
details { margin: 0.3em 0; } summary { cursor: pointer; }
.sym { display: inline-block; min-width: 3em; font-weight: 600; color: #0550ae; cursor: pointer; }
.sxs { width: 100%; table-layout: fixed; }
.sxs td { white-space: pre-wrap; word-break: break-all; border-bottom: 1px solid #f4f4f4; }
.sxs tr.chg td { background: #fff5d6; } .sxs tr.add td.r { background: #dff7df; }
.sxs tr.del td.l { background: #fde2e2; }
.sxs tr.hl td, details.group.hl > summary { outline: 2px solid #0550ae; }
.note { color: #666; }
.svg svg { max-width: 100%; height: auto; }
"""

_SCRIPT = """
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll(".sym").forEach(function (el) {
    el.addEventListener("click", function (event) {
      event.preventDefault();
      var k = el.dataset.k;
      document.querySelectorAll(".hl").forEach(function (row) { row.classList.remove("hl"); });
      document.querySelectorAll('[data-k~="' + k + '"]').forEach(function (row) {
        row.classList.add("hl");
      });
    });
  });
});
"""


def render_html(report: Report) -> str:
    config = report.config
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>sparsefx: {escape(report.model)}</title><style>{_STYLE}</style>",
        f"<script>{_SCRIPT}</script></head><body>",
        f"<h1>sparsefx: {escape(report.model)} ({escape(report.mode)} mode)</h1>",
        f"<p>{escape(repr(config))}</p>",
        _costs(report),
        f"<h2>Groups ({len(report.groups)})</h2>",
        "".join(_group(g) for g in report.groups) or "<p>Nothing to prune.</p>",
        "<h2>Coupling groups</h2>",
        _drawing(report.couplings),
    ]
    for i, graph in enumerate(report.graphs, 1):
        parts.append(_graph(i, len(report.graphs), graph))
    parts.append("</body></html>")
    return "\n".join(parts)


def _costs(report: Report) -> str:
    costs = report.costs
    if costs is None:
        return ""
    rows = []
    for name, values in (("FLOPs", costs.flops), ("params", costs.params)):
        dense = values[0] or 1.0
        cells = [f"{values[0]:,.0f}"] + [f"{v:,.0f} ({v / dense:.1%})" for v in values[1:]]
        rows.append([name, *cells])
    return (
        f"<h2>Cost</h2><p class='note'>Cost model: forward linear/conv FLOPs per example and "
        f"parameters; masks: {escape(costs.masks)}"
        + (f"; of {escape(costs.scope)}, the graph holding the groups" if costs.scope else "")
        + ".</p>"
        + _table(["", "dense", "masks", "expected under s"], rows)
        + f"<details><summary>sympy expressions</summary><pre>FLOPs  = {escape(str(costs.flops_expr))}\n"
        f"params = {escape(str(costs.params_expr))}</pre></details>"
    )


def _group(group: GroupRow) -> str:
    low, mean, high = group.probabilities
    stream = ", residual stream" if group.stream else ""
    items = [
        ("producers", ", ".join(group.producers)),
        ("mask points", ", ".join(group.mask_points)),
        ("members", ", ".join(group.members)),
    ]
    return (
        f"<details class='group' id='group-{group.symbol}' data-k='{group.symbol}'><summary>"
        f"<span class='sym' data-k='{group.symbol}'>{group.symbol}</span> "
        f"<b>{escape(group.name)}</b>: {group.size} channels{stream}, {group.kept} kept, "
        f"E[kept] {group.expected_kept:.2f}, s {low:.3f}/{mean:.3f}/{high:.3f}, "
        f"cost/channel {group.channel_cost:.4g}, FLOPs/channel {group.channel_flops:,.0f}"
        "</summary><ul>"
        + "".join(f"<li>{k}: <code>{escape(v)}</code></li>" for k, v in items)
        + "</ul></details>"
    )


def _drawing(couplings: nx.Graph) -> str:
    """The dependency graph between producers, one component per cell, coloured by group
    (grey: kept dense)."""
    if not couplings.number_of_nodes():
        return "<p>No prunable producers.</p>"
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        return (
            "<p>The drawing needs matplotlib: <code>pip install 'sparsefx[report]'</code>. "
            "The groups above list the same couplings.</p>"
        )

    groups = [g for _, g in couplings.nodes(data="group")]
    symbols = sorted({g for g in groups if g}, key=lambda g: int(g[2:]))
    palette = matplotlib.colormaps["tab20"]
    colours = [palette(symbols.index(g) % 20) if g else (0.8, 0.8, 0.8, 1.0) for g in groups]
    prefix = _common_prefix([str(n) for n in couplings.nodes])
    labels = {
        n: f"{n[len(prefix) :]}\n{g}" if g else n[len(prefix) :]
        for n, g in couplings.nodes(data="group")
    }
    position, columns, rows = _grid_layout(couplings)
    figure = Figure(figsize=(2.2 * columns, 1.6 * rows))
    axes = figure.add_subplot()
    axes.set_axis_off()
    nx.draw_networkx(
        couplings, position, ax=axes, node_color=colours, labels=labels, font_size=7, node_size=250
    )
    kinds = {(a, b): "/".join(sorted(k)) for a, b, k in couplings.edges(data="kinds") if k}
    nx.draw_networkx_edge_labels(couplings, position, kinds, ax=axes, font_size=6)
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "sparsefx"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = buffer.getvalue()
    return (
        "<p class='note'>Nodes are producers (the linear/conv/embedding modules whose output channels are "
        "pruned); edges are the joins that couple their channels. A connected component is one "
        "group; grey ones stay dense (see the reasons under each graph).</p>"
        f"<div class='svg'>{svg[svg.index('<svg') :]}</div>"
    )


def _common_prefix(names: list[str]) -> str:
    """The dotted module path all names share ("transformer."), dropped from the labels."""
    parts = [name.split(".") for name in names]
    shared = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        shared.append(level[0])
    shared = shared[: min(len(p) for p in parts) - 1] if parts else []
    return "".join(f"{part}." for part in shared)


def _grid_layout(graph: nx.Graph) -> tuple[dict, int, int]:
    """Each connected component in its own cell of a grid (large ones span a row), laid out
    by a seeded spring layout, so the drawing is the same on every run."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    components = sorted(
        (sorted(c, key=order.__getitem__) for c in nx.connected_components(graph)),
        key=lambda c: order[c[0]],
    )
    columns = max(1, min(8, round(len(components) ** 0.5 * 1.5)))
    position: dict = {}
    cell, row = 0, 0
    for component in components:
        span = columns if len(component) > 4 else 1
        if cell + span > columns:
            cell, row = 0, row + 1
        if len(component) == 1:
            local = {component[0]: (0.0, 0.0)}
        else:
            local = nx.spring_layout(graph.subgraph(component), seed=0, scale=0.38 * span**0.5)
        for node, (x, y) in local.items():
            position[node] = (cell + span / 2 + x * (span if span > 1 else 1), -row - 0.5 + y)
        cell += span
    return position, columns, row + 1


def _graph(i: int, total: int, graph: GraphReport) -> str:
    parts = [f"<h2>Graph {i} of {total}: {escape(graph.title)}</h2>"]
    if graph.graph_break:
        parts.append(f"<p>Ends at a graph break: <code>{escape(graph.graph_break)}</code></p>")
    for title, ops in (("Left dense", graph.dense), ("Read at full width", graph.scatters)):
        rows = [[d.node, d.op, d.reason] for d in ops]
        parts.append(
            f"<h3>{title} ({len(ops)})</h3>"
            + (_table(["node", "op", "reason"], rows) if rows else "")
        )
    if graph.dynamo is not None:
        parts.append(
            f"<details><summary>{escape(graph.dynamo.title)} (what torch.compile handed to "
            f"sparsefx)</summary><pre>{escape(chr(10).join(graph.dynamo.text()))}</pre></details>"
        )
    parts.append(_side_by_side(graph.captured, graph.compact, open_=True))
    if graph.score is not None:
        parts.append(_side_by_side(graph.compact, graph.score, open_=False))
    return "\n".join(parts)


def _side_by_side(before: Listing, after: Listing, *, open_: bool) -> str:
    """Two listings aligned by `difflib.SequenceMatcher`: equal, changed, added, removed."""
    rows = []
    for kind, left, right in _aligned(before.lines, after.lines):
        rows.append(_row(kind, left, right))
    problems = [
        f"<p class='note'>{escape(x.title)}: {escape(x.problem)}</p>"
        for x in (before, after)
        if x.problem
    ]
    return (
        f"<details{' open' if open_ else ''}><summary>{escape(before.title)} → "
        f"{escape(after.title)}</summary>{''.join(problems)}<table class='sxs'>"
        f"<tr><th>{escape(before.title)}</th><th>{escape(after.title)}</th></tr>"
        + "".join(rows)
        + "</table></details>"
    )


def _aligned(before: list[Line], after: list[Line]) -> list[tuple[str, Line | None, Line | None]]:
    """Rows of a side-by-side diff: equal lines, then within each changed stretch, the same
    node on both sides ("chg"), nodes only after ("add") and only before ("del")."""
    rows: list[tuple[str, Line | None, Line | None]] = []
    lines = difflib.SequenceMatcher(
        None, [x.render() for x in before], [x.render() for x in after], autojunk=False
    )
    for tag, a0, a1, b0, b1 in lines.get_opcodes():
        if tag == "equal":
            rows += [("eq", x, y) for x, y in zip(before[a0:a1], after[b0:b1], strict=True)]
            continue
        left, right = before[a0:a1], after[b0:b1]
        names = difflib.SequenceMatcher(
            None, [x.node for x in left], [y.node for y in right], autojunk=False
        )
        for tag, c0, c1, d0, d1 in names.get_opcodes():
            if tag == "equal":  # the same nodes, changed
                rows += [("chg", x, y) for x, y in zip(left[c0:c1], right[d0:d1], strict=True)]
                continue
            rows += [("del", x, None) for x in left[c0:c1]]
            rows += [("add", None, y) for y in right[d0:d1]]
    return rows


def _row(kind: str, left: Line | None, right: Line | None) -> str:
    groups = " ".join(
        dict.fromkeys([*(left.groups if left else ()), *(right.groups if right else ())])
    )
    return (
        f"<tr class='{kind}' data-k='{groups}'><td class='l'>{_cell(left)}</td>"
        f"<td class='r'>{_cell(right)}</td></tr>"
    )


def _cell(line: Line | None) -> str:
    if line is None:
        return ""
    note = f"  <span class='note'># {escape(line.note)}</span>" if line.note else ""
    return escape(line.code) + note


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='data'><tr>{head}</tr>{body}</table>"
