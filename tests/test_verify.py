import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from tempo.core import obfuscation as ob
from tempo.core.keys import KeySpace, keygen
from tempo.core.verify import (
    IntegrityError,
    freivalds_check,
    freivalds_rounds,
    random_bits,
    rounding_bound,
    training_alpha,
)


def honest(m, n, p, dtype=torch.float32, batch=(), space=KeySpace()):
    """A, B and the C an honest relay's masked product decrypts to."""
    a = torch.randn(*batch, m, n, dtype=dtype)
    b = torch.randn(*batch, n, p, dtype=dtype)
    sk = keygen(m, n, p, key_space=space)
    a_enc, b_enc = ob.encrypt(sk, a, b)
    return a, b, ob.decrypt(sk, a_enc @ b_enc)


@pytest.mark.parametrize(
    "t, alpha, workers, layers",
    [(0.01, 1, 1, 1), (1e-6, 1, 1, 1), (1e-9, training_alpha(100, 50000, 512), 2, 50), (0.5, 3, 1, 8)],
)
def test_rounds_follow_theorem_v2(t, alpha, workers, layers):
    k = freivalds_rounds(t, alpha, workers, layers)
    bound = math.log2(1 / (1 - (1 - t) ** (1 / (alpha * workers * layers))))
    assert k > bound >= k - 1 or (k == 1 and bound < 1)
    # and the promise holds: P(any wrong result passes) <= 1 - (1 - 2^-k)^(alpha N L) < t
    assert 1 - (1 - 2.0**-k) ** (alpha * workers * layers) < t


def test_rounds_examples_and_errors():
    assert freivalds_rounds(0.5) == 2  # log2(1/0.5) = 1, strictly greater
    assert freivalds_rounds(2**-40) == 41
    assert training_alpha(2, 1000, 300) == 3 * 2 * 4
    for bad in (0.0, 1.0, -1.0):
        with pytest.raises(ValueError):
            freivalds_rounds(bad)
    with pytest.raises(ValueError):
        training_alpha(0, 10, 10)


def test_no_false_alarm_over_ten_thousand_honest_products():
    """>= 10,000 randomized honest products, dimensions up to 4096, fp32 and fp64, batched too."""
    rng = random.Random(1234)
    trials, largest = 10_000, 0
    for i in range(trials):
        dims = [max(1, int(math.exp(rng.uniform(0, math.log(4096))))) for _ in range(3)]
        while math.prod(dims) > 1 << 19:  # keep each product small enough; one side may be 4096
            j = max(range(3), key=lambda k: dims[k] if dims[k] < 4096 else 0)
            dims[j] = max(1, dims[j] // 2)
        if i % 1000 == 0:
            dims = [4096, rng.choice([1, 3, 8]), rng.choice([1, 5])]  # sizes up to 4096 on purpose
            rng.shuffle(dims)
        largest = max(largest, *dims)
        dtype = torch.float64 if i % 5 == 0 else torch.float32
        batch = (2,) if i % 7 == 0 else ()
        space = KeySpace("int", 1024, True) if i % 3 == 0 else KeySpace()
        a, b, c = honest(*dims, dtype=dtype, batch=batch, space=space)
        verdict = freivalds_check(a, b, c, rounds=8)
        assert verdict.ok, (i, dims, dtype, verdict.reason)
    assert largest == 4096


def test_honest_large_product_passes():
    a, b, c = honest(512, 4096, 64)
    assert freivalds_check(a, b, c, rounds=30).ok


def _bump_beyond_tolerance(a, b, c, index, factor=3.0):
    bound = rounding_bound(a, b)
    bad = c.clone()
    bad[index] += factor * float(bound[index[:-1]])
    return bad


def test_rejects_one_entry_changed_beyond_the_tolerance():
    rng = random.Random(7)
    for _ in range(200):
        m, n, p = rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 40)
        a, b, c = honest(m, n, p)
        index = (rng.randrange(m), rng.randrange(p))
        # Rejected unless every one of the 40 vectors misses that column: 2^-40.
        assert not freivalds_check(a, b, _bump_beyond_tolerance(a, b, c, index), rounds=40).ok


def test_rejects_rank_one_change():
    a, b, c = honest(64, 48, 32)
    u, v = torch.randn(64, 1), torch.randn(1, 32)
    scale = 10 * float(rounding_bound(a, b).max())
    assert not freivalds_check(a, b, c + scale * (u @ v), rounds=40).ok


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["c", "a", "b"])
def test_rejects_non_finite_values_anywhere(value, where):
    a, b, c = honest(17, 9, 13)
    target = {"a": a, "b": b, "c": c}[where]
    target.view(-1)[random.randrange(target.numel())] = value
    verdict = freivalds_check(a, b, c, rounds=4)
    assert not verdict.ok and ("NaN" in verdict.reason)


