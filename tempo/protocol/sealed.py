"""Sealed blobs: what the shares mode sends a relay pool, unreadable to the off-loader.

The off-loader is untrusted and routes every pool's traffic, so a pool's requests and answers
travel sealed under that pool's key (AES-GCM, 128-bit key, a random 96-bit nonce per blob): only
the enclave and the pool's relays, which hold the key, can open them, and a blob sealed for one
pool fails to open in another (an authentication error, not garbage). The associated data binds
a blob to its pool, binding and direction, so no blob can be replayed as another request or
as the answer to one.

A request blob's plaintext: a 4-byte big-endian length, a msgpack header (checked with the
protocol's limits), then the int64 tensors it lists, contiguous. An answer's plaintext is the raw
int64 bytes of tensors whose shapes the enclave knows (`answer_nbytes`), so the enclave sizes
the answer's arena region before it is computed.
"""

from __future__ import annotations

import os
import secrets
import struct
from pathlib import Path

import msgpack
import torch

from tempo.protocol import MAX_DIMS, MAX_TENSORS, Binding, ProtocolError, _unpack

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
    """What a blob is bound to: its pool, binding and direction (request-forward,
    request-backward, answer-forward, answer-backward)."""
    return msgpack.packb([pool, bind.to_wire(), what])


def _aead(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _tensor_bytes(t: torch.Tensor) -> bytes | memoryview:
    t = t.contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else b""


def seal_request(key: bytes, aad: bytes, header: dict, tensors: tuple[torch.Tensor, ...]) -> bytes:
    for t in tensors:
        if t.dtype != torch.int64:
            raise TypeError("sealed requests carry int64 ring tensors")
    head = msgpack.packb({**header, "tensors": [list(t.shape) for t in tensors]})
    plain = b"".join([struct.pack(">I", len(head)), head, *(_tensor_bytes(t) for t in tensors)])
    nonce = os.urandom(NONCE_BYTES)
    return nonce + _aead(key).encrypt(nonce, plain, aad)


def _open(key: bytes, aad: bytes, blob: bytes | memoryview) -> bytes:
    from cryptography.exceptions import InvalidTag

    blob = bytes(blob)
    if len(blob) < OVERHEAD:
        raise ProtocolError("a sealed blob is too short")
    try:
        return _aead(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise ProtocolError("a sealed blob does not open with this pool's key (another pool's, or altered)") from None


def open_request(key: bytes, aad: bytes, blob: bytes | memoryview) -> tuple[dict, tuple[torch.Tensor, ...]]:
    """The header and tensors of a sealed request; `ProtocolError` if it does not open or parse."""
    plain = _open(key, aad, blob)
    if len(plain) < 4:
        raise ProtocolError("a sealed request lacks its header")
    (size,) = struct.unpack(">I", plain[:4])
    header = _unpack(plain[4:4 + size]) if size <= len(plain) - 4 else None
    if not isinstance(header, dict):
        raise ProtocolError("a sealed request's header is not a map")
    shapes = header.pop("tensors", None)
    if (not isinstance(shapes, list) or len(shapes) > MAX_TENSORS
            or not all(isinstance(s, list) and len(s) <= MAX_DIMS and all(isinstance(d, int) and d >= 0 for d in s)
                       for s in shapes)):
        raise ProtocolError("a sealed request's tensor shapes are malformed")
    offset, out = 4 + size, []
    for shape in shapes:
        count = 1
        for d in shape:
            count *= d
        end = offset + 8 * count
        if end > len(plain):
            raise ProtocolError("a sealed request is shorter than its tensors")
        out.append(torch.frombuffer(bytearray(plain[offset:end]), dtype=torch.int64).reshape(shape)
                   if count else torch.zeros(shape, dtype=torch.int64))
        offset = end
    if offset != len(plain):
        raise ProtocolError("a sealed request has bytes after its tensors")
    return header, tuple(out)


def answer_nbytes(shapes: list[tuple]) -> int:
    """The size of a sealed answer holding int64 tensors of these shapes."""
    total = 0
    for shape in shapes:
        count = 1
        for d in shape:
            count *= d
        total += 8 * count
    return total + OVERHEAD


def seal_answer(key: bytes, aad: bytes, tensors: tuple[torch.Tensor, ...]) -> bytes:
    plain = b"".join(bytes(_tensor_bytes(t.to(torch.int64))) for t in tensors)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + _aead(key).encrypt(nonce, plain, aad)


def open_answer(key: bytes, aad: bytes, blob: bytes | memoryview, shapes: list[tuple]) -> tuple[torch.Tensor, ...]:
    plain = _open(key, aad, blob)
    if len(plain) + OVERHEAD != answer_nbytes(shapes):
        raise ProtocolError("a sealed answer has the wrong size")
    out, offset = [], 0
    for shape in shapes:
        count = (answer_nbytes([shape]) - OVERHEAD) // 8
        out.append(torch.frombuffer(bytearray(plain[offset:offset + 8 * count]), dtype=torch.int64).reshape(shape)
                   if count else torch.zeros(shape, dtype=torch.int64))
        offset += 8 * count
    return tuple(out)
