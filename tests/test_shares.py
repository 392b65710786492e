"""Secret-shared products over Z/2⁶⁴ (tempo.core.shares): exact ring arithmetic, three pools
whose sum is the product, views independent of the data, overflow refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tempo.core import shares as sh

MOD = 1 << 64


def as_ints(t: torch.Tensor) -> np.ndarray:
    return np.vectorize(lambda v: int(v) % MOD, otypes=[object])(t.numpy())


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 7), p=st.integers(1, 5), batch=st.sampled_from([(), (2,)]),
       seed=st.integers(0, 2**31))
def test_ring_matmul_is_exact_modulo_two_to_the_64(m, n, p, batch, seed):
    """Both ways: integer matmuls (CPU) and float64 products of 16-bit limbs (CUDA)."""
    rng = sh.Randomness(seed.to_bytes(16, "little"))
    a, b = rng.uniform((*batch, m, n)), rng.uniform((*batch, n, p))
    ia, ib = as_ints(a), as_ints(b)
    want = np.vectorize(lambda v: v % MOD, otypes=[object])(np.matmul(ia, ib))
    for limbs in (False, True):
        assert (as_ints(sh.ring_matmul(a, b, limbs=limbs)) == want).all()


def test_encodings_round_trip_and_products_decode_within_the_stated_bound():
    torch.manual_seed(0)
    x = torch.randn(50, 30, dtype=torch.float64) * 10
    assert (sh.decode(sh.encode(x), sh.FRAC_BITS, torch.float64) - x).abs().max() <= 2.0 ** -(sh.FRAC_BITS + 1)
    for dtype in (torch.float32, torch.float64):
        a, b = torch.randn(2, 17, 40, dtype=dtype) * 3, torch.randn(40, 9, dtype=dtype)
        got = sh.shared_matmul(a, b)
        want = a.double() @ b.double()
        assert got.dtype == dtype and got.shape == want.shape
        assert bool(((got.double() - want).abs() <= sh.encoding_error_bound(a, b)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_both_backward_products_through_the_pools_match_autograd(dtype):
    """``C = A·B``, ``dA = Δ·Bᵀ`` and ``dB = Aᵀ·Δ``, each a shared product of its own."""
    torch.manual_seed(1)
    a = torch.randn(8, 12, dtype=dtype, requires_grad=True)
    b = torch.randn(12, 5, dtype=dtype, requires_grad=True)
    c = a @ b
    grad = torch.randn_like(c)
    c.backward(grad)
    for x, y, want in ((a.detach(), b.detach(), c.detach()), (grad, b.detach().mT, a.grad), (a.detach().mT, grad, b.grad)):
        got = sh.shared_matmul(x, y)
        assert bool(((got.double() - want.double()).abs() <= sh.encoding_error_bound(x, y) + 1e-5).all())


def test_the_three_answers_sum_to_the_encoded_product_exactly():
    torch.manual_seed(2)
    a, b = torch.randn(6, 10), torch.randn(10, 4)
    product = sh.split_product(a, b)
    total = sum(sh.pool_product(pool, ops) for pool, ops in product.requests().items())
    assert torch.equal(total, sh.ring_matmul(sh.encode(a), sh.encode(b)))
    with pytest.raises(ValueError, match="pool"):
        sh.combine(product, {1: total, 2: total})


def _bit_means(t: torch.Tensor) -> np.ndarray:
    raw = t.numpy().view(np.uint64).ravel()
    return np.array([((raw >> np.uint64(k)) & np.uint64(1)).mean() for k in (0, 17, 40, 63)])


def test_each_pools_view_looks_the_same_whatever_the_data():
    """A distinguisher on each tensor a pool receives: the mean of low, middle and top bits (the
    sign bit tells small from large, positive from negative data) for all-zero data against
    large positive data, over fixed seeds. Uniform either way: every mean within 4.5 standard
    errors of 1/2 (a deterministic outcome for these seeds)."""
    shape_a, shape_b = (64, 64), (64, 32)
    data = {"zeros": (torch.zeros(shape_a), torch.zeros(shape_b)),
            "large": (torch.full(shape_a, 100.0), torch.full(shape_b, 50.0))}
    for name, (a, b) in data.items():
        product = sh.split_product(a, b, sh.Randomness(bytes(16)))
        for pool, ops in product.requests().items():
            for t in ops:
                se = 0.5 / np.sqrt(t.numel())
                assert (np.abs(_bit_means(t) - 0.5) < 4.5 * se).all(), (name, pool)
    # and the data is there: no such test passes on the data's own encoding
    assert np.abs(_bit_means(sh.encode(data["large"][0])) - 0.5).max() > 0.4


def test_products_that_would_wrap_are_refused():
    with pytest.raises(sh.RingOverflow, match="does not fit"):
        sh.split_product(torch.full((2, 64), 3e4), torch.full((64, 2), 3e4))
    with pytest.raises(sh.RingOverflow):
        sh.encode(torch.tensor([float("nan")]))
    sh.split_product(torch.full((2, 64), 30.0), torch.full((64, 2), 30.0))  # well inside


def test_each_pools_answer_is_verified_exactly_and_any_change_is_caught():
    torch.manual_seed(3)
    a, b = torch.randn(2, 7, 9), torch.randn(9, 5)
    product = sh.split_product(a, b)
    for pool, ops in product.requests().items():
        honest = sh.pool_product(pool, ops)
        assert sh.verify_pool(pool, ops, honest, rounds=4)
        for delta in (1, -1, 1 << 40, -(1 << 63)):  # 2^63: a round catches it only half the time
            lie = honest.clone()
            lie.view(-1)[5] += delta
            assert not sh.verify_pool(pool, ops, lie, rounds=40, rng=sh.Randomness(bytes(16)))
        assert not sh.verify_pool(pool, ops, honest[..., :3, :], rounds=4)  # wrong shape
        assert not sh.verify_pool(pool, ops, honest.double(), rounds=4)
    caught = sum(not sh.verify_pool(1, product.pool1, honest_plus_top(product), rounds=1,
                                    rng=sh.Randomness(i.to_bytes(16, "little"))) for i in range(200))
    assert 60 < caught < 140  # one round catches a change of 2^63 with probability 1/2


def honest_plus_top(product):
    r = sh.pool_product(1, product.pool1)
    r.view(-1)[0] += -(1 << 63)  # 2^63, the ring element of largest 2-adic valuation
    return r
