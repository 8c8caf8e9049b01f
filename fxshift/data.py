"""Small real datasets that work offline: Fashion-MNIST (local copies first) and sklearn digits."""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import TensorDataset

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
# Per-pixel mean and standard deviation of the Fashion-MNIST training images (scaled to [0, 1]).
_FASHION_MEAN, _FASHION_STD = 0.2860, 0.3530


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array, with its header checked."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(dims)):
        raise ValueError(f"{path}: size {len(data)} does not match its header {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_fashion_files(split: str, root: Optional[Path]) -> Optional[tuple[Path, Path]]:
    names = (f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte")
    folders = [p for p in (root, root / "FashionMNIST" / "raw" if root else None, DEBIAN_FASHION_MNIST) if p]
    for folder in folders:
        for suffix in ("", ".gz"):
            paths = tuple(folder / (n + suffix) for n in names)
            if all(p.exists() for p in paths):
                return paths
    return None


def default_root() -> Path:
    return Path(os.environ.get("FXSHIFT_DATA", Path.home() / ".cache" / "fxshift"))


def fashion_mnist(train: bool = True, root: Optional[str | os.PathLike] = None, limit: Optional[int] = None
                  ) -> TensorDataset:
    """Fashion-MNIST as a TensorDataset of normalised (N, 1, 28, 28) float images and int64 labels.

    Looks in `root` (default $FXSHIFT_DATA or ~/.cache/fxshift), then Debian's dataset-fashion-mnist
    package (/usr/share/datasets/fashion-mnist), then downloads with torchvision into `root`.
    `limit` keeps the first N samples.
    """
    split = "train" if train else "t10k"
    folder = Path(root) if root is not None else default_root()
    files = _find_fashion_files(split, folder)
    if files is None:
        try:
            import torchvision
        except ImportError as exc:
            raise FileNotFoundError(
                "Fashion-MNIST not found: install Debian's dataset-fashion-mnist package "
                "(apt-get install dataset-fashion-mnist) or torchvision to download it") from exc
        torchvision.datasets.FashionMNIST(str(folder), train=train, download=True)
        files = _find_fashion_files(split, folder)
        if files is None:
            raise FileNotFoundError(f"Fashion-MNIST download into {folder} did not produce the IDX files")
    images, labels = (_read_idx(p) for p in files)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = (torch.from_numpy(images.astype(np.float32) / 255.0) - _FASHION_MEAN) / _FASHION_STD
    return TensorDataset(x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


def digits(train: bool = True, test_fraction: float = 0.25, seed: int = 0) -> TensorDataset:
    """sklearn's 8×8 digits (1,797 images, shipped in its wheel) as (N, 1, 8, 8) floats in [0, 1],
    split deterministically into train and test parts."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    part = order[n_test:] if train else order[:n_test]
    return TensorDataset(x[part], y[part])
