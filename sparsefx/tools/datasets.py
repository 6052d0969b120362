"""Small real datasets that ship in packages, so demos and benchmarks never download."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


@dataclass(frozen=True, eq=False)
class Split:
    """A train/test split: images float32 [N, 1, H, W] in [0, 1], labels int64 [N]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def load_digits(seed: int = 0) -> Split:
    """scikit-learn's bundled 8x8 digits with a fixed stratified 80/20 split (seconds-long runs)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install scikit-learn"
        ) from err
    data = sk_load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    labels = data.target.astype(np.int64)
    parts = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=seed)
    x_train, x_test, y_train, y_test = (torch.from_numpy(p) for p in parts)
    return Split(x_train, y_train, x_test, y_test, num_classes=10)


def load_fashion_mnist(root: str | Path = FASHION_MNIST_ROOT, limit: int | None = None) -> Split:
    """Fashion-MNIST from Debian's `dataset-fashion-mnist` (gzipped IDX files under `root`).

    `limit` keeps the first `limit` examples of each split, for quick runs.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be None or >= 1, got {limit}")
    paths = {key: Path(root) / name for key, name in _FASHION_FILES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files missing in {root}: {', '.join(missing)}; "
            "install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu)"
        )
    arrays = {key: _read_idx(path)[:limit] for key, path in paths.items()}
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise ValueError(f"Fashion-MNIST {split} images and labels differ in count in {root}")
    return Split(
        x_train=_images(arrays["x_train"]),
        y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        x_test=_images(arrays["x_test"]),
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        num_classes=10,
    )


def _read_idx(path: Path) -> np.ndarray:
    """Parse one gzipped IDX file of unsigned bytes: magic 0x0000_08_<ndim>, big-endian dims, data."""
    raw = gzip.decompress(path.read_bytes())
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {data.size} bytes of data, its header says {shape}")
    return data.reshape(shape)


def _images(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] -> float32 [N, 1, H, W] in [0, 1]."""
    return torch.from_numpy(pixels.astype(np.float32) / 255.0).unsqueeze(1)
