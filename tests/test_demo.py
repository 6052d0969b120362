"""The `sparsefx` command line and an end-to-end run of the demo on digits."""

import pytest
import torch

from sparsefx.tools import demo
from sparsefx.tools.cli import main
from sparsefx.tools.datasets import load_fashion_mnist


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["demo", "--density", "1.5"], "--density"),
        (["demo", "--density", "0"], "--density"),
        (["demo", "--density", "abc"], "--density"),
        (["demo", "--epochs", "0"], "--epochs"),
        (["demo", "--dataset", "cifar"], "--dataset"),
        ([], "COMMAND"),
    ],
)
def test_cli_rejects_bad_arguments_in_one_line(capsys, argv, named):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparsefx")
    assert "error" in err and named in err


def test_cli_help_exits_zero(capsys):
    assert main(["demo", "--help"]) == 0
    assert "--density" in capsys.readouterr().out


def test_cli_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(demo.DATASETS, "fashion-mnist", lambda: load_fashion_mnist(tmp_path))
    assert main(["demo", "--dataset", "fashion-mnist"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "apt-get install dataset-fashion-mnist" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": "cifar"}, "unknown dataset"),
        ({"density": 0.0}, "density"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_run_demo_validates_its_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        demo.run_demo(**kwargs)


def test_run_demo_on_digits_end_to_end(capsys):
    # Two epochs: one of VR-PGE mask search, one fine-tuning the frozen mask.
    results = demo.run_demo("digits", density=0.2, epochs=2)
    assert [(r.model, r.method) for r in results] == [
        ("cnn", "dense"),
        ("cnn", "sparsefx"),
        ("mlp", "dense"),
        ("mlp", "sparsefx"),
    ]
    for dense, sparse in (results[:2], results[2:]):
        assert dense.accuracy > 0.7 and sparse.accuracy > 0.4  # chance is 0.1
        assert dense.density == dense.flops_fraction == dense.speedup == 1.0
        assert abs(sparse.density - 0.2) < 0.05
        assert 0.0 < sparse.flops_fraction < 0.2  # two pruned layers: FLOPs fall ~ density^2
        assert dense.ms_per_step > 0 and sparse.ms_per_step > 0
        assert sparse.speedup == pytest.approx(dense.ms_per_step / sparse.ms_per_step)
    out = capsys.readouterr().out
    assert "digits: 1437 train / 360 test, 2 epochs" in out
    assert out.count("sparsefx ") == 2 and "speedup" in out


@pytest.mark.parametrize("side", [8, 28])
def test_demo_models_fit_digits_and_fashion_mnist_images(side):
    x = torch.rand(3, 1, side, side)
    for model in demo.build_models(x, num_classes=10).values():
        assert model(x).shape == (3, 10)


def test_sparse_mlp_on_digits_is_within_two_points_of_dense():
    """Issue 2's accuracy bar: density 0.2, same epochs and data order as dense, in the mean
    over three seeds. One seed's gap follows the machine's floating-point rounding through 20
    epochs (seed 0 here: 1.4 points, and the bar failed on another CPU)."""
    data = demo.load_digits()
    epochs = demo.DEFAULT_EPOCHS["digits"]
    gaps = []
    for seed in range(3):
        batches = demo._batch_order(len(data.y_train), epochs, seed=seed)
        torch.manual_seed(seed)
        mlp = demo.build_models(data.x_train, data.num_classes)["mlp"]
        with demo.tqdm(total=sum(map(len, batches)), disable=True) as bar:
            dense, sparse = demo._train_pair("mlp", mlp, data, batches, 0.2, bar)
        assert dense.accuracy > 0.9
        assert abs(sparse.density - 0.2) < 0.03
        gaps.append(dense.accuracy - sparse.accuracy)
    assert sum(gaps) / len(gaps) <= 0.02, gaps
