"""Sealed blobs: what the shares mode sends relay pools, unreadable to the off-loader.

The off-loader is untrusted and routes every pool's traffic, so everything a pool receives or
returns travels sealed with AES-GCM (128-bit keys, a random 96-bit nonce per blob): only the
enclave and the intended relays can open it, and a blob opened with another key, or bound to
another pool, binding or direction, fails authentication (an error, never garbage). The
associated data (`associated`) binds each blob to its pool, binding and direction, so no blob
can be replayed as another request or as the answer to one.

A pool's request is a small **head**, sealed under the pool's key: a msgpack map (role,
seeds, shapes) checked with the protocol's limits, and for pools 1 and 2 the key of a **bulk**
blob. The bulk blob holds the opened ring tensors (``E, F``, or ``G``) and is sealed once,
under a fresh key per product and direction, for both pools that need it: the enclave encrypts
and writes each opened tensor once, not once per pool. An answer is the raw int64 bytes of
tensors whose shapes the enclave knows (`answer_nbytes`), sealed under the pool's key, so the
enclave sizes its arena region before it is computed. Sealing and opening stream between the
tensors' memory and the blob (`seal_into`, `open_into`): no copies beyond the cipher's pass.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import msgpack
import torch

from tempo.protocol.codec import MAX_DIMS, MAX_TENSORS, Binding, ProtocolError, _unpack

KEY_BYTES = 16
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def write_key(path: str | Path, key: bytes) -> Path:
    """A pool key file: hex, readable by its owner only."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return path


def read_key(path: str | Path) -> bytes:
    text = Path(path).read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: a pool key file holds {KEY_BYTES} bytes in hex") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"{path}: a pool key is {KEY_BYTES} bytes ({2 * KEY_BYTES} hex digits), not {len(key)}")
    return key


def associated(pool: str, bind: Binding, what: str) -> bytes:
    """What a blob is bound to: its pool (``"bulk"`` for a bulk blob), binding and direction
    (request-forward, request-backward, answer-forward, answer-backward)."""
    return msgpack.packb([pool, bind.to_wire(), what])


def _bytes(t) -> memoryview:
    """A flat byte view of a tensor's memory (contiguous), or of bytes."""
    if isinstance(t, torch.Tensor):
        if not t.is_contiguous():
            raise ValueError("sealing reads contiguous tensors")
        return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
    return memoryview(t).cast("B")


def sealed_size(parts) -> int:
    return OVERHEAD + sum(len(_bytes(p)) for p in parts)


def seal_into(key: bytes, aad: bytes, parts, out: memoryview) -> None:
    """nonce ‖ AES-GCM(parts, concatenated) ‖ tag, written into `out` (exactly `sealed_size`)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    out = memoryview(out).cast("B")
    views = [_bytes(p) for p in parts]
    if len(out) != OVERHEAD + sum(len(v) for v in views):
        raise ValueError("the region for a sealed blob has the wrong size")
    nonce = os.urandom(NONCE_BYTES)
    out[:NONCE_BYTES] = nonce
    enc = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
    enc.authenticate_additional_data(aad)
    at = NONCE_BYTES
    for v in views:
        if len(v):
            # update_into wants room for a block more than it writes (15 bytes): the tag's 16
            # bytes follow the ciphertext, so that room is inside `out` until the tag is written
            if enc.update_into(v, out[at:at + len(v) + 15]) != len(v):
                raise RuntimeError("AES-GCM wrote less than it read")
            at += len(v)
    enc.finalize()
    out[at:at + TAG_BYTES] = enc.tag


def seal(key: bytes, aad: bytes, parts) -> bytes:
    buf = bytearray(sealed_size(parts))
    seal_into(key, aad, parts, memoryview(buf))
    return bytes(buf)


def open_into(key: bytes, aad: bytes, blob, outs) -> None:
    """Decrypt `blob` into the buffers `outs` (their sizes add up to the plaintext) and check
    its tag; `ProtocolError` if it does not open. The buffers hold unauthenticated bytes until
    this returns: use them only then."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    blob = _bytes(blob)
    views = [_bytes(o) for o in outs]
    if len(blob) != OVERHEAD + sum(len(v) for v in views):
        raise ProtocolError("a sealed blob has the wrong size")
    nonce, tag = bytes(blob[:NONCE_BYTES]), bytes(blob[len(blob) - TAG_BYTES:])
    dec = Cipher(algorithms.AES(key), modes.GCM(nonce, tag)).decryptor()
    dec.authenticate_additional_data(aad)
    at = NONCE_BYTES
    for v in views:
        n = len(v)
        if n > 64:  # straight into the buffer; the last 16 bytes through a scratch (update_into's slack)
            dec.update_into(blob[at:at + n - 16], v[:n - 1])
            tail = bytearray(31)
            dec.update_into(blob[at + n - 16:at + n], tail)
            v[n - 16:] = tail[:16]
        elif n:
            small = bytearray(n + 15)
            dec.update_into(blob[at:at + n], small)
            v[:] = small[:n]
        at += n
    try:
        dec.finalize()
    except InvalidTag:
        for v in views:  # nothing unauthenticated is left behind
            v[:] = bytes(len(v))
        raise ProtocolError("a sealed blob does not open with this key (another pool's, or altered)") from None


def open_bytes(key: bytes, aad: bytes, blob) -> bytes:
    size = len(_bytes(blob)) - OVERHEAD
    if size < 0:
        raise ProtocolError("a sealed blob is too short")
    out = bytearray(size)
    open_into(key, aad, blob, [out])
    return bytes(out)


# -- heads: a pool's small request --

def seal_head(key: bytes, aad: bytes, header: dict) -> bytes:
    return seal(key, aad, [msgpack.packb(header)])


def open_head(key: bytes, aad: bytes, blob) -> dict:
    plain = open_bytes(key, aad, blob)
    header = _unpack(plain)
    if not isinstance(header, dict):
        raise ProtocolError("a sealed head is not a map")
    return header


# -- tensors: bulk blobs and answers (int64, shapes known to the receiver) --

def check_shapes(shapes) -> list[tuple]:
    if (not isinstance(shapes, list) or len(shapes) > MAX_TENSORS
            or not all(isinstance(s, list) and len(s) <= MAX_DIMS and all(isinstance(d, int) and 0 <= d < 1 << 40 for d in s)
                       for s in shapes)):
        raise ProtocolError("tensor shapes in a sealed head are malformed")
    return [tuple(s) for s in shapes]


def tensors_nbytes(shapes) -> int:
    total = 0
    for shape in shapes:
        count = 1
        for d in shape:
            count *= d
        total += 8 * count
    return total


def answer_nbytes(shapes) -> int:
    """The size of a sealed blob holding int64 tensors of these shapes."""
    return tensors_nbytes(shapes) + OVERHEAD


def open_tensors(key: bytes, aad: bytes, blob, shapes) -> tuple[torch.Tensor, ...]:
    """The int64 tensors of `shapes` sealed in `blob`, decrypted straight into new tensors."""
    if len(_bytes(blob)) != answer_nbytes(shapes):
        raise ProtocolError("a sealed blob has the wrong size for its tensors")
    outs = tuple(torch.empty(tuple(s), dtype=torch.int64) for s in shapes)
    open_into(key, aad, blob, list(outs))
    return outs
