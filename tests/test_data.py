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


def write_cifar(root, n_per_batch=6, batches=5):
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
    assert split.train_x.shape == (30, 3, 32, 32) and split.test_x.shape == (6, 3, 32, 32)
    assert split.train_y.dtype == torch.int64
    assert data.load("cifar10", str(tmp_path)).classes == 10
    assert "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5 (30 training images)" in split.source


def test_an_incomplete_cifar10_folder_is_refused_unless_asked(tmp_path):
    write_cifar(tmp_path, batches=2)
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3, data_batch_4, data_batch_5.*--partial-data"):
        data.load("cifar10", str(tmp_path))
    split = data.load("cifar10", str(tmp_path), partial=True)
    assert len(split.train_x) == 12 and "(12 training images)" in split.source


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-cifar"])
def test_a_damaged_cifar10_batch_is_named_in_one_error(tmp_path, damage):
    root = write_cifar(tmp_path) / "cifar-10-batches-py"
    path = root / "data_batch_3"
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    else:
        path.write_bytes(pickle.dumps({b"data": np.zeros((4, 10), dtype=np.uint8), b"labels": [1, 2, 3, 4]}))
    with pytest.raises(ValueError, match="data_batch_3 is not a"):
        data.load("cifar10", str(tmp_path))


def test_data_dir_is_for_cifar10_only(tmp_path):
    for name in ("digits", "synthetic"):
        with pytest.raises(ValueError, match="--data-dir is for cifar10 only"):
            data.load(name, str(tmp_path))


def test_a_validation_split_is_held_out_of_the_training_images():
    split = data.load_digits(seed=3)
    held = data.hold_out(split, 0.1, seed=3)
    assert held.counts() == {"train": len(split.train_x) - 144, "val": 144, "test": len(split.test_x)}
    assert torch.equal(held.test_x, split.test_x)
    # disjoint, and together the original training images
    together = torch.cat([held.train_x, held.val_x]).flatten(1)
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, split.train_x.flatten(1).tolist()))
    assert torch.equal(data.hold_out(split, 0.1, seed=3).val_y, held.val_y)  # seeded
    assert data.hold_out(split, 0.0, seed=3) is split


def test_cifar10_missing_files_say_nothing_is_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        data.load_cifar10(tmp_path)
    with pytest.raises(ValueError, match="data-dir"):
        data.load("cifar10")


def test_synthetic_data_is_learnable_shape():
    split = data.synthetic((3, 4, 4), classes=5, n_train=40, n_test=10)
    assert split.train_x.shape == (40, 3, 4, 4) and split.test_y.max() < 5
