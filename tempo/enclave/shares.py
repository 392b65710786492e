"""Secret-shared products over the ring Z/2⁶⁴: the arithmetic of the shares mode (issue 15).

Pure functions, no I/O; the relay pools, routing and the training mode are not built yet.

**Encoding.** A real ``x`` is the ring element ``round(x · 2^f) mod 2⁶⁴``, held as int64 (two's
complement: the ring's addition and multiplication are int64's, wrapping). ``f = FRAC_BITS`` =
16. A product of two encodings carries ``2^(2f)``; `decode` divides it out. Nothing wraps
unintentionally: `check_range` refuses operands whose exact product could leave
``(−2⁶³, 2⁶³)`` (``max|A| · max|B| · n · 2^(2f) < 2⁶³``), before anything is shared.

**Shares.** ``x = x₁ + x₂ (mod 2⁶⁴)`` with ``x₁`` uniform: either share alone is uniform and
independent of ``x``.

**Three pools, one product** ``C = A·B`` (both secret; all randomness fresh per product):
``U, V`` uniform, ``E = A − U``, ``F = B − V``, ``U = U₁ + U₂``, ``V = V₁ + V₂``:

- pool 1 gets ``E, F, U₁, V₁`` and returns ``E·F + E·V₁ + U₁·F``;
- pool 2 gets ``E, F, U₂, V₂`` and returns ``E·V₂ + U₂·F``;
- pool 3 gets ``U, V`` and returns ``U·V``;

and ``sum = E·F + E·V + U·F + U·V = (E + U)(F + V) = A·B (mod 2⁶⁴)``, exactly.

**Each pool's view is independent of A and B.** Pool 1 holds ``(E, F, U₁, V₁)``. ``U₁`` and
``U₂`` are independent and uniform, so ``E = A − U₁ − U₂`` is uniform given ``U₁`` whatever
``A`` is (adding an independent uniform ring element to anything gives a uniform element);
likewise ``F`` given ``V₁``. The four are independent uniform tensors: their joint law does not
depend on ``(A, B)``. Pool 2 is the same with indices swapped; pool 3 holds ``(U, V)``,
uniform. **Any two pools together learn A and B** (1+2: ``E + U₁ + U₂``; 1+3 or 2+3:
``E + U``): the guarantee needs three trust domains that do not collude.

**Exact products on float hardware.** `ring_matmul` splits each operand into four 16-bit limbs
and multiplies them in float64: a limb product summed over ``n ≤ 2²¹`` terms stays below 2⁵³,
so every partial product is exact; the ten partial products with ``i + j ≤ 3`` are shifted
and summed modulo 2⁶⁴ (CrypTen's construction for CUDA, where int64 matmuls do not exist).

**Randomness at memory speed**: a Philox counter-based generator keyed from the CSPRNG
(`Randomness`), one key per product.

**Integrity, exact.** `verify_pool` checks a pool's answer ``R`` against what the enclave sent
with Freivalds over the ring: ``R r = E(F r) + E(V₁ r) + U₁(F r)`` (pool 1; likewise the others)
for ``r`` uniform over the ring, with no rounding tolerance. A wrong answer ``R = R* + D``,
``D ≠ 0``, passes one round only if ``D r = 0``: for a row of ``D`` whose entry of smallest
2-adic valuation ``v`` is ``d``, ``D_i r`` is uniform over ``2^v Z/2⁶⁴``, so it is 0 with
probability ``2^v / 2⁶⁴ ≤ 1/2`` (``d = 2⁶³``, the worst case) and ``2⁻⁶⁴`` for an odd ``d``:
k rounds miss with probability at most ``2⁻ᵏ``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

FRAC_BITS = 16
LIMB_BITS = 16
MAX_INNER = 1 << 21  # limb products summed over more terms than this could exceed 2⁵³


class RingOverflow(ValueError):
    """Operands too large for the ring at this precision: their product would wrap."""


def encode(x: torch.Tensor, frac_bits: int = FRAC_BITS) -> torch.Tensor:
    """``round(x · 2^f)`` as int64 (the ring element), from a float tensor."""
    if not x.dtype.is_floating_point:
        raise TypeError(f"encode takes a float tensor, not {x.dtype}")
    scaled = torch.round(x.double() * float(1 << frac_bits))
    if not torch.isfinite(scaled).all() or bool((scaled.abs() >= 2.0**62).any()):
        raise RingOverflow("a value is not finite or too large to encode")
    return scaled.to(torch.int64)


def decode(c: torch.Tensor, scale_bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The real value of ring elements carrying ``2^scale_bits`` (read as signed)."""
    return (c.double() / float(1 << scale_bits)).to(dtype)


