"""Attack ``unmix`` (tempo/audit/unmix.py): what survives mixing with random orthogonal blocks.

The building blocks are checked on synthetic data masked with tempo's own mixing keys (so that
a broken attack fails); the ``mixed`` preset itself is captured once (one epoch of the CNN) and
its measured figures are printed, with a threshold far below what was measured
(docs/audit-attacks.md) and far above chance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")

from tempo.audit import score as sc
from tempo.audit import unmix as um
from tempo.audit.public import Public
from tempo.audit.view import ProductView, RunView
from tempo.core.keys import axis_keygen
from tempo.core.obfuscation import mask


def _bytes(seed):
    src = np.random.default_rng(seed)
    return lambda n: src.bytes(n)


def _sparse_nonneg(rng, shape, p=0.5):
    return np.maximum(rng.normal(size=shape), 0) * (rng.random(shape) < 2 * p)


def test_block_ranks_survive_two_sided_mixing():
    rng = np.random.default_rng(0)
    x = _sparse_nonneg(rng, (48, 64))
    x[rng.random(48) < 0.3] = 0.0  # zero rows and columns make blocks singular
    x[:, rng.random(64) < 0.3] = 0.0
    rb = _bytes(1)
    kr, kc = axis_keygen(48, random_bytes=rb, mix=16), axis_keygen(64, random_bytes=rb, mix=16)
    masked = mask(torch.from_numpy(x), kr, kc).to(torch.float32).numpy()  # the wire is float32
    got = um.block_ranks(masked, 16)
    pr, pc = kr.perm.numpy(), kc.perm.numpy()
    want = np.array([[np.linalg.matrix_rank(x[np.ix_(pr[r], pc[c])])
                      for c in um.block_slices(64, 16)] for r in um.block_slices(48, 16)])
    assert (want < 16).any()
    np.testing.assert_array_equal(got, want)


def test_dead_units_counted_exactly_through_mixing():
    rng = np.random.default_rng(2)
    x = _sparse_nonneg(rng, (64, 128))
    dead = rng.choice(128, 11, replace=False)
    x[:, dead] = 0.0
    rb = _bytes(3)
    a = mask(torch.from_numpy(x), axis_keygen(64, random_bytes=rb, mix=16),
             axis_keygen(128, random_bytes=rb, mix=16)).to(torch.float32)
    e = torch.ones(64, 10)
    view = RunView([ProductView(0, 1, 0, a, torch.ones(128, 128), None),
                    ProductView(0, 2, 0, torch.ones(64, 128), torch.ones(128, 10), e)])
    public = Public("mlp", np.zeros((4, 1, 8, 8)), np.zeros(4, int), layers=3, mix=16)
    res = um.dead_units(view, public)
    assert res.total((0, 1)) == 11


def test_cone_rays_unmix_one_side():
    rng = np.random.default_rng(4)
    images = rng.random((200, 1, 8, 8)) * (rng.random((200, 1, 8, 8)) < 0.5)
    public = Public("mlp", images, rng.integers(0, 10, 200))
    rows = um.one_sided_experiment(public, 4, side="rows")
    cols = um.one_sided_experiment(public, 2, side="cols")
    print("one-sided cone search, rows g=4:", rows["recovered"], "columns g=2:", cols["recovered"])
    assert rows["recovered"] >= 0.8
    assert cols["recovered"] >= 0.6


def _cnn_mixed(patch_rows: bool):
    from tempo.audit.capture import CaptureConfig, capture
    from tempo.audit.run import by_model_layer, offloaded_layers

    torch.set_num_threads(1)
    cfg = CaptureConfig(model="cnn", epochs=1, masking="mixed", evaluate=False, patch_rows=patch_rows)
    view, truth, split = capture(cfg)
    view, truth = by_model_layer(view, truth, offloaded_layers(3, ("first", "last")))
    public = Public.from_split(split, "cnn")
    public.layers, public.mix, public.patch_rows = 3, 16, patch_rows
    return view, truth, public


def test_mixing_keys_on_a_batched_convolution_leave_rank_profiles_that_group_alike_samples():
    """Mixing keys with the convolution batched over the images (one key for all of them, the
    images in order): the block ranks of each image's patches group alike samples."""
    view, truth, public = _cnn_mixed(patch_rows=False)
    prof = um.rank_profiles(view, public, max_steps=3, null_spaces_too=False)
    res = sc.score_unmix(prof, um.DeadUnits(), view, truth)["layer1"]
    print("mixing keys, batched CNN conv2, block-rank profiles:", res)
    assert res["singular_blocks"] > 0.5
    assert res["nn_same_label"] > res["chance"] + 0.1


def test_the_mixed_preset_sends_no_per_image_slices_to_profile():
    """The preset offloads a convolution as one matrix of the whole batch's patches: there is no
    image's block to take the rank of."""
    view, truth, public = _cnn_mixed(patch_rows=True)
    assert um.rank_profiles(view, public, max_steps=3, null_spaces_too=False).profiles == {}
