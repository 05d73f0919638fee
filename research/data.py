"""Fashion-MNIST from Debian's dataset-fashion-mnist package (idx files, gzipped)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetMissingError(FileNotFoundError):
    pass


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str, data_dir: Path | str = DEFAULT_DATA_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 in [-1, 1] with shape (N, 1, 28, 28), and int64 labels."""
    data_dir = Path(data_dir)
    image_file, label_file = (data_dir / name for name in _FILES[split])
    for f in (image_file, label_file):
        if not f.is_file():
            raise DatasetMissingError(
                f"Fashion-MNIST file not found: {f}. Install it with "
                "'apt-get install dataset-fashion-mnist' (Debian), or pass --data-dir."
            )
    images = torch.from_numpy(_read_idx(image_file).copy()).float().div(127.5).sub(1.0).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(label_file).astype(np.int64))
    return images, labels