def test_rejects_wrong_shape_and_dtype():
    a, b, c = honest(8, 6, 4)
    assert not freivalds_check(a, b, c[:, :3], rounds=4).ok
    assert not freivalds_check(a, b, c.T.contiguous(), rounds=4).ok
    assert not freivalds_check(a, b, c.unsqueeze(0), rounds=4).ok
    assert not freivalds_check(a, b, c.double(), rounds=4).ok
    assert not freivalds_check(a, b[:5], c, rounds=4).ok
    assert not freivalds_check(a.int(), b.int(), c.int(), rounds=4).ok


def test_rejects_a_result_computed_from_other_operands():
    a, b, c = honest(30, 20, 10)
    assert not freivalds_check(a, b, a @ torch.randn_like(b), rounds=40).ok
    assert not freivalds_check(a, b, torch.zeros_like(c), rounds=40).ok


def test_batched_check_catches_a_bad_slice():
    a, b, c = honest(10, 12, 7, batch=(3,))
    assert freivalds_check(a, b, c, rounds=10).ok
    bad = _bump_beyond_tolerance(a, b, c, (1, 4, 2))
    assert not freivalds_check(a, b, bad, rounds=40).ok


@pytest.mark.parametrize("a_batch, b_batch", [((), (5,)), ((5,), ()), ((1, 3), (2, 1)), ((2, 3), (3,))])
def test_broadcast_batches_pass_honest_and_reject_tampered(a_batch, b_batch):
    a = torch.randn(*a_batch, 4, 9)
    b = torch.randn(*b_batch, 9, 6)
    c = a @ b
    assert freivalds_check(a, b, c, rounds=8).ok
    bad = c.clone()
    bad.view(-1)[7] += 10 * float(rounding_bound(a, b).max()) + 1.0
    assert not freivalds_check(a, b, bad, rounds=40).ok


def test_reduced_precision_relay_needs_its_unit_roundoff():
    a = torch.randn(64, 48)
    b = torch.randn(48, 32)
    # Emulate a bf16 relay: operands and product rounded to bf16.
    c = (a.bfloat16().float() @ b.bfloat16().float()).bfloat16().float()
    assert not freivalds_check(a, b, c, rounds=16).ok  # fp32 tolerance: rejected
    u_bf16 = torch.finfo(torch.bfloat16).eps / 2
    assert freivalds_check(a, b, c, rounds=16, relay_unit_roundoff=u_bf16).ok
    # Past n u = 1/2 no rigorous bound exists: the check fails closed and says why.
    a, b = torch.randn(8, 300), torch.randn(300, 4)
    verdict = freivalds_check(a, b, a @ b, rounds=4, relay_unit_roundoff=u_bf16)
    assert not verdict.ok and "too large" in verdict.reason


def test_verdict_raises_integrity_error():
    a, b, c = honest(4, 4, 4)
    freivalds_check(a, b, c, rounds=4).raise_if_failed()
    with pytest.raises(IntegrityError, match="NaN"):
        freivalds_check(a, b, c * float("nan"), rounds=4).raise_if_failed()


def test_random_bits_are_bits_and_balanced():
    bits = random_bits((1000, 40))
    assert bits.shape == (1000, 40) and set(bits.flatten().tolist()) <= {0, 1}
    assert 0.45 < bits.mean() < 0.55


def test_zero_rounds_is_an_error():
    a, b, c = honest(2, 2, 2)
    with pytest.raises(ValueError):
        freivalds_check(a, b, c, rounds=0)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.integers(1, 9), st.integers(1, 9),
       st.sampled_from([torch.float32, torch.float64]), st.sampled_from(["lead", "size1"]))
def test_summed_products_are_accepted_when_honest_and_rejected_when_wrong(batch, m, n, p, dtype, shared):
    """A shared weight's gradient: C = Σ_i A_i B_i over the slices the weight was broadcast across."""
    a = torch.randn(batch, m, n, dtype=dtype) * 10
    b = torch.randn(n, p, dtype=dtype) if shared == "lead" else torch.randn(1, n, p, dtype=dtype)
    c = (a @ b).sum_to_size((m, p) if shared == "lead" else (1, m, p))
    assert freivalds_check(a, b, c, 40, summed=True).ok
    bad = c.clone()
    bad.view(-1)[0] += 1.0 + c.abs().max()
    assert not freivalds_check(a, b, bad, 40, summed=True).ok
    assert not freivalds_check(a, b, c, 40).ok or batch == 1  # unsummed shape expected without it
    wrong = torch.zeros(m + 1, p, dtype=dtype)
    assert not freivalds_check(a, b, wrong, 40, summed=True).ok


def _balanced_noise(shape, scale, dtype=torch.float32):
    """+s, -s, +s, ... along each row: inflates |C| 1 by about p s while C r moves by about √p s."""
    signs = torch.ones(shape[-1], dtype=dtype)
    signs[1::2] = -1
    return scale * signs.expand(*shape)


