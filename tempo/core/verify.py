"""Freivalds verification of offloaded products (paper Algorithm 3 lines 3–8, Theorem V.2).

The enclave holds ``A`` and ``B`` and receives a decrypted ``C`` that should equal ``A @ B``. With
``k`` fresh random 0/1 vectors ``r`` (columns of ``R``) it checks ``A (B R) − C R ≈ 0``: a wrong
``C`` passes one vector with probability at most 1/2, so ``k`` rounds leave at most ``2⁻ᵏ``.

Floating point makes an honest ``A (B R) − C R`` non-zero, so every entry is compared with a
rigorous rounding bound (`rounding_bound`) instead of 0: honest results never fail, and a
result is rejected when it is off by more than that bound. Non-finite values always fail, a
wrong shape or dtype fails, and any doubt fails (fail closed).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from tempo.core.keys import RandomBytes


class IntegrityError(RuntimeError):
    """An offloaded result failed verification: the step must not use it."""


def freivalds_rounds(t: float, alpha: float = 1.0, workers: int = 1, layers: int = 1) -> int:
    """The smallest ``k`` with ``k > log2(1 / (1 − (1 − t)^(1/(α N L))))`` (Theorem V.2).

    `t` is the target probability that any wrong result goes undetected in the whole task;
    ``α N L`` offloaded products are checked (see `training_alpha`).
    """
    if not 0.0 < t < 1.0:
        raise ValueError(f"target t must be in (0, 1), got {t}")
    if alpha <= 0 or workers < 1 or layers < 1:
        raise ValueError("alpha must be positive and workers, layers at least 1")
    count = alpha * workers * layers
    # 1 − (1 − t)^(1/count), computed without cancellation for small t
    per_check = -math.expm1(math.log1p(-t) / count)
    bound = math.log2(1.0 / per_check)
    k = math.floor(bound) + 1  # strictly greater
    return max(k, 1)


def training_alpha(epochs: int, dataset_size: int, batch_size: int) -> int:
    """α for training: ``3 n ⌈|D| / B⌉`` (n epochs; one forward and two backward products)."""
    if epochs < 1 or dataset_size < 1 or batch_size < 1:
        raise ValueError("epochs, dataset size and batch size must be positive")
    return 3 * epochs * math.ceil(dataset_size / batch_size)


def _gamma(k: int, u: float) -> float:
    """Higham's γ_k = k u / (1 − k u): the relative error bound of a k-term sum or product."""
    ku = k * u
    if ku >= 0.5:
        raise ValueError(
            f"inner dimension {k} is too large for a rigorous rounding bound at unit roundoff {u:g}"
        )
    return ku / (1.0 - ku)


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2 for a floating dtype (round to nearest)."""
    return torch.finfo(dtype).eps / 2.0


class NonFiniteError(ValueError):
    """The enclave's own operands hold NaN or infinity, or their product overflows: the model
    diverged (or its inputs are bad). Nothing is sent, and no relay is to blame."""


def operand_bound(a: torch.Tensor, b: torch.Tensor, summed_to: tuple | None = None) -> torch.Tensor:
    """``|A| (|B| 1)``, shape ``(*batch, m)`` (or ``(*summed_to, m)``, summed like the product):
    the scale of every rounding error an honest ``C = A @ B`` can carry, from the enclave's own
    operands only. Non-finite exactly when ``A`` or ``B`` holds NaN or infinity, or the product
    can overflow; computed before the operands leave (`OffloadClient`), kept for the check."""
    b_row = b.abs().sum(dim=-1, keepdim=True)  # |B| 1, shape (*, n, 1)
    a_b = _abs_matvec(a, b_row).squeeze(-1)  # |A| (|B| 1), shape (*, m)
    if summed_to is not None:
        a_b = a_b.sum_to_size((*summed_to, a_b.shape[-1]))
    return a_b


def masked_relay_bound(left: torch.Tensor, right: torch.Tensor, row_key, col_key, row_scale: torch.Tensor,
                       col_scale: torch.Tensor, summed_to: tuple | None = None) -> torch.Tensor:
    """Per plaintext row, ``w`` such that the rounding error ``E'`` of the relay's product
    ``left @ right`` (masked operands, ``|E'| ≤ γ |left||right|``) moves the unmasked result's
    ``E r`` by at most ``γ·w`` for any 0/1 vector ``r``.

    For keys that mix blocks of positions (`keys.AxisKey.mix`) the plaintext ``|A|(|B|1)`` does
    not bound that error: unmasking multiplies it by the blocks. Here it is followed through:
    ``r`` mixed by the column blocks (``|Q r| ≤ |Q| 1``), scaled by `col_scale` (what unmasking
    multiplies the masked columns by), through ``|left|(|right| ·)``, scaled by `row_scale`,
    back through the row blocks (``|Qᵀ| ·``), to plaintext rows. Costs a pass over each masked
    operand, as the plaintext bound does."""
    dtype = left.dtype
    y = col_scale.abs().to(dtype) * _block_row_abs_sums(col_key, dtype)  # masked columns
    w = _abs_matvec(left, right.abs() @ y.unsqueeze(-1)).squeeze(-1)  # |left|(|right| y), masked rows
    if summed_to is not None:
        w = w.sum_to_size((*summed_to, w.shape[-1]))
    z = row_scale.abs().to(dtype) * w
    blocks, tail = row_key.mix_blocks(dtype)
    pieces, start = [], 0
    for q in ([] if blocks is None else [blocks]) + ([] if tail is None else [tail.unsqueeze(0)]):
        k, g = q.shape[0], q.shape[-1]
        part = z.narrow(-1, start, k * g).reshape(*z.shape[:-1], k, g)
        pieces.append(torch.einsum("kji,...kj->...ki", q.abs(), part).reshape(*z.shape[:-1], k * g))
        start += k * g
    z = z if not pieces else (torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0])
    return z.index_select(-1, row_key.indices("unmask"))


def _block_row_abs_sums(key, dtype: torch.dtype) -> torch.Tensor:
    """``|Q| 1`` over the masked positions of an axis (ones where it does not mix)."""
    blocks, tail = key.mix_blocks(dtype)
    parts = [q.abs().sum(-1).reshape(-1) for q in ([] if blocks is None else [blocks]) + ([] if tail is None else [tail])]
    return torch.cat(parts) if parts else torch.ones(key.size, dtype=dtype)


def rounding_bound(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    ab: torch.Tensor | None = None,
    ab_relay: torch.Tensor | None = None,
    mixing: int = 0,
    relay_unit_roundoff: float | None = None,
    slack: float = 2.0,
    summed_to: tuple | None = None,
) -> torch.Tensor:
    """Per-row bound on ``|A (B r) − C r|`` for any 0/1 vector ``r`` when ``C`` is honest.

    With keys that mix blocks of up to `mixing` positions, the relay's rounding (and the
    enclave's mixing) scales with `ab_relay` (`masked_relay_bound`) instead of ``|A|(|B|1)``,
    and each mixing adds its block's terms.

    ``C`` honest means: the relay multiplied the masked operands in a precision with unit
    roundoff `relay_unit_roundoff` (default: that of the operands' dtype), and the enclave masked
    and unmasked with 3 roundings each. Since the masking scales cancel in ``|A'| |B'|``::

        |C − AB| ≤ γ(n + 9) |A| |B|  =: g |A| |B|    (relay sum + mask/unmask roundings)
        |fl(A fl(B r)) − A B r| ≤ γ(n + p) |A| |B| r
        |fl(C r) − C r| ≤ γ(p) |C| r ≤ γ(p) (1 + g) |A| |B| r

    and ``r ≤ 1`` entrywise, so everything is a multiple of ``|A| (|B| 1)`` (`operand_bound`,
    or `ab` when it was computed already). The bound comes from the enclave's operands alone,
    never from the relay's ``C``: a tolerance that grew with ``|C|`` would let a relay inflate
    it, e.g. with noise of alternating sign along a wide row, which adds about ``p·L`` to
    ``|C| 1`` but only ``√p·L`` to the residual. `slack` (≥ 1) covers the rounding of the bound
    itself and of the final subtraction. Returns a tensor of shape ``(*batch, m)``.

    With `summed_to` (a batch shape the product's batch broadcasts from), ``C`` is the product
    summed over the broadcast slices (a shared weight's gradient): the k summed terms add
    ``γ(k)`` to both sides' sums, ``|A| (|B| 1)`` is summed the same way, and the result has
    shape ``(*summed_to, m)``.
    """
    n, p = b.shape[-2], b.shape[-1]
    u = unit_roundoff(a.dtype)
    u_relay = max(u, relay_unit_roundoff if relay_unit_roundoff is not None else u)
    k = 0
    if summed_to is not None:
        full = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        k = math.prod(full) // max(1, math.prod(summed_to))
    # honest C: |C − AB| ≤ g_c·ab_relay (ab_relay = |A||B|1 without mixing), so |C|1 ≤ ab + g_c·ab_relay
    g_c = _gamma(n + 9 + k + 4 * mixing, u_relay)
    g_abr = _gamma(n + p + k, u) + u
    g_cr = _gamma(max(p, 1), u) + u
    if ab is None:
        ab = operand_bound(a, b, summed_to)
    if ab_relay is None:
        ab_relay = ab
    tiny = torch.finfo(a.dtype).tiny * (n + p + 16 + k + 4 * mixing)  # underflow: absolute error per operation
    return slack * ((g_abr + g_cr) * ab + g_c * (1.0 + g_cr) * ab_relay + tiny)


def _matmul(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``a @ x``; a matrix `a` against a batch `x` (…×n×k) runs as one GEMM over the batch's
    columns instead of one small product per slice (15× faster for a conv weight's checks)."""
    if a.dim() != 2 or x.dim() <= 2:
        return a @ x
    batch, (n, k) = x.shape[:-2], x.shape[-2:]
    cols = x.movedim(-2, 0).reshape(n, -1)  # (n, batch·k): a copy of the small x
    return (a @ cols).reshape(a.shape[0], *batch, k).movedim(0, -2)


def _abs_matvec(a: torch.Tensor, v: torch.Tensor, chunk_bytes: int = 1 << 22) -> torch.Tensor:
    """``|A| @ v`` without materialising ``|A|``: by the C kernel (`_kernel_abs_matvec`) in one
    streaming read where it applies, else in row chunks of about `chunk_bytes` that stay in
    cache."""
    out = _kernel_abs_matvec(a, v)
    if out is not None:
        return out
    rows = a.shape[-2]
    per_row = max(a.shape[-1] * a.element_size(), 1)
    step = max(1, chunk_bytes // per_row)
    if step >= rows:
        return _matmul(a.abs(), v)
    parts = [_matmul(a[..., i : i + step, :].abs(), v) for i in range(0, rows, step)]
    return torch.cat(parts, dim=-2)


_KERNEL_SLICES = 8  # batched operands with more slices than this (attention) go by torch


def _kernel_abs_matvec(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """``|A| @ v`` (v: (…, n, 1)) by the C kernel (`tempo.core._gather.abs_matvec`) when `A`
    is a CPU float32/float64 matrix, or a batch of few, whose rows or columns are stored with
    unit stride (a transposed view is read by the kernel's transposed loop, in stored order);
    None otherwise (the caller's torch path)."""
    from tempo.core.obfuscation import _KERNEL_DTYPES, _PARALLEL_MIN_ELEMENTS, _kernel

    if (_kernel is None or not hasattr(_kernel, "abs_matvec") or not a.is_cpu or a.dtype not in _KERNEL_DTYPES
            or v.dtype != a.dtype or v.shape[-1] != 1 or a.dim() < 2 or a.numel() == 0):
        return None
    m, n = a.shape[-2:]
    batch = torch.broadcast_shapes(a.shape[:-2], v.shape[:-2])
    slices = math.prod(batch)
    if slices > _KERNEL_SLICES or tuple(v.shape[-2:]) != (n, 1):
        return None
    # the kernel reads rows of unit column stride that do not overlap (a broadcast view has)
    if (a.stride(-1) == 1 or n == 1) and (m == 1 or a.stride(-2) >= n):
        transposed, src_of, cols = False, (lambda x: x), n
    elif a.stride(-2) == 1 and (n == 1 or a.stride(-1) >= m):
        transposed, src_of, cols = True, (lambda x: x.mT), m  # (n, m): rows as stored
    else:
        return None
    a_b, v_b = a.expand(*batch, m, n), v.expand(*batch, n, 1)
    out = torch.empty((*batch, m, 1), dtype=a.dtype)
    threads = torch.get_num_threads() if m * n >= _PARALLEL_MIN_ELEMENTS else 1
    scratch = torch.empty(max(1, (threads - 1) * cols if transposed else 1), dtype=a.dtype)  # the partials
    for idx in np.ndindex(*batch) if batch else [()]:
        src = src_of(a_b[idx])
        vec = v_b[idx].reshape(-1).contiguous()
        _kernel.abs_matvec(_KERNEL_DTYPES[a.dtype], out[idx].data_ptr(), src.data_ptr(), vec.data_ptr(), *src.shape,
                           src.stride(0) if src.shape[0] > 1 else cols, transposed, scratch.data_ptr(), threads)
    return out


def random_bits(shape: tuple[int, ...], random_bytes: RandomBytes = os.urandom) -> np.ndarray:
    """Uniform 0/1 array of `shape` from a CSPRNG (uint8)."""
    count = math.prod(shape)
    raw = np.frombuffer(random_bytes((count + 7) // 8), dtype=np.uint8)
    return np.unpackbits(raw)[:count].reshape(shape)


@dataclass(frozen=True)
class Verdict:
    """The outcome of one verification: `ok`, and when not, why."""

    ok: bool
    reason: str = ""
    worst_ratio: float = 0.0  # max |A(Br) − Cr| / bound over all checks (< 1 passes)
    enclave_fault: bool = False  # the enclave's own operands were not finite: no relay is to blame

    def raise_if_failed(self) -> None:
        if self.enclave_fault:
            raise NonFiniteError(self.reason)
        if not self.ok:
            raise IntegrityError(f"offloaded result failed verification: {self.reason}")


NON_FINITE_OPERANDS = "the enclave's operands hold NaN or infinity, or their product overflows"


def checked_bound(a: torch.Tensor, b: torch.Tensor, summed_to: tuple | None = None, where: str = "") -> torch.Tensor:
    """`operand_bound` of a product about to be offloaded; raises `NonFiniteError` (naming
    `where`) when it is not finite: what the enclave sends must be finite numbers whose product
    cannot overflow. Such values never leave, and no relay is blamed for them."""
    ab = operand_bound(a, b, summed_to)
    if not bool(torch.isfinite(ab).all()):
        raise NonFiniteError(f"{where}: {NON_FINITE_OPERANDS}" if where else NON_FINITE_OPERANDS)
    return ab


def freivalds_check(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    rounds: int,
    *,
    ab: torch.Tensor | None = None,
    ab_relay: torch.Tensor | None = None,
    mixing: int = 0,
    relay_unit_roundoff: float | None = None,
    slack: float = 2.0,
    random_bytes: RandomBytes = os.urandom,
    summed: bool = False,
) -> Verdict:
    """Check ``C == A @ B`` with `rounds` random 0/1 vectors (shared by the slices of batched
    operands). Returns a `Verdict`; never raises on a bad `C`.

    With `summed`, ``C`` is ``A @ B`` summed over the batch dimensions it lacks (or has as 1):
    the gradient of an operand that was broadcast over the batch, which relays return reduced.
    `ab` is `operand_bound` of the same operands (and summing) when the caller computed it
    already, before the operands left; `ab_relay` and `mixing` describe keys that mix blocks of
    positions (`rounding_bound`).
    """
    if rounds < 1:
        raise ValueError("at least one Freivalds round is needed")
    if a.dim() < 2 or b.dim() < 2:
        return Verdict(False, "operands must be matrices")
    m, n = a.shape[-2:]
    n2, p = b.shape[-2:]
    if n != n2:
        return Verdict(False, f"operand shapes {tuple(a.shape)} and {tuple(b.shape)} do not chain")
    try:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        return Verdict(False, "operand batch shapes do not broadcast")
    expected = (*batch, m, p)
    summed_to = None
    if summed:
        c_batch = tuple(c.shape[:-2])
        try:
            ok = tuple(c.shape[-2:]) == (m, p) and torch.broadcast_shapes(c_batch, batch) == batch
        except RuntimeError:
            ok = False
        if not ok:
            return Verdict(False, f"result has shape {tuple(c.shape)}, expected (…, {m}, {p}) summed from {expected}")
        summed_to = c_batch
    elif tuple(c.shape) != expected:
        return Verdict(False, f"result has shape {tuple(c.shape)}, expected {expected}")
    if not a.dtype.is_floating_point or a.dtype != b.dtype:
        return Verdict(False, f"operands must share a floating dtype ({a.dtype}, {b.dtype})")
    if c.dtype != a.dtype:
        return Verdict(False, f"result dtype {c.dtype} differs from operands' {a.dtype}")
    if c.numel() == 0:
        return Verdict(True)
    if ab is None:
        ab = operand_bound(a, b, summed_to)
    elif tuple(ab.shape) != (*(summed_to if summed_to is not None else batch), m):
        raise ValueError(f"operand bound of shape {tuple(ab.shape)} does not belong to this product")
    try:
        bound = rounding_bound(a, b, ab=ab, ab_relay=ab_relay, mixing=mixing,
                               relay_unit_roundoff=relay_unit_roundoff, slack=slack, summed_to=summed_to)
    except ValueError as exc:
        return Verdict(False, str(exc))
    if not bool(torch.isfinite(bound).all()):
        return Verdict(False, NON_FINITE_OPERANDS, enclave_fault=True)
    # One reduction says whether C holds NaN or ±Inf (or values so large they overflow, which an
    # honest C, bounded by the finite bound above, never has).
    if not math.isfinite(float(c.sum())):
        return Verdict(False, "result contains NaN or infinity")

    # One set of vectors for every slice: still sound, since a wrong slice on its own is caught
    # with probability >= 1/2 per round whatever the other slices hold, and B r becomes one GEMM
    # over the whole batch instead of a product per slice.
    r = torch.from_numpy(random_bits((p, rounds), random_bytes)).to(a.dtype)
    abr = _matmul(a, b @ r)  # B r first (Algorithm 3 line 5)
    if summed_to is not None:
        abr = abr.sum_to_size((*summed_to, m, rounds))
    residual = abr - c @ r  # (*batch, m, rounds)
    ratio = residual.abs() / bound.unsqueeze(-1)
    if not bool(torch.isfinite(ratio).all()):
        return Verdict(False, "verification overflowed")
    worst = float(ratio.max()) if ratio.numel() else 0.0
    if worst >= 1.0:
        where = np.unravel_index(int(ratio.argmax()), tuple(ratio.shape))
        return Verdict(
            False,
            f"A(Br) - Cr exceeds the rounding bound by {worst:.3g}x (row {int(where[-2])})",
            worst,
        )
    return Verdict(True, "", worst)
