"""MM-obfuscation: mask and unmask matrices, forward and backward (paper §IV-A, Algorithms 2–3, Fig. 5).

For a matrix ``M`` whose rows are keyed by ``r = (c_r, π_r)`` and columns by ``s = (c_s, π_s)``::

    mask(M; r, s)[i, j] = c_r[i] / c_s[j] · M[π_r[i], π_s[j]]

and ``mask(X; r, s) @ mask(Y; s, t) = mask(X @ Y; r, t)``: the inner coefficients cancel.
``unmask`` inverts ``mask``; it is the same scaled gather with the inverse permutations and
reciprocal coefficients, so both run through one function (`_keyed_gather`) and one kernel.

Keys act on the last two dimensions. Leading dimensions are batch slices; an axis key with an
empty batch shape is shared by all slices, otherwise its batch shape must equal the operand's.

Backends: a C kernel (``tempo.core._gather``, built at install time when a C compiler is
present) reads and writes each element once; a pure-torch fallback gives bit-identical results,
several times slower. ``TEMPO_OBFUSCATION_BACKEND=torch`` forces the fallback.
"""

from __future__ import annotations

import os

import torch

from tempo.core.keys import AxisKey, MatmulKey

try:  # the optional C kernel; see setup.py
    from tempo.core import _gather as _kernel
except ImportError:  # pragma: no cover - depends on the install
    _kernel = None

_KERNEL_DTYPES = {torch.float32: 0, torch.float64: 1}
# Below this many elements, starting threads costs more than it saves.
_PARALLEL_MIN_ELEMENTS = 1 << 16
# From this output size on, encrypted operands are written with streaming stores (about the
# size of a core's L2: larger outputs would be evicted before anyone here reads them).
_STREAM_MIN_BYTES = 1 << 20


def kernel_available() -> bool:
    """Whether the compiled kernel is importable (else the torch fallback is used)."""
    return _kernel is not None


BACKENDS = ("c", "torch")


def default_backend() -> str:
    """``"c"`` when the kernel is built, unless ``TEMPO_OBFUSCATION_BACKEND`` names another.

    ``torch`` is the pure-torch fallback.
    """
    wanted = os.environ.get("TEMPO_OBFUSCATION_BACKEND", "auto")
    if wanted == "auto":  # the common case first: this runs on every mask and unmask
        return "c" if _kernel is not None else "torch"
    if wanted not in BACKENDS:
        raise ValueError(
            f"TEMPO_OBFUSCATION_BACKEND must be one of auto, {', '.join(BACKENDS)}; not {wanted!r}"
        )
    if wanted == "c" and _kernel is None:
        raise RuntimeError(f"TEMPO_OBFUSCATION_BACKEND={wanted} but the C kernel is not built")
    return wanted


def _check_key_batch(key: AxisKey, batch_shape: torch.Size, what: str) -> None:
    key_batch = key.batch_shape
    if key_batch and key_batch != batch_shape:
        raise ValueError(
            f"{what} key has batch shape {tuple(key_batch)}, operand has {tuple(batch_shape)}"
        )


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range addressed by a non-empty tensor view (torch strides are never negative)."""
    if t.is_contiguous():
        return t.data_ptr(), t.data_ptr() + t.nbytes
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two non-empty tensors on the same device share any byte."""
    a0, a1 = _span(a)
    b0, b1 = _span(b)
    return a0 < b1 and b0 < a1