@pytest.mark.parametrize("p", [65_536, 131_072])
@pytest.mark.parametrize("times", [10.0, 1e3, 1e6])
def test_balanced_noise_on_wide_products_is_caught(p, times):
    """A relay cannot widen the tolerance with its own result: the bound comes from A and B."""
    a, b = torch.randn(4, 16), torch.randn(16, p)
    c = a @ b
    bad = c + _balanced_noise(c.shape, times * float(c.abs().max()))
    k = 31
    verdict = freivalds_check(a, b, bad, rounds=k)
    assert not verdict.ok and verdict.worst_ratio > 1.0
    assert freivalds_check(a, b, c, rounds=k).ok
    # (The old tolerance added γ(p)·|C|·1 from the relay's own C and let this through at
    # 65,536 and 131,072 columns in every trial: docs/BENCHMARKS.md, issue 13.)


def test_non_finite_operands_are_the_enclaves_fault_not_the_relays():
    from tempo.core.verify import NonFiniteError, checked_bound

    a, b, c = honest(6, 5, 4)
    a[2, 3] = float("nan")
    verdict = freivalds_check(a, b, c, rounds=4)
    assert not verdict.ok and verdict.enclave_fault
    with pytest.raises(NonFiniteError):
        verdict.raise_if_failed()
    with pytest.raises(NonFiniteError, match="layer 2"):
        checked_bound(a, b, where="layer 2")
    huge = torch.full((3, 3), 3e38)  # finite, but the product overflows
    with pytest.raises(NonFiniteError):
        checked_bound(huge, huge)
    a, b, c = honest(6, 5, 4)
    # finite: no error (the C kernel sums in its own order: equal up to rounding)
    assert torch.allclose(checked_bound(a, b), a.abs() @ b.abs().sum(dim=1), rtol=1e-6, atol=0)
    c[0, 0] = float("inf")
    verdict = freivalds_check(a, b, c, rounds=4)
    assert not verdict.ok and not verdict.enclave_fault  # the relay's result: its fault


@pytest.mark.parametrize("summed", [False, True])
def test_a_precomputed_operand_bound_gives_the_same_verdict(summed):
    from tempo.core.verify import operand_bound

    a, b = torch.randn(3, 7, 5), torch.randn(5, 4)
    c = (a @ b).sum(0) if summed else a @ b
    ab = operand_bound(a, b, summed_to=() if summed else None)
    assert freivalds_check(a, b, c, 20, ab=ab, summed=summed).ok
    with pytest.raises(ValueError, match="does not belong"):
        freivalds_check(a, b, c, 20, ab=ab[..., :2], summed=summed)


@pytest.mark.parametrize("rounds,low,high", [(1, 0.42, 0.58), (3, 0.82, 0.93)])
def test_a_change_just_above_the_tolerance_is_caught_at_the_stated_rate(rounds, low, high):
    """One entry off by 2.05× its row's tolerance: each 0/1 vector catches it exactly when it
    picks that column, so k vectors catch it with probability 1 − 2⁻ᵏ (fixed seeds)."""
    rng = random.Random(11)
    a, b, c = honest(24, 16, 12)
    caught = 0
    trials = 400
    for _ in range(trials):
        index = (rng.randrange(24), rng.randrange(12))
        bad = _bump_beyond_tolerance(a, b, c, index, factor=2.05)
        caught += not freivalds_check(a, b, bad, rounds=rounds, random_bytes=rng.randbytes).ok
    assert low <= caught / trials <= high, caught / trials


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_bounds_kernel_is_abs_times_vector_in_every_layout_it_takes(dtype):
    """`|A| v` by the C kernel: row-stored and transposed (column-stored) matrices, batches with a
    shared or a per-slice vector; views it cannot read go to torch. Always equal to |A| @ v."""
    from tempo.core import verify
    from tempo.core.obfuscation import _kernel

    if _kernel is None or not hasattr(_kernel, "abs_matvec"):
        pytest.skip("the C kernel is not built here")
    g = torch.Generator().manual_seed(5)
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    cases = [(torch.randn(300, 70, dtype=dtype, generator=g), (70, 1)),
             (torch.randn(3, 41, 9, dtype=dtype, generator=g), (9, 1)),
             (torch.randn(3, 41, 9, dtype=dtype, generator=g), (3, 9, 1)),
             (torch.randn(70, 300, dtype=dtype, generator=g).mT, (70, 1)),
             (torch.randn(2, 9, 41, dtype=dtype, generator=g).mT, (2, 9, 1)),
             (torch.randn(1, 5, dtype=dtype, generator=g), (5, 1))]
    for a, vshape in cases:
        v = torch.rand(vshape, dtype=dtype, generator=g)
        got = verify._kernel_abs_matvec(a, v)
        assert got is not None and torch.allclose(got, a.abs() @ v, rtol=rel, atol=0), (tuple(a.shape), vshape)
    wide = torch.randn(40, 1, dtype=dtype).expand(40, 30)  # rows that overlap in memory
    assert verify._kernel_abs_matvec(wide, torch.ones(30, 1, dtype=dtype)) is None
    assert torch.allclose(verify._abs_matvec(wide, torch.ones(30, 1, dtype=dtype)), wide.abs().sum(-1, keepdim=True))
    many = torch.randn(20, 4, 3, dtype=dtype)  # more slices than the kernel takes: torch
    assert verify._kernel_abs_matvec(many, torch.ones(3, 1, dtype=dtype)) is None
