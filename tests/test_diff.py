"""The graph-diff tool: `sparsefx.diff`, `sparsefx.explain`, `sparsefx diff` and the HTML report."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsefx
from sparsefx.tools import report
from sparsefx.tools.cli import main
from tests import diff_models

SNAPSHOTS = Path(__file__).parent / "snapshots"
TINY = str(Path(diff_models.__file__)) + ":tiny"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models.py"


def _check_snapshot(name: str, text: str) -> None:
    """Compare with tests/snapshots/NAME; SPARSEFX_UPDATE_SNAPSHOTS=1 rewrites it."""
    path = SNAPSHOTS / name
    if os.environ.get("SPARSEFX_UPDATE_SNAPSHOTS") == "1":
        path.write_text(text)
    assert path.exists(), f"no snapshot {path}; run with SPARSEFX_UPDATE_SNAPSHOTS=1 to create it"
    assert text == path.read_text(), f"{name} changed; if on purpose, update the snapshot"


def _tiny_report(**kwargs) -> sparsefx.Report:
    model, x = diff_models.tiny()
    return sparsefx.diff(model, (x,), density=0.5, **kwargs)


# -- text format ------------------------------------------------------------------------------


def test_diff_text_snapshot():
    _check_snapshot("tiny_diff.txt", _tiny_report().text(context=1))


def test_explain_text_snapshot():
    model, x = diff_models.tiny()
    smodel = sparsefx.transform(model, (x,), config=sparsefx.SparseConfig(density=0.5, seed=0))
    _check_snapshot("tiny_explain.txt", sparsefx.explain(smodel))


def test_listings_are_identical_across_runs():
    first, second = _tiny_report(), _tiny_report()
    assert first.text(context=1000) == second.text(context=1000)


def test_compact_shapes_are_symbolic_in_kept_counts():
    graph = _tiny_report().graphs[0]
    lines = {line.node: line for line in graph.compact.lines}
    assert lines["idx_conv1"].code.startswith("idx_conv1: i64[k_0] = input")
    # on CPU a compact conv runs on rounded channel counts; its output has the exact ones
    assert lines["conv2d_1"].code.startswith(
        "conv2d_1: f32[s0, k_0, 8, 8] = sparsefx.bucketed_convolution("
    )
    assert lines["gather_weight_default_1"].code.startswith(
        "gather_weight_default_1: f32[k_1, k_0, 3, 3]"
    )
    captured = {line.node: line for line in graph.captured.lines}
    assert captured["conv2d_1"].code.startswith("conv2d_1: f32[s0, 6, 8, 8]")
    assert graph.compact.problem is None and graph.score.problem is None


def test_every_node_says_what_sparsefx_did_to_it():
    graph = _tiny_report().graphs[0]
    notes = {line.node: line.note for line in graph.compact.lines}
    assert notes["p_conv1_weight"] == "parameter conv1.weight"
    assert notes["b_bn1_running_mean"] == "buffer bn1.running_mean"
    assert notes["x"] == "model input"
    assert notes["conv2d_1"] == "prunable producer of k_0"
    assert notes["relu_1"] == "compact k_0 on dim 1; mask point of k_0"
    assert notes["conv2d"].startswith("dense: add.Tensor (add) joins it with a full-width")
    assert notes["linear"] == "dense: output layer: its channels reach the model output or loss"
    assert notes["scatter_channels_default"] == (
        "scatter k_1 to full width for mul_4: mul.Tensor with a full-width tensor that is not "
        "pruned alongside"
    )
    assert notes["index_copy__default"].startswith("writes kept channels' statistics back to")
    score = {line.node: line for line in graph.score.lines}
    assert "index_copy__default" not in score  # the score graph leaves running stats alone


# -- content on real models -------------------------------------------------------------------


def _assert_complete(report: sparsefx.Report, model, expected_groups: list[str]) -> None:
    """Every group and every dense op with its reason is named, and the costs match stats."""
    text = report.text()
    assert [g.name for g in report.groups] == expected_groups
    for group in report.groups:
        assert re.search(rf"\b{group.symbol}\s+{re.escape(group.name)}\s", text)
    for graph in report.graphs:
        for dense in graph.dense:
            assert re.search(
                rf"{dense.node}\s+{re.escape(dense.op)}\s+{re.escape(dense.reason)}", text
            )
    stats = sparsefx.stats(model)
    flops, params = report.costs.flops, report.costs.params
    assert flops[1] / flops[0] == pytest.approx(stats["flops_fraction"], rel=1e-12)
    assert params[1] / params[0] == pytest.approx(stats["params_fraction"], rel=1e-12)
    assert flops[2] / flops[0] == pytest.approx(stats["expected_flops_fraction"], rel=1e-12)


def _load_examples():
    spec = __import__("importlib.util").util.spec_from_file_location("example_models", EXAMPLES)
    module = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mobilenet_v2_report_is_complete():
    model, x = _load_examples().mobilenet_v2()
    config = sparsefx.SparseConfig(density=0.25)
    report = sparsefx.diff(model, (x,), config=config)
    reference = sparsefx.transform(model, (x,), config=config)
    _assert_complete(report, reference, [g.name for g in sparsefx.groups(reference)])
    assert "grouped conv: gathers the rows of kept conv groups" in report.text()


def _small_hf_resnet() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(
        layer_type="basic", embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1], num_labels=3
    )
    return transformers.ResNetForImageClassification(config)


@pytest.mark.parametrize("mode", ["transform", "compile"])
def test_hf_models_reports_are_complete(mode):
    resnet = _small_hf_resnet()
    x = torch.randn(2, 3, 16, 16)
    report = sparsefx.diff(resnet, (x,), density=0.5, mode=mode)
    reference = sparsefx.transform(resnet, (x,), density=0.5)
    _assert_complete(report, reference, [g.name for g in sparsefx.groups(reference)])
    assert any("residual stream" in d.reason for d in report.graphs[0].dense)


def test_gpt2_compile_report_shows_dynamo_graphs_and_the_break():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=16, use_cache=False
    )
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 64, (2, 8))
    inputs = {"input_ids": ids, "labels": ids}
    report = sparsefx.diff(model, (), density=0.5, mode="compile", example_kwargs=inputs)
    transformed = sparsefx.diff(model, (), density=0.5, example_kwargs=inputs)
    reference = sparsefx.transform(model, (), density=0.5, example_kwargs=inputs)
    _assert_complete(transformed, reference, [g.name for g in sparsefx.groups(reference)])
    assert [g.name for g in report.groups] == [g.name for g in transformed.groups]
    assert len(report.graphs) == 2  # Hugging Face computes the loss after a graph break
    first, second = report.graphs
    assert first.graph_break and "modeling_gpt2.py" in first.graph_break
    assert first.dynamo is not None and any("input_ids" in line.node for line in first.dynamo.lines)
    assert any("cross_entropy" in line.code for line in second.compact.lines)
    text = report.text()
    assert "ends at a graph break: " in text and "-- Dynamo graph" in text
    assert "dropout noise, shared with the score forwards" in text


def test_unchanged_nodes_are_unchanged_lines():
    """Names survive the copy the passes run on (nn.Sequential's ``input``), and sizes that
    export fixed stay numbers: only what sparsefx rewrote shows up in the diff."""
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    graph = sparsefx.diff(mlp, (torch.randn(2, 4),), density=0.5).graphs[0]
    before = {line.node: line.render() for line in graph.captured.lines}
    after = {line.node: line.render() for line in graph.compact.lines}
    assert after["input"] == before["input"] == "input: f32[s0, 4] = input  # model input"

    attention = torch.nn.MultiheadAttention(16, 2, batch_first=True)  # export fixes sizes
    x = torch.randn(2, 10, 16)
    with pytest.warns(UserWarning, match="nothing to prune"):
        graph = sparsefx.diff(attention, (x, x, x), density=0.5).graphs[0]
    assert graph.compact.text() == graph.captured.text()


def test_repeated_compile_mode_diffs_leave_dynamo_usable():
    model, x = diff_models.tiny()
    for _ in range(10):  # more than Dynamo's recompile limit (8)
        assert len(sparsefx.diff(model, (x,), density=0.5, mode="compile").groups) == 3
    compiled = torch.compile(model, backend="sparsefx", options={"density": 0.5})
    compiled(x)
    assert [g.name for g in sparsefx.groups(compiled)] == ["conv1", "conv2", "gate"]


def test_compile_mode_errors_are_capture_errors_with_the_source_line():
    model, _ = diff_models.tiny()
    with pytest.raises(sparsefx.CaptureError, match="rejects the example inputs"):
        sparsefx.diff(model, (torch.randn(2, 1, 8, 8),), density=0.5, mode="compile")
    with pytest.raises(sparsefx.CaptureError) as caught:
        sparsefx.diff(diff_models.Untraceable(), (torch.randn(2, 4),), density=0.5, mode="compile")
    assert "return self.out(opaque(self.fc(x)))" in str(caught.value)
    assert "sparsefx_test::opaque" in str(caught.value)


def test_explain_a_compiled_model_with_a_break_and_one_with_nothing_to_prune():
    model = diff_models.BreakBeforeHead()
    compiled = torch.compile(model, backend="sparsefx", options={"density": 0.5})
    with pytest.warns(UserWarning, match="graph break"):
        compiled(torch.randn(2, 4))
    text = sparsefx.explain(compiled)
    assert text.count("== graph ") == 2 and "ends at a graph break: " in text

    linear = torch.nn.Linear(4, 2)
    compiled = torch.compile(linear, backend="sparsefx", options={"density": 0.5})
    with pytest.warns(UserWarning, match="nothing to prune"):
        compiled(torch.randn(2, 4))
    text = sparsefx.explain(compiled)
    assert "groups: none" in text and "nothing is pruned" in text


def test_compile_mode_leaves_the_users_model_alone():
    model, x = diff_models.tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = sparsefx.diff(model, (x,), density=0.5, mode="compile")
    assert [g.name for g in report.groups] == ["conv1", "conv2", "gate"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match=r"expected a model returned by sparsefx\.transform"):
        sparsefx.groups(model)  # no runtime was registered for it


def test_explain_a_compiled_model():
    model, x = diff_models.tiny()
    compiled = torch.compile(model, backend="sparsefx", options={"density": 0.5, "seed": 0})
    model.eval()
    compiled(x)
    text = sparsefx.explain(compiled)
    assert text.startswith("sparsefx explain: Tiny (compile mode)")
    assert "prunable producer of k_0" in text and "-- compact graph --" in text


def test_explain_rejects_a_plain_model():
    with pytest.raises(TypeError, match=r"call sparsefx\.transform"):
        sparsefx.explain(torch.nn.Linear(2, 2))


def test_diff_rejects_an_unknown_mode():
    model, x = diff_models.tiny()
    with pytest.raises(ValueError, match=r"mode must be one of \['transform', 'compile'\]"):
        sparsefx.diff(model, (x,), density=0.5, mode="eager")


def test_sympy_expressions_on_request():
    report = _tiny_report()
    assert "FLOPs  = " not in report.text()
    assert f"FLOPs  = {report.costs.flops_expr}" in report.text(sympy=True)
    assert "k_0*k_1" in str(report.costs.flops_expr)  # conv2 is bilinear in two groups


# -- errors -----------------------------------------------------------------------------------


def test_capture_error_names_the_source_line():
    model, x = diff_models.data_dependent()
    with pytest.raises(sparsefx.CaptureError) as caught:
        sparsefx.diff(model, (x,), density=0.5)
    message = str(caught.value)
    assert f"{diff_models.__file__}:" in message
    assert "if h.sum() > 0:" in message
    assert "The model runs on these inputs, but cannot be traced" in message


def test_capture_error_names_an_op_without_a_meta_kernel():
    with pytest.raises(sparsefx.CaptureError) as caught:
        sparsefx.transform(diff_models.Untraceable(), (torch.randn(2, 4),), density=0.5)
    message = str(caught.value)
    assert "sparsefx_test::opaque" in message
    assert "in forward: return self.out(opaque(self.fc(x)))" in message


def test_wrong_input_shape_is_blamed_on_the_inputs():
    model, _ = diff_models.tiny()
    with pytest.raises(sparsefx.CaptureError) as caught:
        sparsefx.transform(model, (torch.randn(2, 1, 8, 8),), density=0.5)
    message = str(caught.value)
    assert message.startswith("Tiny rejects the example inputs [float32[2, 1, 8, 8]]")
    assert "diff_models.py" in message and "self.stem(x)" in message


# -- command line -----------------------------------------------------------------------------


def test_cli_prints_the_diff_and_writes_html(capsys, tmp_path):
    html = tmp_path / "report.html"
    assert main(["diff", TINY, "--density", "0.5", "--context", "1", "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sparsefx diff: Tiny (transform mode), density 0.5")
    assert "+conv2d_1: f32[s0, k_0, 8, 8]" in out
    assert out.endswith(f"HTML report: {html}\n")
    assert "conv1" in html.read_text() and "http" not in html.read_text().split("<svg")[0]


def test_cli_input_shape_and_options(capsys):
    argv = ["diff", TINY, "--input-shape", "4,3,8,8", "--density", "0.5"]
    argv += ["--option", "prune_streams=True"]
    assert main([*argv, "--option", "budget=flops", "--sympy"]) == 0
    out = capsys.readouterr().out
    assert "prune_streams True" in out and "budget flops" in out and "FLOPs  = " in out


def test_cli_inputs_file(capsys, tmp_path):
    path = tmp_path / "inputs.pt"
    torch.save((torch.randn(2, 3, 8, 8),), path)
    assert main(["diff", TINY, "--inputs", str(path), "--mode", "compile", "--density", "0.5"]) == 0
    assert "(compile mode)" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["transform", "compile"])
def test_cli_a_density_below_the_groups_minimum_is_a_usage_error(capsys, mode):
    argv = ["diff", TINY, "--input-shape", "2,3,8,8", "--mode", mode, "--density", "0.1"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "sparsefx: error: density=0.1 cannot hold" in error
    assert "density of at least 0.2728" in error and error.count("\n") == 1


@pytest.mark.parametrize(
    ("spec", "extra", "message"),
    [
        ("no_colon", [], "expected MODULE:FACTORY"),
        ("no.such.module:build", [], "cannot import 'no.such.module'"),
        ("missing.py:build", [], "no such file: missing.py"),
        (f"{diff_models.__file__}:nope", [], "has no function 'nope'; it defines: "),
        (f"{diff_models.__file__}:broken", [], "raised RuntimeError: cannot build this model"),
        (f"{diff_models.__file__}:not_a_model", [], "returned int; it must return an nn.Module"),
        (f"{diff_models.__file__}:Tiny", [], "no example inputs: pass --input-shape"),
        (TINY, ["--inputs", "missing.pt"], "no such file: missing.pt"),
        (TINY, ["--option", "colour=red"], "unknown sparsefx option(s) ['colour']"),
        (TINY, ["--option", "novalue"], "--option takes KEY=VALUE"),
        (f"{diff_models.__file__}:Tiny", [], "no example inputs: pass --input-shape"),
    ],
)
def test_cli_usage_errors_say_what_to_change(capsys, spec, extra, message):
    assert main(["diff", spec, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsefx: error: ") and message in err


def test_cli_kernels_option_that_cannot_run_here_is_a_usage_error(capsys, monkeypatch):
    """kernels=triton on a CPU model outside Triton's interpreter (which the test session
    turns on) is the user's option to change: one line, exit status 2."""
    monkeypatch.setattr(sparsefx.kernels, "interpreting", lambda: False)
    assert main(["diff", TINY, "--option", "kernels=triton"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsefx: error: invalid --option: kernels='triton' runs on CUDA")


def test_cli_factories_import_from_the_current_directory_and_beside_their_file(
    capsys, tmp_path, monkeypatch
):
    (tmp_path / "layers.py").write_text("import torch\nWIDTH = 8\n")
    (tmp_path / "nets.py").write_text(
        "import torch\n"
        "def build():\n"
        "    import layers  # a sibling module, imported when the factory runs\n"
        "    net = torch.nn.Sequential(torch.nn.Linear(4, layers.WIDTH), torch.nn.ReLU(),\n"
        "                              torch.nn.Linear(layers.WIDTH, 2))\n"
        "    return net, torch.randn(2, 4)\n"
    )
    (tmp_path / "broken_import.py").write_text("raise RuntimeError('no GPU here')\n")
    assert main(["diff", f"{tmp_path / 'nets.py'}:build", "--density", "0.5"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["diff", "nets:build", "--density", "0.5"]) == 0
    assert capsys.readouterr().out.count("groups (1)") == 2
    assert main(["diff", "broken_import:build"]) == 2
    assert "importing broken_import failed: RuntimeError: no GPU here" in capsys.readouterr().err


def test_cli_capture_error_exits_one_with_the_source_line(capsys):
    assert main(["diff", f"{diff_models.__file__}:data_dependent"]) == 1
    assert "if h.sum() > 0:" in capsys.readouterr().err


def test_cli_wrong_input_shape(capsys):
    assert main(["diff", TINY, "--input-shape", "2,1,8,8"]) == 1
    assert "Tiny rejects the example inputs [float32[2, 1, 8, 8]]" in capsys.readouterr().err


def test_console_script_runs_the_examples_factory():
    """The README's command, through the installed entry point, on a real factory."""
    script = Path(sys.executable).with_name("sparsefx")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sparsefx.tools.cli"]
    result = subprocess.run(
        [*command, "diff", f"{EXAMPLES}:mobilenet_v2", "--density", "0.25", "--context", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "groups (12)" in result.stdout and "grouped conv" in result.stdout


# -- HTML in a browser ------------------------------------------------------------------------


def _chromium() -> str:
    """The browser is part of the test set-up, not optional hardware: without it the test
    fails, saying what to install."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "the HTML report test needs Debian's chromium: apt-get install chromium "
            "(make test installs it when run as root)"
        )
    return found


def test_html_report_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    model = _small_hf_resnet()
    config = sparsefx.SparseConfig(density=0.5, prune_streams=True)
    report = sparsefx.diff(model, (torch.randn(2, 3, 16, 16),), config=config)
    path = report.save_html(tmp_path / "report.html")
    html = path.read_text()
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", html), (
        "the report must not load anything"
    )
    result = subprocess.run(
        [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
            "--v=0", "--virtual-time-budget=2000", "--dump-dom", path.as_uri(),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], f"the page logged to the console: {console}"
    dom = result.stdout
    assert "<svg" in dom and "Coupling groups" in dom
    for group in report.groups:
        assert f"<b>{group.name}</b>" in dom
        assert f'data-k="{group.symbol}"' in dom
    assert dom.count('<tr class="chg"') > 0 and dom.count('<tr class="add"') > 0


class ScoresWithBias(torch.nn.Module):
    """``baddbmm`` with a bias broadcast over the batch: its C++ meta kernel fails on a
    symbolic batch size, so the listing runs the Python dispatcher's decomposition."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(6, 8), torch.nn.Linear(5, 3)
        self.bias = torch.nn.Parameter(torch.zeros(1, 5, 5))

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(torch.baddbmm(self.bias, h, h.transpose(1, 2)))


def test_explain_lists_shapes_through_a_baddbmm_with_a_symbolic_batch():
    torch.manual_seed(0)
    sparse = sparsefx.transform(ScoresWithBias(), torch.randn(3, 5, 6), density=0.5)
    text = sparsefx.explain(sparse)
    assert "baddbmm: f32[s0, 5, 5] = aten.baddbmm(" in text and "shapes stop" not in text


def test_explain_says_where_shapes_stop_without_logging_the_fake_tensor_error(caplog, monkeypatch):
    """Fake tensors logged a failing meta kernel as an error with its traceback, twice, on
    stderr of an `explain` that then reported it in one line. Here a bias made not to
    broadcast over the batch fails baddbmm's meta kernel."""
    torch.manual_seed(0)
    sparse = sparsefx.transform(ScoresWithBias(), torch.randn(3, 5, 6), density=0.5)
    fake_input = report._FakeShapes._input

    def bias_of_two_rows(self, node):
        value = fake_input(self, node)
        return torch.empty(2, 5, 5) if node.name == "p_bias" else value

    monkeypatch.setattr(report._FakeShapes, "_input", bias_of_two_rows)
    with caplog.at_level("DEBUG"):
        text = sparsefx.explain(sparse)
    assert "note: compact graph: shapes stop at baddbmm, which failed on fake tensors" in text
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