def check_range(a: torch.Tensor, b: torch.Tensor, frac_bits: int = FRAC_BITS) -> None:
    """Refuse ``A·B`` when its exact encoded value could leave the signed range of the ring."""
    n = a.shape[-1]
    if n > MAX_INNER:
        raise RingOverflow(f"inner dimension {n} exceeds {MAX_INNER}: limb products would not be exact")
    bound = float(a.abs().max()) * float(b.abs().max()) * n * 2.0 ** (2 * frac_bits) if a.numel() and b.numel() else 0.0
    margin = (float(a.abs().max()) + float(b.abs().max()) + 1.0) * n * 2.0**frac_bits  # the rounding of the encodings
    if not np.isfinite(bound) or bound + margin >= 2.0**62:
        raise RingOverflow(f"|A|·|B|·n = {bound / 2.0 ** (2 * frac_bits):.3g} does not fit the ring with "
                           f"{frac_bits} fractional bits (at most {2.0 ** (62 - 2 * frac_bits):.3g})")


class Randomness:
    """Uniform ring tensors from Philox keyed by the CSPRNG (a fresh 128-bit key per instance)."""

    def __init__(self, key: bytes | None = None) -> None:
        key = key if key is not None else os.urandom(16)
        self._bits = np.random.Philox(key=int.from_bytes(key, "little"))

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        count = int(np.prod(shape)) if shape else 1
        raw = self._bits.random_raw(count).astype(np.uint64, copy=False)
        return torch.from_numpy(raw.view(np.int64).reshape(shape).copy())


def share(x: torch.Tensor, rng: Randomness) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x₁, x₂)`` with ``x₁`` uniform and ``x₁ + x₂ = x (mod 2⁶⁴)``."""
    x1 = rng.uniform(tuple(x.shape))
    return x1, x - x1


def _limbs(x: torch.Tensor) -> list[torch.Tensor]:
    mask = (1 << LIMB_BITS) - 1
    return [((x >> (LIMB_BITS * k)) & mask).double() for k in range(64 // LIMB_BITS)]


def ring_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``A·B mod 2⁶⁴`` for int64 ring tensors (any broadcast batch), exact, through float64
    products of 16-bit limbs."""
    if a.dtype != torch.int64 or b.dtype != torch.int64:
        raise TypeError("ring_matmul multiplies int64 ring tensors")
    if a.shape[-1] > MAX_INNER:
        raise RingOverflow(f"inner dimension {a.shape[-1]} exceeds {MAX_INNER}")
    la, lb = _limbs(a), _limbs(b)
    parts = len(la)
    out = None
    for i in range(parts):
        for j in range(parts - i):
            p = torch.matmul(la[i], lb[j]).to(torch.int64) << (LIMB_BITS * (i + j))  # wraps mod 2⁶⁴
            out = p if out is None else out + p
    return out


@dataclass
class SharedProduct:
    """One product's three pool requests and what the enclave keeps to combine the answers."""

    pool1: tuple[torch.Tensor, ...]  # E, F, U₁, V₁
    pool2: tuple[torch.Tensor, ...]  # E, F, U₂, V₂
    pool3: tuple[torch.Tensor, ...]  # U, V
    frac_bits: int
    dtype: torch.dtype

    def requests(self) -> dict[int, tuple[torch.Tensor, ...]]:
        return {1: self.pool1, 2: self.pool2, 3: self.pool3}


def split_product(a: torch.Tensor, b: torch.Tensor, rng: Randomness | None = None,
                  frac_bits: int = FRAC_BITS) -> SharedProduct:
    """The three pools' operands for ``A·B`` (float tensors; fresh randomness each call)."""
    check_range(a, b, frac_bits)
    rng = rng or Randomness()
    ea, eb = encode(a, frac_bits), encode(b, frac_bits)
    u1, u2 = rng.uniform(tuple(ea.shape)), rng.uniform(tuple(ea.shape))
    v1, v2 = rng.uniform(tuple(eb.shape)), rng.uniform(tuple(eb.shape))
    u, v = u1 + u2, v1 + v2
    e, f = ea - u, eb - v
    return SharedProduct((e, f, u1, v1), (e, f, u2, v2), (u, v), frac_bits, a.dtype)


