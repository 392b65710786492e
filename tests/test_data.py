import pickle

import numpy as np
import pytest
import torch

from tempo import data


def test_shipped_digits_load_without_download():
    split = data.load_digits()
    assert split.classes == 10 and split.image_shape == (1, 8, 8)
    assert len(split.train_x) + len(split.test_x) == 1797
    assert float(split.train_x.min()) >= 0 and float(split.train_x.max()) <= 1
    assert set(split.train_y.unique().tolist()) == set(range(10))


def test_splits_are_deterministic_and_seeded():
    a, b, c = data.load_digits(seed=0), data.load_digits(seed=0), data.load_digits(seed=1)
    assert torch.equal(a.test_y, b.test_y) and torch.equal(a.train_x, b.train_x)
    assert not torch.equal(a.test_y, c.test_y)


def write_cifar(root, n_per_batch=6, batches=2):
    d = root / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i + 1}" for i in range(batches)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n_per_batch).tolist()}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def test_cifar10_python_format_loads_from_a_user_path(tmp_path):
    split = data.load_cifar10(write_cifar(tmp_path))
    assert split.train_x.shape == (12, 3, 32, 32) and split.test_x.shape == (6, 3, 32, 32)
    assert split.train_y.dtype == torch.int64
    assert data.load("cifar10", str(tmp_path)).classes == 10


def test_cifar10_missing_files_say_nothing_is_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        data.load_cifar10(tmp_path)
    with pytest.raises(ValueError, match="data-dir"):
        data.load("cifar10")


def test_synthetic_data_is_learnable_shape():
    split = data.synthetic((3, 4, 4), classes=5, n_train=40, n_test=10)
    assert split.train_x.shape == (40, 3, 4, 4) and split.test_y.max() < 5
