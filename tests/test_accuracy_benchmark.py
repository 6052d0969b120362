"""benchmarks/accuracy.py end to end on a short digits run: every method trains, freezes and
reports on the device it is given (issue 7's benchmark; the full runs live in RESULTS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
try:
    import accuracy
finally:
    sys.path.pop(0)


def _run_every_method(tmp_path: Path, device: str) -> dict[str, dict]:
    out = tmp_path / "accuracy.json"
    accuracy.main(
        ["--settings", "digits-mlp", "--epochs", "6", "--seeds", "0", "--densities", "0.25",
         "--device", device, "--json", str(out)]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["args"]["device"] == device
    assert (tmp_path / "accuracy_digits-mlp.png").is_file()
    for run in saved["runs"]:  # a search's record: [step, undecided, expected kept per group]
        searched = run["method"].startswith("sparsefx")
        assert bool(run["trace"]) == searched, run["method"]
        assert all(
            len(point) == 4 and point[0] % accuracy.TRACE_EVERY == 0 for point in run["trace"]
        )
    return {row["method"]: row for row in saved["rows"]}


def _check_rows(rows: dict[str, dict]) -> None:
    assert set(rows) == set(accuracy.METHODS)
    dense = rows["dense"]
    assert dense["accuracy"] > 80  # 6 epochs of digits; chance is 10%
    for method, row in rows.items():
        if method == "dense":
            continue
        assert row["accuracy"] > 50, (method, row["accuracy"])
        # freeze(multiple=) rounds down within the budget; static keeps round(0.25 * 512)
        assert 0.2 <= row["achieved_density"] <= 0.25 + 1e-9, (method, row)
        assert row["train_gflops"] > 0 and row["train_seconds"] > 0
        assert len(row["kept"]) == 2 and sum(row["kept"]) <= 0.25 * 1024 + 1e-9, (method, row)
        if method != "paper-code":  # dense masked compute: more FLOPs than dense
            assert row["train_gflops"] < dense["train_gflops"] / 2, (method, row)


def test_every_method_trains_and_reports_on_cpu(tmp_path):
    _check_rows(_run_every_method(tmp_path, "cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU path needs a CUDA GPU")
def test_every_method_trains_and_reports_on_cuda(tmp_path):
    _check_rows(_run_every_method(tmp_path, "cuda"))


def test_static_kept_counts_label_the_run_and_set_its_structure(tmp_path):
    out = tmp_path / "accuracy.json"
    accuracy.main(
        ["--settings", "digits-mlp", "--epochs", "1", "--seeds", "0", "--densities", "0.25",
         "--methods", "static", "--static-kept", "100,200", "--json", str(out)]
    )  # fmt: skip
    (run,) = json.loads(out.read_text())["runs"]
    assert run["method"] == "static@100/200"
    assert run["kept"] == [100, 200]
    assert run["achieved_density"] == pytest.approx(300 / 1024)
    assert run["trace"] == []  # no search


def test_static_masks_train_the_channels_a_sparsefx_run_ended_with(tmp_path):
    searched, fixed = tmp_path / "searched.json", tmp_path / "fixed.json"
    common = ["--settings", "digits-mlp", "--epochs", "1", "--seeds", "0", "--densities", "0.25"]
    accuracy.main([*common, "--methods", "sparsefx-paper", "--json", str(searched)])
    accuracy.main([*common, "--methods", "static", "--static-masks", str(searched),
                   "--json", str(fixed)])  # fmt: skip
    (source,) = json.loads(searched.read_text())["runs"]
    (run,) = json.loads(fixed.read_text())["runs"]
    assert run["method"] == "static@sparsefx-paper"
    assert run["channels"] == source["channels"] and run["kept"] == source["kept"]
    # the same command without --static-masks draws other channels
    accuracy.main([*common, "--methods", "static", "--json", str(fixed)])
    (drawn,) = json.loads(fixed.read_text())["runs"]
    assert drawn["method"] == "static" and drawn["channels"] != source["channels"]
    with pytest.raises(SystemExit, match=r"no sparsefx run of digits-mlp at density 0\.5"):
        accuracy.main([*common[:-1], "0.5", "--methods", "static", "--static-masks", str(searched)])


def test_decided_step_is_where_no_channel_is_undecided_any_more():
    run = accuracy.Run("s", "sparsefx-paper", 0.25, 0)
    run.trace = [[0, 9, 4.0], [25, 0, 4.0], [50, 1, 4.0], [75, 0, 4.0], [100, 0, 4.0]]
    assert run.decided_step() == 75
    run.trace[-1][1] = 2
    assert run.decided_step() is None


def test_restart_lr_restarts_the_cosine_when_the_search_ends(tmp_path, monkeypatch):
    rates: list[float] = []
    step = accuracy.Trainer.step

    def recording(self, x, y):
        rates.append(self.optimizer.param_groups[0]["lr"])
        step(self, x, y)

    monkeypatch.setattr(accuracy.Trainer, "step", recording)
    out = tmp_path / "accuracy.json"
    accuracy.main(
        ["--settings", "digits-mlp", "--epochs", "2", "--seeds", "0", "--densities", "0.25",
         "--methods", "sparsefx-paper,static", "--restart-lr", "--json", str(out)]
    )  # fmt: skip
    assert [run["method"] for run in json.loads(out.read_text())["runs"]] == [
        "sparsefx-paper lr-restart",
        "static lr-restart",
    ]
    per_run = len(rates) // 2
    half = per_run // 2  # the search is the first of two epochs
    peak = accuracy.SETTINGS["digits-mlp"].lr
    for run in (rates[:per_run], rates[per_run:]):
        assert run[0] == run[half] == peak  # the cosine starts again at its peak
        assert 0.4 * peak < run[half - 1] < 0.6 * peak  # from halfway down the first one
        assert run[-1] < peak / 100


def test_validate_scores_on_held_out_training_examples_not_the_test_set(tmp_path, monkeypatch):
    data = accuracy.SETTINGS["digits-mlp"].load()
    held = accuracy.held_out(data, 100)
    assert torch.equal(held.x_test, data.x_train[-100:])
    assert torch.equal(held.y_test, data.y_train[-100:])
    assert torch.equal(held.x_train, data.x_train[:-100])
    scored: list[int] = []
    predict = accuracy.Trainer.predict
    monkeypatch.setattr(
        accuracy.Trainer, "predict", lambda self, x: scored.append(len(x)) or predict(self, x)
    )
    out = tmp_path / "accuracy.json"
    accuracy.main(
        ["--settings", "digits-mlp", "--epochs", "1", "--seeds", "0", "--methods", "dense",
         "--validate", "100", "--json", str(out)]
    )  # fmt: skip
    assert sum(scored) == 100  # the held-out examples, not digits' 360 test images
    assert [run["setting"] for run in json.loads(out.read_text())["runs"]] == ["digits-mlp-val"]
    with pytest.raises(SystemExit, match="hold out between 1 and"):
        accuracy.held_out(data, len(data.x_train))


def test_search_kept_holds_each_group_to_its_count_and_freezes_to_it(tmp_path):
    """--search-kept: each group's expected kept count follows its own budget (the whole
    group, shrinking with the warm-up, to its count), and the search ends on exactly those
    counts; the static method of the same command keeps the density's fraction of each."""
    out = tmp_path / "accuracy.json"
    common = ["--settings", "digits-mlp", "--epochs", "6", "--seeds", "0", "--densities", "0.25"]
    accuracy.main(
        [*common, "--methods", "sparsefx-paper,static", "--search-kept", "96,160",
         "--option", "budget_warmup=10", "--freeze-multiple", "1", "--json", str(out)]
    )  # fmt: skip
    searched, static = json.loads(out.read_text())["runs"]
    assert searched["method"] == "sparsefx-paper@96/160"
    assert searched["kept"] == [96, 160]
    first, *later = searched["trace"]  # [step, undecided, expected kept per group]
    assert first[0] == 0 and first[2:] == pytest.approx([512, 512], abs=1)
    assert later and all(p[0] >= 10 and p[2:] == pytest.approx([96, 160], abs=1) for p in later)
    assert static["method"] == "static" and static["kept"] == [128, 128]
    with pytest.raises(SystemExit, match=r"summing to the density's 256 channels"):
        accuracy.main([*common, "--methods", "sparsefx-paper", "--search-kept", "96,96",
                       "--json", str(out)])  # fmt: skip
