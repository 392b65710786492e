"""Data sets: the 8×8 digits shipped with the package, CIFAR-10 from a user's path, synthetic data.

Every loader returns a `Split` of float32 images ``(N, C, H, W)`` and int64 labels. Splits are
deterministic (a seeded permutation), and nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

DATASETS = ("digits", "cifar10", "synthetic")


@dataclass
class Split:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: int

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int, classes: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test], classes)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """The shipped digits: 1,797 images (1×8×8, scaled to [0, 1]), 10 classes, CC BY 4.0."""
    with resources.files(__package__).joinpath("digits.csv.gz").open("rb") as f:
        raw = np.loadtxt(gzip.open(f), delimiter=",", dtype=np.float32)
    x = torch.from_numpy(raw[:, :64] / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(raw[:, 64].astype(np.int64))
    return _split(x, y, test_fraction, seed, 10)


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def load_cifar10(data_dir: str | Path, limit: int | None = None) -> Split:
    """CIFAR-10 in its python format (``cifar-10-batches-py``: ``data_batch_1..5``, ``test_batch``).

    Images are normalised with the usual per-channel mean and std. `limit` keeps the first N
    images of each split (for quick runs).
    """
    root = Path(data_dir)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    train_files = sorted(root.glob("data_batch_*"))
    test_file = root / "test_batch"
    if not train_files or not test_file.exists():
        raise FileNotFoundError(
            f"no CIFAR-10 python batches under {data_dir} (expected data_batch_1..5 and test_batch; "
            "nothing is downloaded)"
        )

    def read(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for path in paths:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = batch.get(b"data", batch.get("data"))
            labels = batch.get(b"labels", batch.get("labels"))
            if data is None or labels is None:
                raise ValueError(f"{path} is not a CIFAR-10 python batch")
            xs.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(labels, dtype=np.int64))
        x = torch.from_numpy(np.concatenate(xs)).float() / 255.0
        mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
        y = torch.from_numpy(np.concatenate(ys))
        if limit is not None:
            x, y = x[:limit], y[:limit]
        return x, y

    train_x, train_y = read(train_files)
    test_x, test_y = read([test_file])
    return Split(train_x, train_y, test_x, test_y, 10)


def synthetic(shape: tuple[int, ...] = (3, 32, 32), classes: int = 10, n_train: int = 512,
              n_test: int = 128, seed: int = 0) -> Split:
    """Random images with a learnable label (a fixed random linear rule), for benchmarks and tests."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, *shape, generator=g)
    w = torch.randn(int(np.prod(shape)), classes, generator=g)
    y = (x.flatten(1) @ w).argmax(dim=1)
    return Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes)


def load(name: str, data_dir: str | None = None, seed: int = 0) -> Split:
    if name == "digits":
        return load_digits(seed=seed)
    if name == "cifar10":
        if data_dir is None:
            raise ValueError("--data-dir is needed for cifar10 (its python-format batches; nothing is downloaded)")
        return load_cifar10(data_dir)
    if name == "synthetic":
        return synthetic(seed=seed)
    raise ValueError(f"unknown dataset {name!r}; one of {DATASETS}")