def _output_buffer(src: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(src.shape, dtype=src.dtype, device=src.device)
    if out.shape != src.shape or out.dtype != src.dtype or out.device != src.device:
        raise ValueError(
            f"output buffer {tuple(out.shape)} {out.dtype} {out.device} does not match "
            f"input {tuple(src.shape)} {src.dtype} {src.device}"
        )
    if not out.is_contiguous():
        raise ValueError("output buffer must be contiguous")
    if out.numel() and _overlaps(out, src):
        raise ValueError("output buffer must not overlap the input (a gather cannot run in place)")
    return out


# role -> (index role, row scale role, column scale role, and the row and column scale roles of a
# mixing key's masked side). "mask-t"/"unmask-t" are the transpose of mask/unmask of the
# transposed source: the same gather with the reciprocal scale on each axis
# (keys.AxisKey.scales); no transpose copies. With mixing the scales act at masked positions:
# c and 1/c to mask, their reciprocals to undo them.
_ROLES = {
    "mask": ("mask", "mask-row", "mask-col", "mask-row", "mask-col"),
    "unmask": ("unmask", "unmask-row", "unmask-col", "mask-col", "mask-row"),
    "mask-t": ("mask", "mask-col", "mask-row", "mask-col", "mask-row"),
    "unmask-t": ("unmask", "unmask-col", "unmask-row", "mask-row", "mask-col"),
}


def _kernel_vectors(key: AxisKey, index_role: str, scale_role: str, dtype: torch.dtype) -> tuple:
    """``(int32 indices, scales, key stride)`` for the kernel, looked up once per key and role.

    The stride is 0 for a key shared by all slices, else the axis size. Scale role ``"unit"``:
    ones (the permutation alone, for the mixed path, which scales around its blocks).
    """
    cache_key = ("kernel", index_role, scale_role, dtype)
    hit = key._cache.get(cache_key)
    if hit is None:
        hit = (
            key.indices(index_role, torch.int32),
            torch.ones(key.coef.shape, dtype=dtype) if scale_role == "unit" else key.scales(scale_role, dtype),
            key.size if key.batch_shape else 0,
        )
        key._cache[cache_key] = hit
    return hit


def _mix_axis(x: torch.Tensor, key: AxisKey, dim: int, inverse: bool) -> torch.Tensor:
    """``x`` with the key's orthogonal blocks applied along `dim` (-2: rows, left-multiplied by
    the block-diagonal Q; -1: columns, right-multiplied by Qᵀ); `inverse` undoes it (Qᵀ, Q)."""
    blocks, tail = key.mix_blocks(x.dtype)
    pieces, start = [], 0
    for q in ([] if blocks is None else [blocks]) + ([] if tail is None else [tail.unsqueeze(0)]):
        k, g = q.shape[0], q.shape[-1]
        part = x.narrow(dim, start, k * g)
        if dim == -2:  # rows r = (block, i): Q[block] @ rows
            part = part.reshape(*x.shape[:-2], k, g, x.shape[-1])
            eq = "kji,...kjc->...kic" if inverse else "kij,...kjc->...kic"
            pieces.append(torch.einsum(eq, q, part).reshape(*x.shape[:-2], k * g, x.shape[-1]))
        else:  # columns: rows @ Q[block]ᵀ
            part = part.reshape(*x.shape[:-1], k, g)
            eq = "kij,...kj->...ki" if not inverse else "kji,...kj->...ki"
            pieces.append(torch.einsum(eq, q, part).reshape(*x.shape[:-1], k * g))
        start += k * g
    return torch.cat(pieces, dim=dim) if len(pieces) > 1 else pieces[0]


def _mix(x: torch.Tensor, row_key: AxisKey, col_key: AxisKey, inverse: bool) -> torch.Tensor:
    """``Q_row · x · Q_colᵀ`` with the keys' orthogonal blocks (``inverse``: ``Q_rowᵀ · x · Q_col``)."""
    if row_key.block:
        x = _mix_axis(x, row_key, -2, inverse)
    if col_key.block:
        x = _mix_axis(x, col_key, -1, inverse)
    return x


def _keyed_gather(
    src: torch.Tensor,
    row_key: AxisKey,
    col_key: AxisKey,
    role: str,
    out: torch.Tensor | None,
    backend: str | None,
) -> torch.Tensor:
    """The keyed gather of `role` (`_gather`); with mixing keys, the masked side is
    ``S_row · Q_row · P(src) · Q_colᵀ · S_col``: permuted, then mixed by orthogonal blocks, then
    scaled, so each block mixes entries of the data's own magnitudes (mixing after scaling
    would mix entries up to 256² apart, whose rounding the unmasking multiplies back). Inside a
    product the inner key's scales and blocks cancel, ``(· Q_nᵀ S_n⁻¹)(S_n Q_n ·)``, so relays
    compute as before. The mixed path runs in torch; keys without mixing keep the kernel.
    Identity keys on both axes (`AxisKey.identity`) make it a copy."""
    if row_key.identity and col_key.identity:
        return src.contiguous().clone() if out is None else out.copy_(src)
    if not (row_key.block or col_key.block):
        return _gather(src, row_key, col_key, role, out, backend)
    index_role, _, _, row_role, col_role = _ROLES[role]
    dtype, dev = src.dtype, src.device
    if (src.dim() == 2 and src.is_cpu and dtype in _KERNEL_DTYPES and _kernel is not None
            and (backend or default_backend()) == "c" and not row_key.batch_shape and not col_key.batch_shape):
        return _mixed_gather_2d(src, row_key, col_key, index_role, row_role, col_role, out)
    row_s = row_key.scales(row_role, dtype).to(dev).unsqueeze(-1)
    col_s = col_key.scales(col_role, dtype).to(dev).unsqueeze(-2)
    if index_role == "mask":
        t = torch.index_select(torch.index_select(src, -2, row_key.indices("mask").to(dev)), -1,
                               col_key.indices("mask").to(dev))
        t = _mix(t, row_key, col_key, inverse=False) * row_s * col_s
    else:
        t = _mix((src * row_s) * col_s, row_key, col_key, inverse=True)
        t = torch.index_select(torch.index_select(t, -2, row_key.indices("unmask").to(dev)), -1,
                               col_key.indices("unmask").to(dev))
    if out is None:
        return t.contiguous()
    return out.copy_(t)


def _folded_blocks(key: AxisKey, scale_role: str, dtype: torch.dtype) -> tuple:
    """The key's orthogonal blocks with its scales of `scale_role` folded in, ``diag(s)·Q`` per
    block (and the tail block's), cached per role and dtype."""
    cache_key = ("folded", scale_role, dtype)
    hit = key._cache.get(cache_key)
    if hit is None:
        s = key.scales(scale_role, dtype)
        blocks, tail = key.mix_blocks(dtype)
        n = 0 if blocks is None else blocks.shape[0] * blocks.shape[1]
        hit = (None if blocks is None else (blocks * s[:n].reshape(blocks.shape[0], -1, 1)).contiguous(),
               None if tail is None else (tail * s[n:].unsqueeze(-1)).contiguous())
        key._cache[cache_key] = hit
    return hit


def _mix_rows_into(out: torch.Tensor, x: torch.Tensor, folded: tuple, transpose: bool) -> None:
    """``out = blockdiag(F) · x`` (`transpose`: ``blockdiag(F)ᵀ · x``), one batched product."""
    start = 0
    for f in folded:
        if f is None:
            continue
        f3 = f if f.dim() == 3 else f.unsqueeze(0)
        k, g = f3.shape[0], f3.shape[-1]
        rows = k * g
        f3 = f3.transpose(1, 2) if transpose else f3
        torch.bmm(f3, x.narrow(0, start, rows).reshape(k, g, x.shape[1]), out=out.narrow(0, start, rows).view(k, g, x.shape[1]))
        start += rows


def _mix_cols(x: torch.Tensor, folded: tuple, transpose: bool) -> torch.Tensor:
    """``x · blockdiag(F)ᵀ`` (`transpose`: ``x · blockdiag(F)``), a new tensor."""
    pieces, start = [], 0
    eq = "kji,rkj->rki" if transpose else "kij,rkj->rki"
    for f in folded:
        if f is None:
            continue
        f3 = f if f.dim() == 3 else f.unsqueeze(0)
        k, g = f3.shape[0], f3.shape[-1]
        part = x.narrow(1, start, k * g).reshape(x.shape[0], k, g)
        pieces.append(torch.einsum(eq, f3, part).reshape(x.shape[0], k * g))
        start += k * g
    return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]


