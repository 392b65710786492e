"""One masked round trip: the enclave's side of one offloaded product, and what a relay computes.

Every engine offloads a product ``C = A @ B`` the same way, and this module is that way, once:

- `MaskedProduct(key, A, B)` checks the enclave's own operands (`verify.checked_bound`: nothing
  non-finite leaves) and keeps ``|A|(|B|1)`` for the check;
- `mask_a` / `mask_b` give ``A' = mask(A; m, n)`` and ``B' = mask(B; n, p)`` (into a caller's
  buffer: the shared-memory arena);
- a relay returns ``C' = relay_forward(A', B')``; `open_forward` unmasks and verifies it;
- backward: `mask_grad` gives ``D'ᵀ`` (the only encryption of the backward, Fig. 5), a relay
  returns ``relay_backward(A', B', D'ᵀ)``, and `open_backward` unmasks and verifies both
  gradients.

What differs between engines is only how masked tensors travel: in this process
(`InProcessEngine`, `tempo selfcheck`) or through the arena, the off-loader and relay processes
(`OffloadClient`). `relay_forward` and `relay_backward` (defined with the wire protocol, which
says what each op computes) are exactly what relays compute, so the in-process paths check the
products the relays are asked for.
"""

from __future__ import annotations

import torch

from tempo.core.keys import MatmulKey
from tempo.core.obfuscation import decrypt, decrypt_grads, encrypt_grad, mask
from tempo.core.verify import Verdict, checked_bound, freivalds_check, masked_relay_bound
from tempo.core.products import grad_shapes


def mask_operand(key: MatmulKey, side: str, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One operand of a product under its key: ``A' = mask(A; m, n)`` (side "a") or
    ``B' = mask(B; n, p)`` (side "b"), into `out` when given."""
    if side == "a":
        return mask(t, key.m, key.n, out=out)
    if side == "b":
        return mask(t, key.n, key.p, out=out)
    raise ValueError(f"side must be 'a' or 'b', not {side!r}")


class MaskedProduct:
    """The enclave's state for one offloaded product, from masking to verified results."""

    def __init__(self, key: MatmulKey, a: torch.Tensor, b: torch.Tensor, where: str = "") -> None:
        if key.shape != (a.shape[-2], a.shape[-1], b.shape[-1]):
            raise ValueError(f"a {key.shape} key does not fit A {tuple(a.shape)} @ B {tuple(b.shape)}")
        self.key, self.a, self.b, self.where = key, a, b, where
        self.ab = checked_bound(a, b, where=f"forward of {where}" if where else "")  # before anything leaves
        # keys that mix blocks of positions: the relay's rounding is bounded through the masked
        # operands (verify.masked_relay_bound), which the checks are then given
        self.mixing = max(k.block for k in key.parts)
        self._grad_bounds: tuple | None = None
        self.grad_c: torch.Tensor | None = None

    # -- forward --
    def mask_a(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return mask_operand(self.key, "a", self.a, out)

    def mask_b(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return mask_operand(self.key, "b", self.b, out)

    @property
    def c_shape(self) -> tuple[int, ...]:
        m, _, p = self.key.shape
        return (*torch.broadcast_shapes(self.a.shape[:-2], self.b.shape[:-2]), m, p)

    def unmask_c(self, c_masked: torch.Tensor) -> torch.Tensor:
        return decrypt(self.key, c_masked)

    def verify_c(self, c: torch.Tensor, rounds: int, masked: tuple | None = None) -> Verdict:
        """Check ``C`` (Freivalds); with mixing keys, `masked` is ``(A', B')`` as sent."""
        relay = None
        if self.mixing:
            a_enc, b_enc = self._masked(masked, 2)
            k = self.key
            relay = masked_relay_bound(a_enc, b_enc, k.m, k.p, k.m.scales("mask-col", a_enc.dtype),
                                       k.p.scales("mask-row", a_enc.dtype))
        return freivalds_check(self.a, self.b, c, rounds, ab=self.ab, ab_relay=relay, mixing=self.mixing)

    def _masked(self, masked: tuple | None, count: int) -> tuple:
        if masked is None or len(masked) != count:
            raise ValueError("a product whose keys mix needs its masked operands to bound the relay's rounding")
        return masked

    # -- backward --
    def check_grad(self, grad_c: torch.Tensor) -> None:
        """Take ``Δ = dL/dC`` for the backward: checked (its shape; finite, before it leaves) and
        kept, with the scales of the gradients' checks, for `verify_grads`."""
        m, _, p = self.key.shape
        if tuple(grad_c.shape[-2:]) != (m, p):
            raise ValueError(f"dL/dC has shape {tuple(grad_c.shape)}; the forward made (…, {m}, {p})")
        where = f"backward of {self.where}" if self.where else ""
        # dA = Δ Bᵀ and dB = Aᵀ Δ come back summed to their operands' shapes (grad_shapes)
        sum_a, sum_b = tuple(self.a.shape[:-2]), tuple(self.b.shape[:-2])
        self._grad_bounds = (checked_bound(grad_c, self.b.mT, sum_a, where),
                             checked_bound(self.a.mT, grad_c, sum_b, where))
        self.grad_c = grad_c

    def mask_grad(self, grad_c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``D'ᵀ`` for ``Δ = dL/dC``, in ``Δ``'s own layout (…, m, p), into `out` when given
        (`check_grad` first, unless it was called with this ``Δ`` already)."""
        if self.grad_c is not grad_c:
            self.check_grad(grad_c)
        return encrypt_grad(self.key, grad_c, out=out).mT

    def grad_shapes(self, e_shape: tuple) -> tuple[tuple, tuple]:
        """The shapes of ``T1'ᵀ`` and ``T2'ᵀ`` a relay returns for this product."""
        return grad_shapes(tuple(self.a.shape), tuple(self.b.shape), tuple(e_shape))

    def unmask_grads(self, t1t: torch.Tensor, t2t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dL/dA, dL/dB)`` from the relay's ``T1'ᵀ`` and ``T2'ᵀ``."""
        return decrypt_grads(self.key, t1t.mT, t2t.mT)

    def verify_grads(self, da: torch.Tensor, db: torch.Tensor, rounds: int, masked: tuple | None = None) -> Verdict:
        """Check both gradients (Freivalds); with mixing keys, `masked` is ``(A', B', D'ᵀ)`` as sent."""
        if self.grad_c is None or self._grad_bounds is None:
            raise ValueError("no gradient was masked for this product")
        ab_da, ab_db = self._grad_bounds
        relay_da = relay_db = None
        if self.mixing:  # the relay's T1'ᵀ = E B'ᵀ (rows m, cols n) and T2'ᵀ = A'ᵀ E (rows n, cols p)
            a_enc, b_enc, e = self._masked(masked, 3)
            k, dt = self.key, e.dtype
            relay_da = masked_relay_bound(e, b_enc.mT, k.m, k.n, k.m.scales("mask-row", dt), k.n.scales("mask-col", dt),
                                          tuple(self.a.shape[:-2]))
            relay_db = masked_relay_bound(a_enc.mT, e, k.n, k.p, k.n.scales("mask-row", dt), k.p.scales("mask-col", dt),
                                          tuple(self.b.shape[:-2]))
        verdict = freivalds_check(self.grad_c, self.b.mT, da, rounds, ab=ab_da, ab_relay=relay_da,
                                  mixing=self.mixing, summed=True)
        if verdict.ok:
            verdict = freivalds_check(self.a.mT, self.grad_c, db, rounds, ab=ab_db, ab_relay=relay_db,
                                      mixing=self.mixing, summed=True)
        return verdict
