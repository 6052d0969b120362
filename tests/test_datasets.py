"""The packaged datasets: shapes, dtypes, determinism, and the Fashion-MNIST IDX reader."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sk_load_digits

from sparsefx.tools.datasets import load_digits, load_fashion_mnist


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(len(x), -1).numpy()}


def test_digits_shapes_dtypes_and_ranges():
    split = load_digits()
    assert split.x_train.shape == (1437, 1, 8, 8) and split.x_test.shape == (360, 1, 8, 8)
    assert split.x_train.dtype == split.x_test.dtype == torch.float32
    assert split.y_train.dtype == split.y_test.dtype == torch.int64
    assert split.x_train.min() == 0.0 and split.x_train.max() == 1.0
    assert split.num_classes == 10
    assert set(split.y_train.tolist()) == set(split.y_test.tolist()) == set(range(10))


def test_digits_split_is_a_disjoint_partition_of_the_dataset():
    split = load_digits()
    train, test = _rows(split.x_train), _rows(split.x_test)
    full = _rows(torch.from_numpy((sk_load_digits().images / 16.0).astype(np.float32)))
    assert not train & test
    assert train | test == full


def test_digits_split_is_stratified():
    split = load_digits()
    train_counts = torch.bincount(split.y_train, minlength=10).float()
    test_counts = torch.bincount(split.y_test, minlength=10).float()
    share = test_counts / (train_counts + test_counts)
    assert torch.all((share - 0.2).abs() < 0.01), share


def test_digits_is_deterministic_per_seed():
    first, again, other = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)
    assert not torch.equal(first.x_train, other.x_train)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format: 0x0000, type 0x08 (unsigned byte), ndim, big-endian dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def fake_fashion(tmp_path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28)),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 12),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (5, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 5),
    }
    arrays["train-images-idx3-ubyte.gz"][0, 0, 0] = 255
    for name, array in arrays.items():
        _write_idx(tmp_path / name, array)
    return arrays


def test_fashion_mnist_reads_idx_files(tmp_path, fake_fashion):
    split = load_fashion_mnist(tmp_path)
    images = fake_fashion["train-images-idx3-ubyte.gz"]
    assert split.x_train.shape == (12, 1, 28, 28) and split.x_test.shape == (5, 1, 28, 28)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    assert torch.allclose(split.x_train[:, 0], torch.from_numpy(images / 255.0).float())
    assert split.x_train[0, 0, 0, 0] == 1.0
    assert split.y_train.tolist() == fake_fashion["train-labels-idx1-ubyte.gz"].tolist()
    assert split.y_test.tolist() == fake_fashion["t10k-labels-idx1-ubyte.gz"].tolist()
    assert split.num_classes == 10


def test_fashion_mnist_limit_keeps_the_first_examples(tmp_path, fake_fashion):
    split = load_fashion_mnist(tmp_path, limit=3)
    assert len(split.x_train) == len(split.y_train) == len(split.x_test) == 3
    assert split.y_train.tolist() == fake_fashion["train-labels-idx1-ubyte.gz"][:3].tolist()


def test_fashion_mnist_rejects_a_nonpositive_limit(tmp_path, fake_fashion):
    with pytest.raises(ValueError, match="limit"):
        load_fashion_mnist(tmp_path, limit=0)


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(tmp_path)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "Debian/Ubuntu" in message and "train-images-idx3-ubyte.gz" in message


def test_fashion_mnist_rejects_a_file_that_is_not_idx(tmp_path, fake_fashion):
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"not an idx file"))
    with pytest.raises(ValueError, match="not an IDX file"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_rejects_a_truncated_file(tmp_path, fake_fashion):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-10]))
    with pytest.raises(ValueError, match="its header says"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_rejects_mismatched_image_and_label_counts(tmp_path, fake_fashion):
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4))
    with pytest.raises(ValueError, match="differ in count"):
        load_fashion_mnist(tmp_path)