def _scale_axis(x: torch.Tensor, key: AxisKey, scale_role: str, dim: int) -> torch.Tensor:
    s = key.scales(scale_role, x.dtype)
    return x.mul_(s.unsqueeze(-1) if dim == 0 else s)


def _mixed_gather_2d(src: torch.Tensor, row_key: AxisKey, col_key: AxisKey, index_role: str, row_role: str,
                     col_role: str, out: torch.Tensor | None) -> torch.Tensor:
    """`_keyed_gather` of a matrix on the CPU with shared keys, in three passes: the kernel's
    permutation (unit scales), the column blocks, the row blocks (each block with its scales
    folded in: ``S·Q = blockdiag(diag(s)·Q)``), the last written into `out`."""
    rows, cols = src.shape
    if row_key.size != rows or col_key.size != cols:
        raise ValueError(f"key sizes ({row_key.size}, {col_key.size}) do not fit a {rows}×{cols} matrix")
    out = _output_buffer(src, out)
    if out.numel() == 0:
        return out
    dtype = src.dtype
    if index_role == "mask":
        t = _permute_2d(src, row_key, col_key, "mask")
        t = _mix_cols(t, _folded_blocks(col_key, col_role, dtype), False) if col_key.block \
            else _scale_axis(t, col_key, col_role, 1)
        if row_key.block:
            _mix_rows_into(out, t, _folded_blocks(row_key, row_role, dtype), False)
        else:
            torch.mul(t, row_key.scales(row_role, dtype).unsqueeze(-1), out=out)
        return out
    t = _mix_cols(src, _folded_blocks(col_key, col_role, dtype), True) if col_key.block \
        else src * col_key.scales(col_role, dtype)
    if row_key.block:
        u = torch.empty_like(t)
        _mix_rows_into(u, t, _folded_blocks(row_key, row_role, dtype), True)
    else:
        u = _scale_axis(t, row_key, row_role, 0)
    return _permute_2d(u, row_key, col_key, "unmask", out)


