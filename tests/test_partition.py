"""Partitioning a product across relays: the parts reassemble the product and its gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tempo.enclave import partition
from tempo.enclave.private import _reduce_to


@st.composite
def products(draw):
    """Linear (2-D × 2-D), conv (W 2-D × batched patches), attention (4-D × 4-D), broadcast."""
    m, n, p = (draw(st.integers(1, 7)) for _ in range(3))
    kind = draw(st.sampled_from(["linear", "conv", "attention", "broadcast"]))
    if kind == "linear":
        return (m, n), (n, p)
    bsz = draw(st.integers(1, 6))
    if kind == "conv":
        return (m, n), (bsz, n, p)
    if kind == "attention":
        heads = draw(st.integers(1, 3))
        return (bsz, heads, m, n), (bsz, heads, n, p)
    return (1, m, n), (bsz, n, p)


@settings(max_examples=300, deadline=None)
@given(products(), st.integers(1, 5), st.sampled_from([torch.float32, torch.float64]))
def test_parts_reassemble_the_product_and_its_gradients(shapes, parts, dtype):
    a_shape, b_shape = shapes
    a = torch.randn(a_shape, dtype=dtype, requires_grad=True)
    b = torch.randn(b_shape, dtype=dtype, requires_grad=True)
    plan = partition.plan(a.shape, b.shape, parts)
    assert 1 <= plan.parts <= parts
    pieces = partition.split(a.detach(), b.detach(), plan)
    assert len(pieces) == plan.parts
    c = partition.gather_c([ai @ bi for ai, bi in pieces], plan)
    full = a @ b
    assert c.shape == full.shape
    torch.testing.assert_close(c, full.detach())

    grad = torch.randn(full.shape, dtype=dtype)
    full.backward(grad)
    grads = []
    for (ai, bi), gi in zip(pieces, partition.split_grad(grad, plan)):
        # what a relay computes for one part: dA_i = Δ_i B_iᵀ, dB_i = A_iᵀ Δ_i (broadcast)
        grads.append((gi @ bi.mT, ai.mT @ gi))
    da, db = partition.gather_grads(grads, plan)
    torch.testing.assert_close(_reduce_to(da, a.shape), a.grad)
    torch.testing.assert_close(_reduce_to(db, b.shape), b.grad)


def test_the_split_follows_the_layer_kind():
    conv = partition.plan((16, 27), (64, 27, 1024), 2)  # W @ patches: by data
    assert conv.axis == "batch" and conv.bounds == ((0, 32), (32, 64))
    linear = partition.plan((64, 512), (512, 10), 3)  # x @ Wᵀ: by output features
    assert linear.axis == "cols" and linear.bounds == ((0, 4), (4, 7), (7, 10))
    attention = partition.plan((8, 4, 65, 16), (8, 4, 16, 65), 4)
    assert attention.axis == "batch" and attention.parts == 4
    assert partition.plan((64, 512), (512, 10), 1).axis == "none"
    assert partition.plan((5, 3), (3, 1), 4).axis == "none"  # nothing to split
    assert partition.plan((2, 5, 3), (2, 3, 4), 8).parts == 2  # no more parts than slices


def test_split_returns_views_not_copies():
    a, b = torch.randn(64, 512), torch.randn(512, 10)
    for ai, bi in partition.split(a, b, partition.plan(a.shape, b.shape, 2)):
        assert ai.data_ptr() == a.data_ptr()
        assert bi.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_bad_part_counts_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        partition.plan((2, 2), (2, 2), 0)
    with pytest.raises(ValueError, match="matrices"):
        partition.plan((2,), (2, 2), 2)
