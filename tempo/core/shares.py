"""Secret-shared products over the ring Z/2⁶⁴: the arithmetic of the shares mode (issue 15).

Pure functions, no I/O (the engine, relays and routing are in `tempo.enclave.pools`).

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

**Exact products on float hardware.** On a CPU `ring_matmul` is torch's int64 matmul (it wraps
modulo 2⁶⁴); elsewhere it splits each operand into four 16-bit limbs
and multiplies them in float64: a limb product summed over ``n ≤ 2²¹`` terms stays below 2⁵³,
so every partial product is exact; the ten partial products with ``i + j ≤ 3`` are shifted
and summed modulo 2⁶⁴ (CrypTen's construction for CUDA, where int64 matmuls do not exist).

**Randomness at memory speed**: the AES-CTR keystream of a 128-bit key (`Randomness`), each
key fresh from the CSPRNG; pools expand their own randomness from such keys (seeds), so only
``E`` and ``F`` travel in full.

**Integrity, exact.** `verify_pool` checks one pool's answer ``R`` against what the enclave
sent with Freivalds over the ring: ``R r = E(F r) + E(V₁ r) + U₁(F r)`` (pool 1; likewise the
others) for ``r`` uniform over the ring, with no rounding tolerance. A wrong answer ``R = R* + D``,
``D ≠ 0``, passes one round only if ``D r = 0``: for a row of ``D`` whose entry of smallest
2-adic valuation ``v`` is ``d``, ``D_i r`` is uniform over ``2^v Z/2⁶⁴``, so it is 0 with
probability ``2^v / 2⁶⁴ ≤ 1/2`` (``d = 2⁶³``, the worst case) and ``2⁻⁶⁴`` for an odd ``d``:
k rounds miss with probability at most ``2⁻ᵏ``. The mode's own check of the three answers' sum
(`combine_forward`, `_freivalds`) first refuses results outside the product's bound, which
makes every vector worth ``64 − b`` bits for a bound below ``2ᵇ`` (docs/SHARES.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from tempo.core import im2col

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
    """Uniform ring tensors from a counter-based generator: the AES-128-CTR keystream of a key
    (fresh from the CSPRNG unless given), at memory speed (about 3 GB/s on one core with AES-NI,
    ten times numpy's Philox). Successive calls continue the stream."""

    def __init__(self, key: bytes | None = None) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        key = key if key is not None else os.urandom(16)
        if len(key) != 16:
            raise ValueError("a generator key is 16 bytes")
        self._stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        count = int(np.prod(shape)) if shape else 1
        out = np.empty(count + 2, dtype=np.int64)  # update_into wants a block's slack
        self._stream.update_into(_zeros(8 * count), memoryview(out).cast("B"))
        return torch.from_numpy(out[:count]).reshape(shape)


_ZEROS = bytearray()


def _zeros(nbytes: int) -> memoryview:
    """A read-only view of `nbytes` zero bytes (the keystream's plaintext), grown as needed."""
    global _ZEROS
    if len(_ZEROS) < nbytes:
        _ZEROS = bytearray(max(nbytes, 2 * len(_ZEROS)))
    return memoryview(_ZEROS)[:nbytes]


def _limbs(x: torch.Tensor) -> list[torch.Tensor]:
    mask = (1 << LIMB_BITS) - 1
    return [((x >> (LIMB_BITS * k)) & mask).double() for k in range(64 // LIMB_BITS)]


def ring_matmul(a: torch.Tensor, b: torch.Tensor, limbs: bool | None = None) -> torch.Tensor:
    """``A·B mod 2⁶⁴`` for int64 ring tensors (any broadcast batch), exact. On a CPU, torch's
    int64 matmul (integer multiply-adds, which wrap modulo 2⁶⁴: about ten times faster than
    limbs there); on devices without integer matmuls (CUDA), or with `limbs`, float64 products
    of 16-bit limbs."""
    if a.dtype != torch.int64 or b.dtype != torch.int64:
        raise TypeError("ring_matmul multiplies int64 ring tensors")
    if limbs is None:
        limbs = a.device.type != "cpu"
    if not limbs:
        if a.dim() >= 2 and not a.is_contiguous() and a.mT.is_contiguous():
            # A transposed view on the left: torch's integer kernel walks it across rows, ten
            # times slower than (Bᵀ Aᵀ)ᵀ, which reads the stored matrix in order. Same ring product.
            return torch.matmul(b.mT, a.mT).mT
        return torch.matmul(a, b)
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


def forward_share(role: int, e, f, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Pool `role`'s share of ``A·B`` from the opened ``E, F`` and its own masks ``u, v``: pool 1
    ``E(F + V₁) + U₁F``, pool 2 ``E V₂ + U₂ F``, pool 3 ``U V`` (``E, F`` unused: None)."""
    if role == 1:
        return ring_matmul(e, f + v) + ring_matmul(u, f)
    if role == 2:
        return ring_matmul(e, v) + ring_matmul(u, f)
    if role == 3:
        return ring_matmul(u, v)
    raise ValueError(f"pools are 1, 2 and 3, not {role}")


def forward_share_times(role: int, e, f, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``forward_share(role, e, f, u, v) · r`` in matrix-vector work (blaming a pool)."""
    vr = ring_matmul(v, r)
    if role == 3:
        return ring_matmul(u, vr)
    if role not in (1, 2):
        raise ValueError(f"pools are 1, 2 and 3, not {role}")
    fr = ring_matmul(f, r)
    return ring_matmul(e, fr + vr if role == 1 else vr) + ring_matmul(u, fr)


def _operands(pool: int, operands: tuple) -> tuple:
    """`split_product`'s operands for `pool` as ``(E, F, U_i, V_i)`` (pool 3: ``(None, None, U, V)``)."""
    return (None, None, *operands) if pool == 3 else tuple(operands)


def pool_product(pool: int, operands: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """What a relay of `pool` computes from what it was sent (ring tensors in, one out)."""
    return forward_share(pool, *_operands(pool, operands))


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
    return forward_share_times(pool, *_operands(pool, operands), r)


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


# ---------------------------------------------------------------------------------------------
# The mode: one product's requests to the three pools, their answers, and the enclave's checks.
#
# Differences from `split_product` above, for training:
#
# - **Seeds, not random tensors.** Pool 1 expands ``U₁, V₁`` from its seed ``s₁``, pool 2
#   ``U₂, V₂`` from ``s₂``, pool 3 both (``U = U₁ + U₂``, ``V = V₁ + V₂``): only ``E`` and
#   ``F`` travel in full, and the proof above holds with the generator's output in place of
#   uniform tensors (computationally: AES-CTR is a pseudorandom generator).
# - **Private scales.** Each operand is encoded with its own power-of-two scale, chosen in the
#   enclave from its largest entry and never sent: pools compute in the ring without it, and the
#   enclave decodes with the sum of the scales. Products are exact; each operand keeps about
#   ``(61 − log₂ n) / 2`` bits below its largest entry (24 for n = 1024: fp32's mantissa).
# - **Backward reuses the forward's E and F.** ``Δ`` is shared as ``G = Δ − W`` (``W = W₁ + W₂``
#   from fresh seeds ``t₁, t₂``) and, with ``A = E + U`` and ``B = F + V``:
#   ``dA = Δ Bᵀ = G Fᵀ + G Vᵀ + W Fᵀ + W Vᵀ`` and ``dB = Aᵀ Δ = Eᵀ G + Eᵀ W + Uᵀ G + Uᵀ W``,
#   split among the pools as the forward is. The rule that keeps the proof: a pool sees each
#   opened value at most once per secret operand value: ``E`` and ``F`` belong to this
#   product's ``A`` and ``B`` and are never reused for another product (fresh seeds for every
#   product), and ``G`` is opened under a fresh ``W``. Pool 1 then holds ``(E, F, G, s₁, t₁)``:
#   ``E``, ``F``, ``G`` each carry an independent uniform share it lacks (``U₂``, ``V₂``,
#   ``W₂``), so they are uniform and independent given everything else it holds.
# - **Integrity on the sum, blame per pool.** The enclave checks the three answers' ring sum
#   against its own encodings (Freivalds, exact); only when that fails does it check each pool's
#   answer against what that pool was sent, to quarantine the liar.
# ---------------------------------------------------------------------------------------------

ROLES = (1, 2, 3)
SEED_BYTES = 16
# Products stay within ±2⁵⁶ (never near 2⁶³: no wrap, and room for the encodings' rounding).
# Fewer bits would cost precision (each operand keeps about (56 − log₂ n)/2 bits below its
# largest entry: 21 at n = 4608, ResNet's widest); more would cost verification: a result known
# to lie within ±2ᵇ lets each Freivalds vector catch a lie with probability 1 − 2^(b−64)
# (`_freivalds`), 8 bits per vector here.
RING_BITS = 56


def _log2_ceil(x: float) -> int:
    return int(np.ceil(np.log2(x))) if x > 0 else 0


def _abs_max(t: torch.Tensor) -> float:
    if not t.numel():
        return 0.0
    low, high = torch.aminmax(t)  # one pass, no |t| materialised
    return max(-float(low), float(high))


def scale_for(t: torch.Tensor, bits: int) -> tuple[int, int]:
    """The power-of-two scale that puts `t`'s largest entry, rounded, strictly below ``2^bits``
    (so its encoding has at most `bits` bits), and that largest encoded magnitude, exactly
    (rounding is monotonic: the largest entry's encoding is the largest encoding), so no pass
    over the encoding is needed for it. A non-finite operand is the model's divergence
    (`NonFiniteError`), before anything leaves."""
    from tempo.core.verify import NonFiniteError

    top = _abs_max(t)
    if not np.isfinite(top):
        raise NonFiniteError("an operand of an offloaded product holds NaN or infinity (the model diverged?)")
    if top == 0.0:
        return bits, 0
    scale = bits - int(np.floor(np.log2(top))) - 1
    if round(top * 2.0 ** scale) >= 1 << bits:  # rounding reached 2^bits: one step down
        scale -= 1
    return scale, round(top * 2.0 ** scale)


def encode_scaled(t: torch.Tensor, scale: int) -> torch.Tensor:
    """``round(t · 2^scale)`` as ring elements (int64), for any integer `scale`. In the
    caller's float32 when that is exact: multiplying by a normal power of two only moves the
    exponent (what underflows is below 1/2 and rounds to 0 either way), and rounding a float32
    gives a float32 integer, which converts exactly. Else in float64."""
    if t.dtype == torch.float32 and -100 <= scale <= 100:
        return (t * float(2.0 ** scale)).round_().to(torch.int64)
    return torch.round(torch.ldexp(t.double(), torch.tensor(float(scale), dtype=torch.float64))).to(torch.int64)


def decode_scaled(c: torch.Tensor, scale: int, dtype: torch.dtype) -> torch.Tensor:
    """The real value of ring elements (read as signed) carrying ``2^scale``. To float32 in one
    rounding (the conversion; the power of two is exact while it stays a normal float32)."""
    if dtype == torch.float32 and -120 <= scale <= 120:
        return c * float(2.0 ** -scale)  # int64 × float: computed in float32, one pass
    return torch.ldexp(c.double(), torch.tensor(float(-scale), dtype=torch.float64)).to(dtype)


def sum_to(t: torch.Tensor, shape: tuple) -> torch.Tensor:
    """`t` summed (in the ring: int64 wraps) over the leading axes it was broadcast across."""
    shape = tuple(shape)
    if tuple(t.shape) == shape:
        return t
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead > 0 else t
    dims = tuple(i for i, (x, y) in enumerate(zip(t.shape, shape)) if y == 1 and x != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _expand(seed: bytes, *shapes: tuple) -> list[torch.Tensor]:
    rng = Randomness(seed)
    return [rng.uniform(tuple(s)) for s in shapes]


def _batch(a_shape: tuple, b_shape: tuple) -> int:
    return int(np.prod(torch.broadcast_shapes(torch.Size(a_shape[:-2]), torch.Size(b_shape[:-2])))) or 1


@dataclass
class Opened:
    """One product as the enclave holds it: encodings and their private scales, the seeds, and
    what each pool was sent (header fields and tensors: what a relay of that pool sees)."""

    a_shape: tuple
    b_shape: tuple
    enc_a: torch.Tensor
    enc_b: torch.Tensor
    scale_a: int
    scale_b: int
    seeds: tuple[bytes, bytes]
    dtype: torch.dtype
    requests: dict[int, tuple[dict, tuple[torch.Tensor, ...]]]
    # the largest encoded entries (what bounds every exact product: `_freivalds`)
    max_a: int = 0
    max_b: int = 0
    # backward, once `open_backward` ran
    enc_d: torch.Tensor | None = None
    max_d: int = 0
    scale_d: int = 0
    grad_seeds: tuple[bytes, bytes] | None = None
    grad_requests: dict[int, tuple[dict, tuple[torch.Tensor, ...]]] | None = None
    # a convolution (`open_forward`'s `conv`): ``A`` is the image batch (`x_shape`) and
    # `a_shape` its patch rows' shape, which the pools build themselves (`tempo.core.im2col`)
    conv: im2col.Conv | None = None
    x_shape: tuple | None = None


def open_forward(a: torch.Tensor, b: torch.Tensor, seeds: tuple[bytes, bytes] | None = None,
                 conv: im2col.Conv | None = None) -> Opened:
    """Encode ``A`` and ``B`` under private scales and open ``E = A − U``, ``F = B − V``: the
    three pools' requests for ``C = A·B`` (pools 1, 2: seed and ``E, F``; pool 3: both seeds).

    With `conv` (a convolution's geometry, `tempo.core.im2col`), ``A`` is the image batch
    (n, C, H, W) and the product is ``patch_rows(A) · B``, ``B`` (C·kh·kw × out): the enclave
    opens the images, not their patch rows (kh·kw times fewer entries for a stride-1 kernel),
    and every pool unfolds its own share (unfolding is linear, so the shares of the patch rows
    are the patch rows of the shares); the backward's ``dL/dA`` comes back folded."""
    if conv is not None:
        conv = im2col.check_conv(conv)
        if a.dim() != 4 or b.dim() != 2 or b.shape[0] != a.shape[1] * conv[0] * conv[1]:
            raise ValueError(f"a convolution's product takes images (n, C, H, W) and a (C·kh·kw × out) weight, not "
                             f"{tuple(a.shape)} and {tuple(b.shape)} for a {conv[0]}×{conv[1]} kernel")
        rows = im2col.rows_shape(tuple(a.shape), conv)
    elif a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"shared products take matrices (or batches of them), not shapes {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    n = rows[1] if conv is not None else a.shape[-1]
    if b.shape[-2] != n:
        raise ValueError(f"A {tuple(a.shape)} and B {tuple(b.shape)} do not multiply")
    if n > MAX_INNER:
        raise RingOverflow(f"inner dimension {n} exceeds {MAX_INNER}")
    half = (RING_BITS - _log2_ceil(n)) // 2
    if half < 8:
        raise RingOverflow(f"inner dimension {n} leaves fewer than 8 bits per operand")
    (sa, max_a), (sb, max_b) = scale_for(a, half), scale_for(b, half)
    ea, eb = encode_scaled(a, sa), encode_scaled(b, sb)
    s1, s2 = seeds if seeds is not None else (os.urandom(SEED_BYTES), os.urandom(SEED_BYTES))
    u1, v1 = _expand(s1, ea.shape, eb.shape)
    u2, v2 = _expand(s2, ea.shape, eb.shape)
    # E = A₀ − U₁ − U₂ into U₁'s memory (the enclave regenerates U₁ from s₁ if it ever needs it)
    e, f = torch.sub(ea, u1, out=u1).sub_(u2), torch.sub(eb, v1, out=v1).sub_(v2)
    shapes = {"a": list(ea.shape), "b": list(eb.shape), **({"conv": list(conv)} if conv is not None else {})}
    requests = {1: ({"role": 1, "seeds": [s1], **shapes}, (e, f)),
                2: ({"role": 2, "seeds": [s2], **shapes}, (e, f)),
                3: ({"role": 3, "seeds": [s1, s2], **shapes}, ())}
    return Opened(rows if conv is not None else tuple(a.shape), tuple(b.shape), ea, eb, sa, sb, (s1, s2), a.dtype,
                  requests, max_a=max_a, max_b=max_b, conv=conv, x_shape=tuple(a.shape) if conv is not None else None)


def open_backward(op: Opened, grad_c: torch.Tensor, seeds: tuple[bytes, bytes] | None = None) -> None:
    """Encode ``Δ = dL/dC`` under its own private scale and open ``G = Δ − W``: each pool's
    backward request (pools 1, 2: seed and ``G``, with the forward's ``E, F``; pool 3: seeds)."""
    m, p = op.a_shape[-2], op.b_shape[-1]
    if tuple(grad_c.shape[-2:]) != (m, p):
        raise ValueError(f"dL/dC has shape {tuple(grad_c.shape)}; the forward made (…, {m}, {p})")
    # dA = Δ Bᵀ sums p terms (times the slices A was broadcast across), dB = Aᵀ Δ sums m (times B's)
    batch = _batch(op.a_shape, op.b_shape)
    slices_a, slices_b = max(1, int(np.prod(op.a_shape[:-2]))), max(1, int(np.prod(op.b_shape[:-2])))
    terms = max(p * batch // slices_a, m * batch // slices_b)
    if op.conv is not None:  # a folded dL/dA entry sums up to kh·kw patch entries, each of p terms
        terms = max(p * op.conv[0] * op.conv[1], m)
    top_a, top_b = _log2_ceil(op.max_a + 1), _log2_ceil(op.max_b + 1)
    bits = RING_BITS - max(top_a, top_b) - _log2_ceil(terms)
    if bits < 8:
        raise RingOverflow(f"the backward of a {op.a_shape} × {op.b_shape} product leaves {bits} bits for dL/dC")
    sd, max_d = scale_for(grad_c, bits)
    ed = encode_scaled(grad_c, sd)
    t1, t2 = seeds if seeds is not None else (os.urandom(SEED_BYTES), os.urandom(SEED_BYTES))
    (w1,), (w2,) = _expand(t1, ed.shape), _expand(t2, ed.shape)
    g = torch.sub(ed, w1, out=w1).sub_(w2)
    shape = {"d": list(ed.shape)}
    op.enc_d, op.scale_d, op.grad_seeds, op.max_d = ed, sd, (t1, t2), max_d
    op.grad_requests = {1: ({"role": 1, "seeds": [t1], **shape}, (g,)),
                        2: ({"role": 2, "seeds": [t2], **shape}, (g,)),
                        3: ({"role": 3, "seeds": [t1, t2], **shape}, ())}


def _pool_masks(header: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The U-part and V-part a pool expands from the seeds it was given (pool 3: the sums)."""
    parts = [_expand(s, header["a"], header["b"]) for s in header["seeds"]]
    return sum(p[0] for p in parts[1:]) + parts[0][0], sum(p[1] for p in parts[1:]) + parts[0][1]


def _pool_grad_mask(header: dict) -> torch.Tensor:
    parts = [_expand(s, header["d"])[0] for s in header["seeds"]]
    return sum(parts[1:]) + parts[0] if len(parts) > 1 else parts[0]


def pool_answer(forward: tuple[dict, tuple], backward: tuple[dict, tuple] | None = None) -> tuple[torch.Tensor, ...]:
    """What a relay of a pool computes from its requests (pure; the same for every pool member).

    Forward: pool 1 ``E(F + V₁) + U₁F``, pool 2 ``E V₂ + U₂ F``, pool 3 ``U V``. Backward (with
    the forward's request): pool 1 ``(G(F + V₁)ᵀ + W₁Fᵀ, Eᵀ(G + W₁) + U₁ᵀG)``, pool 2
    ``(G V₂ᵀ + W₂ Fᵀ, Eᵀ W₂ + U₂ᵀ G)``, pool 3 ``(W Vᵀ, Uᵀ W)``, each summed to its operand's
    shape. A convolution (``conv`` in the header): ``E`` and ``U`` are images, unfolded into patch
    rows here, and the first backward answer is folded back to the images' shape."""
    header, tensors = forward
    role = header["role"]
    u, v = _pool_masks(header)
    a_shape, b_shape = tuple(header["a"]), tuple(header["b"])
    e, f = tensors if role != 3 else (None, None)
    conv = header.get("conv")
    if conv is not None:
        conv = im2col.check_conv(conv)
        if len(a_shape) != 4:
            raise ValueError("a convolution's request holds images (n, C, H, W)")
        x_shape, a_shape = a_shape, im2col.rows_shape(a_shape, conv)
        u, e = im2col.patch_rows(u, conv), (None if e is None else im2col.patch_rows(e, conv))
    if backward is None:
        return (forward_share(role, e, f, u, v),)
    w = _pool_grad_mask(backward[0])
    if role == 3:
        da, db = ring_matmul(w, v.mT), ring_matmul(u.mT, w)
    else:
        (g,) = backward[1]
        if role == 1:
            da = ring_matmul(g, (f + v).mT) + ring_matmul(w, f.mT)
            db = ring_matmul(e.mT, g + w) + ring_matmul(u.mT, g)
        else:
            da = ring_matmul(g, v.mT) + ring_matmul(w, f.mT)
            db = ring_matmul(e.mT, w) + ring_matmul(u.mT, g)
    da = im2col.fold_rows(da, x_shape, conv) if conv is not None else sum_to(da, a_shape)
    return da, sum_to(db, b_shape)


def answer_shapes(op: Opened, backward: bool) -> list[tuple]:
    """The shapes every pool's answer has (int64)."""
    if backward and op.conv is not None:
        return [op.x_shape, op.b_shape]
    if not backward:
        batch = tuple(torch.broadcast_shapes(torch.Size(op.a_shape[:-2]), torch.Size(op.b_shape[:-2])))
        return [(*batch, op.a_shape[-2], op.b_shape[-1])]
    return [op.a_shape, op.b_shape]


def _fits(answers: dict[int, tuple], shapes: list[tuple]) -> bool:
    return set(answers) == set(ROLES) and all(
        len(ans) == len(shapes) and all(t.dtype == torch.int64 and tuple(t.shape) == s for t, s in zip(ans, shapes))
        for ans in answers.values())


def _bounded(result: torch.Tensor, bound: int, rounds: int) -> tuple[bool, int]:
    """Whether every entry of `result` lies within ``±bound`` (the exact product's), and how
    many uniform vectors then make `rounds` rounds: ``⌈rounds / (64 − b)⌉`` for
    ``bound < 2^b`` (`_freivalds`)."""
    if bound >= 1 << 62:
        raise RingOverflow("a product's bound leaves no room for its check")
    in_range = True
    if result.numel():
        low, high = torch.aminmax(result)
        in_range = -bound <= int(low) and int(high) <= bound
    return in_range, -(-rounds // (64 - max(1, bound.bit_length())))


def _conv_checks(op: Opened, rounds: int, rng: Randomness, c: torch.Tensor | None = None,
                 dx: torch.Tensor | None = None, dw: torch.Tensor | None = None) -> bool:
    """`_freivalds` for a convolution's products, each in one pass over what it checks and one
    over the images (or ``Δ``), never building patch rows (`tempo.core.im2col`):
    ``C = R·B`` as ``s·C = (s·R)·B``; ``dL/dB = Rᵀ·Δ`` as ``dL/dB·r = (Δr)ᵀ·R`` transposed;
    ``dL/dA = fold(Δ·Bᵀ)`` as ``s·dL/dA = Σ_k (S_k·Δ)·B_kᵀ`` with ``S_k`` the image-position
    vectors `s` read at each output position by kernel offset ``k``. Each is a uniform vector
    against the result (the same soundness as `_freivalds`), after its own bound. All given
    checks run whatever fails first."""
    mm, conv, x = ring_matmul, op.conv, op.enc_a
    (m, k), p = op.a_shape, op.b_shape[-1]
    kk = conv[0] * conv[1]
    ok = True
    if c is not None:
        in_range, vectors = _bounded(c, op.max_a * op.max_b * k, rounds)
        s = rng.uniform((vectors, m))
        ok &= torch.equal(mm(s, c), mm(im2col.rows_left(s, x, conv, mm), op.enc_b)) and in_range
    if dw is not None:
        in_range, vectors = _bounded(dw, op.max_a * op.max_d * m, rounds)
        r = rng.uniform((p, vectors))
        y = mm(op.enc_d, r).mT.contiguous()  # v × m
        ok &= torch.equal(mm(dw, r), im2col.rows_left(y, x, conv, mm).mT) and in_range
    if dx is not None:
        n, ch, h, w = op.x_shape
        in_range, vectors = _bounded(dx, op.max_d * op.max_b * p * kk, rounds)
        s = rng.uniform((vectors, n * h * w))
        lhs = mm(dx.reshape(n, ch, h * w), s.view(vectors, n, h * w).permute(1, 2, 0).contiguous()).sum(0)  # C × v
        z = mm(im2col.windows_left(s, op.x_shape, conv), op.enc_d).view(kk, vectors, p)
        rhs = mm(op.enc_b.view(ch, kk, p).transpose(0, 1), z.mT).sum(0)  # Σ_k B_k · (S_k Δ)ᵀ: C × v
        ok &= torch.equal(lhs, rhs) and in_range
    return bool(ok)


def _freivalds(result: torch.Tensor, left: torch.Tensor, right: torch.Tensor, shape: tuple, rounds: int,
               rng: Randomness, top_left: int, top_right: int) -> bool:
    """Whether ``result == sum_to(left · right, shape)`` in the ring, a wrong result passing
    with probability at most ``2^-rounds``.

    The exact product lies within ``±β``, ``β = max|left| · max|right| · terms`` (the inner
    dimension times the slices summed), with ``β < 2^b``. So does `result`, or it is refused
    outright. Then ``D = result − product``, read as integers, is nonzero with ``|D| < 2^(b+1)``
    in every entry: its smallest 2-adic valuation ``v`` is at most ``b``, and a uniform vector
    misses it with probability ``2^(v−64) ≤ 2^(b−64)``: each vector is worth ``64 − b`` bits,
    and ``⌈rounds / (64 − b)⌉`` vectors are drawn."""
    batch = torch.broadcast_shapes(left.shape[:-2], right.shape[:-2])
    terms = left.shape[-1] * max(1, int(np.prod(batch)) // max(1, int(np.prod(shape[:-2]))))
    # vectors on the side that keeps the big stored matrices the right operand of each integer
    # matmul (`ring_matmul`): from the left unless the left factor is a transposed view
    from_left = left.is_contiguous() or not left.mT.is_contiguous()
    in_range, vectors = _bounded(result, top_left * top_right * terms, rounds)
    # both checks always run: how long a refusal takes must not depend on which one refused
    # (whether a lie left the bound depends on the data)
    if from_left:  # sᵀ·result = (sᵀ·left)·right
        s = rng.uniform((vectors, left.shape[-2]))
        same = torch.equal(ring_matmul(s, result),
                           sum_to(ring_matmul(ring_matmul(s, left), right), shape[:-2] + (vectors, shape[-1])))
    else:
        r = rng.uniform((right.shape[-1], vectors))
        same = torch.equal(ring_matmul(result, r), sum_to(ring_matmul(left, ring_matmul(right, r)), shape[:-1] + (vectors,)))
    return bool(same) and in_range


def combine_forward(op: Opened, answers: dict[int, tuple], rounds: int = 16) -> torch.Tensor | None:
    """``C = A·B`` from the pools' answers, or None when their ring sum is not exactly the
    product of the enclave's encodings (Freivalds over the ring, `rounds` rounds)."""
    shapes = answer_shapes(op, False)
    if not _fits(answers, shapes):
        return None
    total = (answers[1][0] + answers[2][0]).add_(answers[3][0])
    if op.conv is not None:
        if not _conv_checks(op, rounds, Randomness(), c=total):
            return None
    elif not _freivalds(total, op.enc_a, op.enc_b, shapes[0], rounds, Randomness(), op.max_a, op.max_b):
        return None
    return decode_scaled(total, op.scale_a + op.scale_b, op.dtype)


def combine_backward(op: Opened, answers: dict[int, tuple], rounds: int = 16) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(dL/dA, dL/dB)`` from the pools' backward answers, or None unless both sums are exact."""
    if op.enc_d is None:
        raise ValueError("no backward was opened for this product")
    shapes = answer_shapes(op, True)
    if not _fits(answers, shapes):
        return None
    da = (answers[1][0] + answers[2][0]).add_(answers[3][0])
    db = (answers[1][1] + answers[2][1]).add_(answers[3][1])
    rng = Randomness()
    if op.conv is not None:
        if not _conv_checks(op, rounds, rng, dx=da, dw=db):
            return None
    elif not (_freivalds(da, op.enc_d, op.enc_b.mT, shapes[0], rounds, rng, op.max_d, op.max_b)
              & _freivalds(db, op.enc_a.mT, op.enc_d, shapes[1], rounds, rng, op.max_a, op.max_d)):
        return None
    return (decode_scaled(da, op.scale_d + op.scale_b, op.dtype), decode_scaled(db, op.scale_a + op.scale_d, op.dtype))


def honest_answer_check(op: Opened, role: int, answer: tuple, backward: bool, rounds: int = 16) -> bool:
    """Whether one pool's answer is exactly what that pool owes for what it was sent (Freivalds
    against its own requests): who lied, once a sum failed. Costs a pool's work in matrix-vector
    products."""
    shapes = answer_shapes(op, backward)
    if len(answer) != len(shapes) or any(t.dtype != torch.int64 or tuple(t.shape) != s for t, s in zip(answer, shapes)):
        return False
    if op.conv is not None:  # recomputed: rare, and exact (a pool's whole work)
        owed = pool_answer(op.requests[role], op.grad_requests[role] if backward else None)
        return all(torch.equal(t, o) for t, o in zip(answer, owed))
    fwd = op.requests[role]
    u, v = _pool_masks(fwd[0])
    e, f = fwd[1] if role != 3 else (None, None)
    rng = Randomness()
    if not backward:
        r = rng.uniform((shapes[0][-1], rounds))
        return bool(torch.equal(ring_matmul(answer[0], r), forward_share_times(role, e, f, u, v, r)))
    bwd = op.grad_requests[role]
    w = _pool_grad_mask(bwd[0])
    g = bwd[1][0] if role != 3 else None
    # dA (…, m, n): right-multiply by r (n); dB (…, n, p): by r (p)
    ra, rb = rng.uniform((shapes[0][-1], rounds)), rng.uniform((shapes[1][-1], rounds))
    a_sh, b_sh = shapes[0][:-1] + (rounds,), shapes[1][:-1] + (rounds,)
    mm = ring_matmul
    if role == 1:
        want_a = mm(g, mm((f + v).mT, ra)) + mm(w, mm(f.mT, ra))
        want_b = mm(e.mT, mm(g + w, rb)) + mm(u.mT, mm(g, rb))
    elif role == 2:
        want_a = mm(g, mm(v.mT, ra)) + mm(w, mm(f.mT, ra))
        want_b = mm(e.mT, mm(w, rb)) + mm(u.mT, mm(g, rb))
    else:
        want_a, want_b = mm(w, mm(v.mT, ra)), mm(u.mT, mm(w, rb))
    return (bool(torch.equal(mm(answer[0], ra), sum_to(want_a, a_sh)))
            and bool(torch.equal(mm(answer[1], rb), sum_to(want_b, b_sh))))
