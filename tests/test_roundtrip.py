"""The one masked round trip: every engine masks, unmasks and verifies through
`tempo.core.roundtrip`, and checks what relays compute (`protocol.relay_forward/backward`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import tempo
from tempo.core.keys import keygen
from tempo.core.roundtrip import MaskedProduct
from tempo.core.verify import NonFiniteError
from tempo.core.products import relay_backward, relay_forward

PRIMITIVES = {"mask", "unmask", "encrypt", "decrypt", "encrypt_grad", "decrypt_grads", "freivalds_check",
              "checked_bound", "operand_bound"}
ROOT = Path(tempo.__file__).parent


@pytest.mark.parametrize("path", ["enclave/client.py", "enclave/private.py", "enclave/selfcheck.py", "relay/__init__.py"])
def test_engines_use_the_round_trip_not_the_primitives(path):
    """Masking, unmasking and verification are written once (roundtrip.py), not per engine."""
    tree = ast.parse((ROOT / path).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module in ("tempo.core.obfuscation", "tempo.core.verify") for alias in node.names}
    assert not imported & PRIMITIVES, imported & PRIMITIVES


@pytest.mark.parametrize("batch_a, batch_b", [((), ()), ((3,), ()), ((), (4,)), ((2,), (2,))])
def test_a_round_trip_through_what_a_relay_computes(batch_a, batch_b):
    m, n, p = 5, 7, 3
    a = torch.randn(*batch_a, m, n, dtype=torch.float64, requires_grad=True)
    b = torch.randn(*batch_b, n, p, dtype=torch.float64, requires_grad=True)
    product = MaskedProduct(keygen(m, n, p), a.detach(), b.detach())
    a_enc, b_enc = product.mask_a(), product.mask_b()
    c = product.unmask_c(relay_forward(a_enc, b_enc))
    assert product.verify_c(c, 20).ok
    want = a @ b
    assert torch.allclose(c, want, atol=1e-10)
    grad = torch.randn_like(want)
    want.backward(grad)
    e = product.mask_grad(grad)
    assert e.shape == grad.shape  # D'ᵀ travels in Δ's own layout
    da, db = product.unmask_grads(*relay_backward(a_enc, b_enc, e))
    assert product.verify_grads(da, db, 20).ok
    assert torch.allclose(da, a.grad, atol=1e-10) and torch.allclose(db, b.grad, atol=1e-10)
    assert not product.verify_grads(da + 1.0, db, 20).ok


def test_non_finite_values_never_leave_the_round_trip():
    a, b = torch.randn(4, 3), torch.randn(3, 2)
    bad = a.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(NonFiniteError, match="forward of layer 3"):
        MaskedProduct(keygen(4, 3, 2), bad, b, where="layer 3")
    product = MaskedProduct(keygen(4, 3, 2), a, b, where="layer 3")
    grad = torch.randn(4, 2)
    grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="backward of layer 3"):
        product.mask_grad(grad)