def pool_product(pool: int, operands: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """What a relay of `pool` computes from what it was sent (ring tensors in, one out)."""
    if pool == 1:
        e, f, u1, v1 = operands
        return ring_matmul(e, f) + ring_matmul(e, v1) + ring_matmul(u1, f)
    if pool == 2:
        e, f, u2, v2 = operands
        return ring_matmul(e, v2) + ring_matmul(u2, f)
    if pool == 3:
        u, v = operands
        return ring_matmul(u, v)
    raise ValueError(f"pools are 1, 2 and 3, not {pool}")


def combine(product: SharedProduct, results: dict[int, torch.Tensor]) -> torch.Tensor:
    """``A·B`` from the three pools' answers: their ring sum, decoded."""
    missing = {1, 2, 3} - set(results)
    if missing:
        raise ValueError(f"no answer from pool(s) {sorted(missing)}")
    total = results[1] + results[2] + results[3]
    return decode(total, 2 * product.frac_bits, product.dtype)


def shared_matmul(a: torch.Tensor, b: torch.Tensor, rng: Randomness | None = None,
                  frac_bits: int = FRAC_BITS) -> torch.Tensor:
    """``A·B`` through the three pools' arithmetic, all in this process (tests, reference)."""
    product = split_product(a, b, rng, frac_bits)
    return combine(product, {pool: pool_product(pool, ops) for pool, ops in product.requests().items()})


def encoding_error_bound(a: torch.Tensor, b: torch.Tensor, frac_bits: int = FRAC_BITS) -> torch.Tensor:
    """Per entry of ``A·B``, a bound on ``|shared_matmul(A, B) − A·B|``: each encoding is off by
    at most ``2^-(f+1)``, so the product is off by ``(|A| 1 + 1 |B| + n/2^(f+1)) / 2^(f+1)``,
    plus the float rounding of the reference itself."""
    h = 2.0 ** -(frac_bits + 1)
    n = a.shape[-1]
    a_rows = a.double().abs().sum(-1, keepdim=True)  # (…, m, 1)
    b_cols = b.double().abs().sum(-2, keepdim=True)  # (…, 1, p)
    ref = torch.matmul(a.double().abs(), b.double().abs())
    return h * (a_rows + b_cols + n * h) + 4 * torch.finfo(a.dtype).eps * ref + 2.0 ** -(2 * frac_bits)


def pool_times(pool: int, operands: tuple[torch.Tensor, ...], r: torch.Tensor) -> torch.Tensor:
    """``R r`` for the honest answer ``R`` of `pool`, from its operands, in matrix-vector work."""
    if pool == 1:
        e, f, u1, v1 = operands
        fr = ring_matmul(f, r)
        return ring_matmul(e, fr + ring_matmul(v1, r)) + ring_matmul(u1, fr)
    if pool == 2:
        e, f, u2, v2 = operands
        return ring_matmul(e, ring_matmul(v2, r)) + ring_matmul(u2, ring_matmul(f, r))
    if pool == 3:
        u, v = operands
        return ring_matmul(u, ring_matmul(v, r))
    raise ValueError(f"pools are 1, 2 and 3, not {pool}")


def verify_pool(pool: int, operands: tuple[torch.Tensor, ...], result: torch.Tensor, rounds: int,
                rng: Randomness | None = None) -> bool:
    """Freivalds over the ring: whether `result` is `pool`'s exact answer to `operands`, each
    round with a fresh uniform vector (a wrong answer passes with probability ≤ 2^-rounds)."""
    if rounds < 1:
        raise ValueError("verification needs at least one round")
    rng = rng or Randomness()
    left, right = operands[0], operands[1]
    p = right.shape[-1]
    want = tuple(torch.broadcast_shapes(left.shape[:-2], right.shape[:-2])) + (left.shape[-2], p)
    if result.dtype != torch.int64 or tuple(result.shape) != want:
        return False
    r = rng.uniform((p, rounds))
    return bool(torch.equal(ring_matmul(result, r), pool_times(pool, operands, r)))
