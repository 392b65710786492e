import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tempo.core.keys import (
    AxisKey,
    KeySpace,
    axis_keygen,
    keygen,
    random_permutations,
    uniform_below,
)

KEY_SPACES = [
    KeySpace(),
    KeySpace("int", 2, False),
    KeySpace("int", 1, True),
    KeySpace("int", 1024, True),
    KeySpace("continuous", 64),
    KeySpace("continuous", 10**6, True),
]


@given(
    size=st.integers(1, 300),
    batch=st.lists(st.integers(1, 3), max_size=2),
    space=st.sampled_from(KEY_SPACES),
)
def test_axis_key_is_a_permutation_with_nonzero_coefficients_in_the_key_space(size, batch, space):
    key = axis_keygen(size, batch, space)
    assert key.perm.shape == (*batch, size) and key.coef.shape == (*batch, size)
    assert torch.equal(torch.sort(key.perm, -1).values, torch.arange(size).expand_as(key.perm))
    mags = key.coef.abs()
    assert bool((key.coef != 0).all())
    assert bool((mags >= 1).all()) and bool((mags <= space.bound).all())
    if space.kind == "int":
        assert torch.equal(mags, mags.round())
    if not space.signed:
        assert bool((key.coef > 0).all())
    inv = key.inverse_perm
    assert torch.equal(torch.gather(key.perm, -1, inv), torch.arange(size).expand_as(inv))


def test_two_calls_never_return_the_same_key():
    seen = set()
    for _ in range(200):
        sk = keygen(64, 32, 16)
        fp = b"".join(k.fingerprint() for k in sk.parts)
        assert fp not in seen
        seen.add(fp)
    # and within one key the three axes are independent draws
    sk = keygen(50, 50, 50)
    assert len({k.fingerprint() for k in sk.parts}) == 3


def test_signed_space_draws_both_signs_and_int_space_covers_its_range():
    coef = KeySpace("int", 4, True).sample(4000)
    assert set(np.unique(coef).tolist()) == {-4.0, -3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 4.0}


def test_uniform_below_is_unbiased_enough():
    draws = uniform_below(6, 60000)
    counts = np.bincount(draws, minlength=6)
    expected = 10000
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 30  # 5 degrees of freedom: p < 1e-5 for a correct sampler


def test_uniform_below_rejects_draws_that_would_bias():
    # bound 3: limit = floor(2^64/3)*3; feed one value above the limit first, then 5.
    high = (2**64 - 1).to_bytes(8, "little")
    five = (5).to_bytes(8, "little")
    feed = [high, five]
    out = uniform_below(3, 1, lambda n: feed.pop(0))
    assert out.tolist() == [5 % 3]


def test_permutation_with_tied_tags_is_redrawn(seeded_bytes):
    calls = []
    fallback = seeded_bytes(1)

    def source(n):
        calls.append(n)
        return bytes(n) if len(calls) == 1 else fallback(n)  # all-zero tags tie

    perm = random_permutations(5, 1, source)
    assert len(calls) == 2 and sorted(perm[0].tolist()) == list(range(5))


def test_seeded_source_makes_keys_reproducible(seeded_bytes):
    a = keygen(7, 5, 3, random_bytes=seeded_bytes(42))
    b = keygen(7, 5, 3, random_bytes=seeded_bytes(42))
    assert all(x.fingerprint() == y.fingerprint() for x, y in zip(a.parts, b.parts))


def test_key_shift_is_the_papers_left_circular_shift():
    sk = keygen(3, 4, 5)
    assert sk.shifted(0) == sk
    s1 = sk.shifted(1)
    assert (s1.m, s1.n, s1.p) == (sk.p, sk.m, sk.n)
    s2 = sk.shifted(2)
    assert (s2.m, s2.n, s2.p) == (sk.n, sk.p, sk.m)
    assert sk.shifted(3) == sk


@pytest.mark.parametrize(
    "coef, perm, err",
    [
        ([1.0, 0.0], [0, 1], ValueError),
        ([1.0, float("nan")], [0, 1], ValueError),
        ([1.0, 2.0], [0, 0], ValueError),
        ([1.0, 2.0], [0, 2], ValueError),
        ([1.0, 2.0, 3.0], [0, 1], ValueError),
    ],
)
def test_axis_key_rejects_bad_keys(coef, perm, err):
    with pytest.raises(err):
        AxisKey(torch.tensor(coef, dtype=torch.float64), torch.tensor(perm))


def test_axis_key_rejects_wrong_dtypes():
    with pytest.raises(TypeError):
        AxisKey(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))


@pytest.mark.parametrize("text", ["int:0", "bogus:5", "int:x", "int:1"])
def test_key_space_parse_rejects_bad_text(text):
    with pytest.raises(ValueError):
        KeySpace.parse(text)


def test_key_space_parse_round_trips():
    for space in KEY_SPACES[:2] + KEY_SPACES[3:]:
        assert KeySpace.parse(str(space)) == space


@pytest.mark.parametrize("bad", [0, -3])
def test_keygen_rejects_empty_axes(bad):
    with pytest.raises(ValueError):
        keygen(bad, 2, 2)


def test_keys_drawn_ahead_are_fresh_for_every_product_and_of_the_asked_shape():
    from tempo.core.keys import KeySchedule

    schedule = KeySchedule(mix=4, ahead=True)
    keys = [schedule.key(0, 37, 9, 5) for _ in range(4)] + [schedule.key(1, 8, 6, 3) for _ in range(3)]
    assert schedule.generated == 7
    prints = {(k.m.fingerprint(), k.n.fingerprint(), k.p.fingerprint()) for k in keys}
    assert len(prints) == 7  # never one key twice
    assert [(k.m.size, k.n.size, k.p.size) for k in keys] == [(37, 9, 5)] * 4 + [(8, 6, 3)] * 3
    assert all(k.m.block == 4 for k in keys)
    epoch = KeySchedule("epoch", ahead=True)
    assert epoch.key(0, 4, 4, 4) is epoch.key(0, 4, 4, 4)  # the paper's reuse is unchanged
