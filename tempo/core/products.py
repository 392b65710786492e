"""What a relay computes, defined once: the enclave unmasks and verifies exactly these products
(`tempo.core.roundtrip`), the relays run them (`tempo.relay`), and `tempo selfcheck` checks them.

Part of the trusted core: torch and the standard library only."""

from __future__ import annotations

import torch


class ProductShapeError(ValueError):
    """Operands whose shapes do not make the product; the reason is safe to send to a peer."""


def grad_shapes(a: tuple, b: tuple, e: tuple) -> tuple[tuple, tuple]:
    """Shapes of a backward's results for ``A'`` (…×m×n), ``B'`` (…×n×p) and ``E = D'ᵀ``
    (…×m×p, the masked ``Δᵀ`` sent in ``Δ``'s own layout): ``T1'ᵀ = E B'ᵀ`` and ``T2'ᵀ = A'ᵀ E``,
    each summed down to its operand's shape, so a weight broadcast over a batch gets one
    gradient, not one per slice. Raises `ProtocolError` when the shapes do not fit."""
    if len(a) < 2 or len(b) < 2 or len(e) < 2 or e[-1] != b[-1] or a[-2] != e[-2] or a[-1] != b[-2]:
        raise ProductShapeError(f"backward: A' {a}, B' {b} and D'ᵀ {e} do not fit together")
    try:
        torch.broadcast_shapes(torch.Size(a[:-2]), torch.Size(b[:-2]), torch.Size(e[:-2]))
    except RuntimeError:
        raise ProductShapeError("backward: batch shapes do not broadcast") from None
    return tuple(a), tuple(b)


def relay_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What a relay computes for ``forward``: ``C' = A' @ B'``."""
    return torch.matmul(a, b)


def relay_backward(a: torch.Tensor, b: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a relay computes for ``backward``: ``T1'ᵀ = E B'ᵀ`` and ``T2'ᵀ = A'ᵀ E`` for ``E = D'ᵀ``.

    These are the paper's ``B' D'`` and ``D' A'``, transposed (free in a GEMM) so the enclave
    unmasks them without a transpose. Each is summed over the batch slices its operand was
    broadcast across (a shared weight): one matrix back instead of one per slice (`grad_shapes`)."""
    t1_shape, t2_shape = grad_shapes(tuple(a.shape), tuple(b.shape), tuple(e.shape))
    return torch.matmul(e, b.mT).sum_to_size(t1_shape), torch.matmul(a.mT, e).sum_to_size(t2_shape)
