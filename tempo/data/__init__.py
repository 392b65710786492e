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
    source: str = ""  # what was read, in words (files and image counts)
    val_x: torch.Tensor | None = None  # held out of the training images (`hold_out`)
    val_y: torch.Tensor | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def counts(self) -> dict:
        """Images per part: train, val (0 when none is held out), test."""
        return {"train": len(self.train_x), "val": 0 if self.val_x is None else len(self.val_x),
                "test": len(self.test_x)}


def hold_out(split: Split, fraction: float, seed: int) -> Split:
    """`split` with `fraction` of its training images held out for validation (a seeded choice,
    the same for every run with this seed); ``fraction = 0`` holds none out."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the validation fraction must be in [0, 1), not {fraction}")
    n_val = int(round(len(split.train_x) * fraction))
    if n_val == 0:
        return split
    if n_val >= len(split.train_x):
        raise ValueError("holding out that many images leaves none to train on")
    order = torch.randperm(len(split.train_x), generator=torch.Generator().manual_seed(seed + 1))
    val, train = order[:n_val], order[n_val:]
    return Split(split.train_x[train], split.train_y[train], split.test_x, split.test_y, split.classes,
                 split.source, split.train_x[val], split.train_y[val])


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
    split = _split(x, y, test_fraction, seed, 10)
    split.source = f"the shipped 8x8 digits ({len(x):,} images)"
    return split


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))


def load_cifar10(data_dir: str | Path, limit: int | None = None, partial: bool = False) -> Split:
    """CIFAR-10 in its python format (``cifar-10-batches-py``: ``data_batch_1..5``, ``test_batch``).

    Images are normalised with the usual per-channel mean and std. `limit` keeps the first N
    images of each split (for quick runs). A folder that lacks some training batches is refused
    unless `partial`; a batch that does not read back (truncated, corrupt, not CIFAR) is an error
    naming the file.
    """
    root = Path(data_dir)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    train_files = [root / name for name in CIFAR_TRAIN_FILES if (root / name).is_file()]
    test_file = root / "test_batch"
    if not train_files or not test_file.is_file():
        raise FileNotFoundError(
            f"no CIFAR-10 python batches under {data_dir} (expected data_batch_1..5 and test_batch; "
            "nothing is downloaded)"
        )
    if len(train_files) < len(CIFAR_TRAIN_FILES) and not partial:
        missing = [name for name in CIFAR_TRAIN_FILES if not (root / name).is_file()]
        raise FileNotFoundError(
            f"the CIFAR-10 folder {root} lacks {', '.join(missing)} (it has {len(train_files)} of 5 training "
            "batches); complete it, or pass --partial-data to train on what is there"
        )

    def read(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for path in paths:
            try:
                with open(path, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
            except Exception as exc:  # noqa: BLE001 - pickle raises many kinds for a bad file
                raise ValueError(f"{path} is not a readable CIFAR-10 batch (truncated or corrupt? "
                                 f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
            data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
            labels = batch.get(b"labels", batch.get("labels")) if isinstance(batch, dict) else None
            if data is None or labels is None:
                raise ValueError(f"{path} is not a CIFAR-10 python batch (no data and labels)")
            data = np.asarray(data, dtype=np.uint8)
            labels = np.asarray(labels, dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
                raise ValueError(f"{path} is not a CIFAR-10 python batch ({data.shape} data, {len(labels)} labels; "
                                 "expected N×3072 and N labels)")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(labels)
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
    names = ", ".join(p.name for p in train_files)
    source = (f"CIFAR-10 from {root}: {names} ({len(train_x):,} training images), "
              f"test_batch ({len(test_x):,} test images)")
    return Split(train_x, train_y, test_x, test_y, 10, source)


def synthetic(shape: tuple[int, ...] = (3, 32, 32), classes: int = 10, n_train: int = 512,
              n_test: int = 128, seed: int = 0) -> Split:
    """Random images with a learnable label (a fixed random linear rule), for benchmarks and tests."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, *shape, generator=g)
    w = torch.randn(int(np.prod(shape)), classes, generator=g)
    y = (x.flatten(1) @ w).argmax(dim=1)
    return Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes,
                 f"synthetic {'x'.join(map(str, shape))} images ({n_train + n_test:,})")


def load(name: str, data_dir: str | None = None, seed: int = 0, partial: bool = False) -> Split:
    """The data set `name`; `data_dir` only for cifar10 (the others ship or are made here)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; one of {DATASETS}")
    if name != "cifar10" and data_dir is not None:
        raise ValueError(f"--data-dir is for cifar10 only; {name} needs none (it is "
                         f"{'shipped with the package' if name == 'digits' else 'made here'})")
    if name == "digits":
        return load_digits(seed=seed)
    if name == "cifar10":
        if data_dir is None:
            raise ValueError("--data-dir is needed for cifar10 (its python-format batches; nothing is downloaded)")
        return load_cifar10(data_dir, partial=partial)
    return synthetic(seed=seed)