def _permute_2d(src: torch.Tensor, row_key: AxisKey, col_key: AxisKey, index_role: str,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[i, j] = src[ri[i], ci[j]]`` by the kernel, with unit scales (the mixed path scales
    after, or before, the blocks)."""
    out = torch.empty(src.shape, dtype=src.dtype) if out is None else out
    return _kernel_gather(out, src, _kernel_vectors(row_key, index_role, "unit", src.dtype),
                          _kernel_vectors(col_key, index_role, "unit", src.dtype), stream=False)


def _kernel_gather(out: torch.Tensor, src: torch.Tensor, row_vecs: tuple, col_vecs: tuple, stream: bool) -> torch.Tensor:
    """The C kernel: ``out[..., i, j] = rs[i]·cs[j]·src[..., ri[i], ci[j]]`` with `row_vecs` and
    `col_vecs` = ``(int32 indices, scales, key stride)`` (`_kernel_vectors`)."""
    rows, cols = src.shape[-2], src.shape[-1]
    s3 = src if src.dim() == 3 else src.reshape(-1, rows, cols)  # a view in practice
    if s3.stride(2) != 1 and cols > 1:
        # Column-strided (e.g. a transpose): one cache-blocked copy, then the fast gather.
        s3 = s3.contiguous()
    strides = s3.stride()
    numel = out.numel()
    _kernel.scaled_gather(
        _KERNEL_DTYPES[src.dtype],
        out.data_ptr(),
        s3.data_ptr(),
        s3.shape[0],
        rows,
        cols,
        strides[0],
        strides[1],
        1,  # unit column stride (with one column, torch may report any stride)
        row_vecs[0].data_ptr(),
        row_vecs[1].data_ptr(),
        row_vecs[2],
        col_vecs[0].data_ptr(),
        col_vecs[1].data_ptr(),
        col_vecs[2],
        torch.get_num_threads() if numel >= _PARALLEL_MIN_ELEMENTS else 1,
        stream,
    )
    return out


def _gather(
    src: torch.Tensor,
    row_key: AxisKey,
    col_key: AxisKey,
    role: str,
    out: torch.Tensor | None,
    backend: str | None,
) -> torch.Tensor:
    """``out[..., i, j] = (rs[i] * cs[j]) * src[..., ri[i], ci[j]]`` with the vectors of `role`.

    The one implementation of both `mask` and `unmask`. Index vectors come from an `AxisKey`,
    which checked at construction that they are permutations; sizes are checked here, so the C
    kernel never reads out of bounds. This runs on every offloaded product, twice, so its checks
    are kept to a few microseconds: at a few MiB they are a visible share of the whole.
    """
    shape = src.shape
    if len(shape) < 2:
        raise ValueError(f"obfuscation acts on matrices; got a tensor of shape {tuple(shape)}")
    rows, cols = shape[-2], shape[-1]
    if row_key.size != rows or col_key.size != cols:
        raise ValueError(
            f"key sizes ({row_key.size}, {col_key.size}) do not fit a {rows}×{cols} matrix"
        )
    batch = shape[:-2]
    _check_key_batch(row_key, batch, "row")
    _check_key_batch(col_key, batch, "column")
    dtype = src.dtype
    if not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"obfuscation needs a floating-point tensor, got {dtype}")
    out = _output_buffer(src, out)
    numel = out.numel()
    if numel == 0:
        return out
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown obfuscation backend {backend!r}; one of {BACKENDS}")
    if backend == "c" and _kernel is None:
        raise RuntimeError("backend 'c' needs the C kernel, which is not built")
    index_role, row_role, col_role, _, _ = _ROLES[role]

    if backend == "c" and dtype in _KERNEL_DTYPES and src.is_cpu:
        # An encrypted operand leaves for the relays and is not read back here: stream it past
        # the cache when it is large. A decrypted result is read next: keep it cached.
        return _kernel_gather(out, src, _kernel_vectors(row_key, index_role, row_role, dtype),
                              _kernel_vectors(col_key, index_role, col_role, dtype),
                              stream=index_role == "mask" and numel * dtype.itemsize >= _STREAM_MIN_BYTES)

    # Pure torch; `(r * c) * x` in the same order as the kernel, so results are bit-identical.
    dev = src.device
    row_idx = row_key.indices(index_role).to(dev)
    col_idx = col_key.indices(index_role).to(dev)
    row_scale = row_key.scales(row_role, dtype).to(dev)
    col_scale = col_key.scales(col_role, dtype).to(dev)
    if row_key.batch_shape:
        t = torch.gather(src, -2, row_idx.unsqueeze(-1).expand(*batch, rows, cols))
    else:
        t = torch.index_select(src, -2, row_idx)
    if col_key.batch_shape:
        t = torch.gather(t, -1, col_idx.unsqueeze(-2).expand(*batch, rows, cols))
    else:
        t = torch.index_select(t, -1, col_idx)
    torch.mul(row_scale.unsqueeze(-1) * col_scale.unsqueeze(-2), t, out=out)
    return out


def mask(
    m: torch.Tensor,
    row_key: AxisKey,
    col_key: AxisKey,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``mask(M; r, s)[..., i, j] = c_r[i] / c_s[j] · M[..., π_r[i], π_s[j]]``.

    `out`, when given, is a contiguous buffer of `m`'s shape, dtype and device (the shared-memory
    arena, say); it is filled and returned.
    """
    return _keyed_gather(m, row_key, col_key, "mask", out, backend)


def unmask(
    m: torch.Tensor,
    row_key: AxisKey,
    col_key: AxisKey,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The inverse of `mask`: ``unmask(mask(M; r, s); r, s) = M`` up to rounding."""
    return _keyed_gather(m, row_key, col_key, "unmask", out, backend)


def _check_shapes(sk: MatmulKey, a_shape: torch.Size | None, b_shape: torch.Size | None) -> None:
    m, n, p = sk.shape
    if a_shape is not None and tuple(a_shape[-2:]) != (m, n):
        raise ValueError(f"A has shape {tuple(a_shape)}; key expects (..., {m}, {n})")
    if b_shape is not None and tuple(b_shape[-2:]) != (n, p):
        raise ValueError(f"B has shape {tuple(b_shape)}; key expects (..., {n}, {p})")


def encrypt(
    sk: MatmulKey,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    out_a: torch.Tensor | None = None,
    out_b: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Enc(sk, A, B) → ``(A', B') = (mask(A; m, n), mask(B; n, p))`` (Algorithm 2)."""
    _check_shapes(sk, a.shape, b.shape)
    return (
        mask(a, sk.m, sk.n, out=out_a, backend=backend),
        mask(b, sk.n, sk.p, out=out_b, backend=backend),
    )


def decrypt(
    sk: MatmulKey,
    c_masked: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Dec(sk, C') → ``C = unmask(C'; m, p)`` (Algorithm 3, lines 1–2; verify separately)."""
    m, _, p = sk.shape
    if tuple(c_masked.shape[-2:]) != (m, p):
        raise ValueError(f"C' has shape {tuple(c_masked.shape)}; key expects (..., {m}, {p})")
    return unmask(c_masked, sk.m, sk.p, out=out, backend=backend)


def encrypt_grad(
    sk: MatmulKey,
    grad_c: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Backward with key-shift reuse (Fig. 5): ``D' = mask(Δᵀ; p, m)`` for ``Δ = dL/dC`` (m×p).

    This is the only encryption of the backward pass: the relay still holds ``A'`` and ``B'``.
    ``D'`` is stored transposed, as ``D'ᵀ`` in ``Δ``'s own (…, m, p) layout, gathered straight
    from ``Δ`` without a transpose copy; the returned (…, p, m) tensor is its transposed view.
    `out`, when given, is the contiguous (…, m, p) buffer to hold ``D'ᵀ``.
    """
    m, _, p = sk.shape
    if tuple(grad_c.shape[-2:]) != (m, p):
        raise ValueError(f"dL/dC has shape {tuple(grad_c.shape)}; key expects (..., {m}, {p})")
    return _keyed_gather(grad_c, sk.m, sk.p, "mask-t", out, backend).mT


def decrypt_grads(
    sk: MatmulKey,
    t1_masked: torch.Tensor,
    t2_masked: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``T1' = B' @ D'`` and ``T2' = D' @ A'`` recover ``(dL/dA, dL/dB)``, contiguous.

    ``unmask(T1'; n, m) = B Δᵀ = (dL/dA)ᵀ`` and ``unmask(T2'; p, n) = Δᵀ A = (dL/dB)ᵀ``. The
    gradients are gathered from ``T1'ᵀ`` and ``T2'ᵀ``: when the results arrive transposed (as
    relays send them: ``D'ᵀ B'ᵀ`` and ``A'ᵀ D'ᵀ``, given here as transposed views) no
    transpose copy is made at all.
    """
    m, n, p = sk.shape
    if tuple(t1_masked.shape[-2:]) != (n, m):
        raise ValueError(f"T1' has shape {tuple(t1_masked.shape)}; expected (..., {n}, {m})")
    if tuple(t2_masked.shape[-2:]) != (p, n):
        raise ValueError(f"T2' has shape {tuple(t2_masked.shape)}; expected (..., {p}, {n})")
    da = _keyed_gather(t1_masked.mT, sk.m, sk.n, "unmask-t", None, backend)
    db = _keyed_gather(t2_masked.mT, sk.n, sk.p, "unmask-t", None, backend)
    return da, db
