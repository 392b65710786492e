"""Axis keys that mix blocks of positions with random orthogonal matrices: the identity
mask(X)·mask(Y) = mask(XY) still holds, relays compute as before, verification stays rigorous."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tempo.core.keys import KeySchedule, KeySpace, axis_keygen, keygen, random_orthogonal
from tempo.core.obfuscation import mask, unmask
from tempo.core.roundtrip import MaskedProduct
from tempo.core.products import relay_backward, relay_forward


def test_random_orthogonal_blocks_are_orthogonal_and_from_the_byte_source(seeded_bytes):
    q = random_orthogonal(50, 8, seeded_bytes(1))
    assert torch.allclose(q @ q.mT, torch.eye(8, dtype=torch.float64).expand(50, 8, 8), atol=1e-12)
    assert torch.equal(q, random_orthogonal(50, 8, seeded_bytes(1)))
    assert not torch.equal(q, random_orthogonal(50, 8, seeded_bytes(2)))
    assert abs(float(q.mean())) < 0.02 and abs(float((q**2).mean()) - 1 / 8) < 0.01  # Haar: E q² = 1/g


def test_an_axis_key_with_mixing_covers_its_axis():
    key = axis_keygen(37, mix=8)
    assert key.block == 8 and key.mix.shape == (4, 8, 8) and key.mix_tail.shape == (5, 5)
    assert axis_keygen(6, mix=16).mix.shape == (1, 6, 6)  # an axis shorter than a block: one block
    assert axis_keygen(9, mix=0).block == 0
    with pytest.raises(ValueError, match="shared"):
        axis_keygen(9, batch_shape=(2,), mix=4)
    with pytest.raises(ValueError, match="0 \\(none\\) or at least 2"):
        KeySchedule(mix=1)


@settings(max_examples=120, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), p=st.integers(1, 40), mix=st.sampled_from([2, 3, 8, 16, 64]),
       dtype=st.sampled_from([torch.float32, torch.float64]), batch=st.sampled_from([(), (3,)]),
       shared=st.booleans(), space=st.sampled_from(["int:256", "signed-int:256", "continuous:256"]))
def test_products_of_mixed_operands_unmask_to_the_true_results_and_verify(m, n, p, mix, dtype, batch, shared, space):
    sk = keygen(m, n, p, mix=mix, key_space=KeySpace.parse(space))
    a = torch.randn(*batch, m, n, dtype=dtype, requires_grad=True)
    b = torch.randn(*(() if shared else batch), n, p, dtype=dtype, requires_grad=True)
    assert torch.allclose(unmask(mask(a.detach(), sk.m, sk.n), sk.m, sk.n), a.detach(), rtol=1e-4, atol=1e-5)
    product = MaskedProduct(sk, a.detach(), b.detach())
    a_enc, b_enc = product.mask_a(), product.mask_b()
    c = product.unmask_c(relay_forward(a_enc, b_enc))
    want = a @ b
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(c, want.detach(), rtol=tol, atol=tol * float(want.detach().abs().max() + 1))
    assert product.verify_c(c, 16, (a_enc, b_enc)).ok  # honest: never rejected
    grad = torch.randn_like(want)
    want.backward(grad)
    e = product.mask_grad(grad)
    da, db = product.unmask_grads(*relay_backward(a_enc, b_enc, e))
    assert product.verify_grads(da, db, 16, (a_enc, b_enc, e)).ok
    assert torch.allclose(da, a.grad, rtol=tol, atol=tol * float(a.grad.abs().max() + 1))
    assert torch.allclose(db, b.grad, rtol=tol, atol=tol * float(b.grad.abs().max() + 1))
    tampered = c.clone()
    tampered.view(-1)[c.numel() // 2] += 1.0 + float(c.abs().max())
    assert not product.verify_c(tampered, 30, (a_enc, b_enc)).ok  # 2^-30 to escape


def test_a_mixed_product_cannot_be_verified_without_its_masked_operands():
    sk = keygen(4, 5, 6, mix=4)
    product = MaskedProduct(sk, torch.randn(4, 5), torch.randn(5, 6))
    a_enc, b_enc = product.mask_a(), product.mask_b()
    with pytest.raises(ValueError, match="masked operands"):
        product.verify_c(product.unmask_c(a_enc @ b_enc), 8)


def test_mixing_hides_zeros_and_signs_that_scaling_keeps():
    """Post-ReLU activations: half zeros. Masked by (c, π) alone the zeros stay; mixed, none do."""
    x = torch.relu(torch.randn(64, 96))
    plain_key, mixed_key = keygen(64, 96, 8), keygen(64, 96, 8, mix=16)
    assert int((mask(x, plain_key.m, plain_key.n) == 0).sum()) == int((x == 0).sum())
    assert int((mask(x, mixed_key.m, mixed_key.n) == 0).sum()) == 0


def test_private_training_with_mixing_keys_matches_plain_training():
    from tempo import models
    from tempo.enclave.private import InProcessEngine, PrivateContext, to_private

    torch.manual_seed(0)
    net = models.build("cnn", (1, 8, 8), 10)
    plain = models.build("cnn", (1, 8, 8), 10)
    plain.load_state_dict(net.state_dict())
    private = to_private(net, PrivateContext(InProcessEngine(keys=KeySchedule(mix=16))))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for model in (private, plain):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
    for (name, p), q in zip(net.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 70), n=st.integers(1, 70), row_mix=st.sampled_from([0, 2, 16]),
       col_mix=st.sampled_from([0, 3, 16]), role=st.sampled_from(["mask", "unmask", "mask-t", "unmask-t"]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_the_fast_mixed_gather_equals_the_reference_path(m, n, row_mix, col_mix, role, dtype):
    from tempo.core.obfuscation import _keyed_gather, kernel_available
    if not kernel_available():
        pytest.skip("the C kernel is not built")
    rk, ck = axis_keygen(m, mix=row_mix), axis_keygen(n, mix=col_mix)
    x = torch.randn(m, n, dtype=dtype)
    fast = _keyed_gather(x, rk, ck, role, None, "c")
    ref = _keyed_gather(x, rk, ck, role, None, "torch")
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert fast.shape == ref.shape and torch.allclose(fast, ref, rtol=tol, atol=tol * float(ref.abs().max() + 1))
    out = torch.full_like(x, float("nan"))
    assert _keyed_gather(x, rk, ck, role, out, "c") is out and torch.allclose(out, fast, rtol=tol, atol=tol)
