"""The codec: frames, tensors, digests and limits (the package's docstring describes the protocol).

Frame 0 is a msgpack map (the header); frames 1..k are raw, contiguous tensor bytes, sent
zero-copy. Every check on what arrives lives here: the header's size and msgpack limits, the
protocol version, each field's type (`FIELDS`), the tensor specs (allow-listed dtypes, shapes)
against the frames' byte lengths."""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from tempo.protocol.errors import ErrorCode, ProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES", "DTYPES", "FIELDS", "MAX_DIMS", "MAX_HEADER_BYTES", "MAX_TENSORS", "MODES",
    "PROTOCOL_VERSION",
    "REQUIRED", "Binding", "Descriptor", "ErrorCode", "Message", "ProtocolError", "TensorSpec", "check_fields",
    "claimed_request_id", "decode", "decode_header", "encode", "inputs_digest", "new_request_id", "tensor_specs",
]

# 2: backward sends D'ᵀ and returns T1'ᵀ, T2'ᵀ summed (tempo.core.products.grad_shapes); 2.1: pong carries `tables`;
# 2.2: sealed parts for relay pools (kind and op ``sealed``, ``pool``; pong carries ``pools``);
# 2.3: ``release_job`` (was a ``release`` with a ``job`` and a made-up binding), ``error`` carries a ``code``;
# 2.4: work requests (``submit``, ``stage``, ``forward``, ``backward``, ``backward_full``) carry a protection ``mode``
# (`MODES`; absent, from a 2.3 peer: ``masked``), and ``error`` has the code ``mode_mismatch``.
# Stamped on every header by `encode`, and checked by `decode_header`: nowhere else.
PROTOCOL_VERSION = (2, 4)

# The protection modes a work request may be in (its ``mode``): ``masked``, obfuscated products
# (the masking, and the shares mode's sealed parts); ``asymml``, plaintext weights and noisy
# residuals, unmasked by design. A job is in one mode: peers refuse to mix two (``mode_mismatch``).
MODES = ("masked", "asymml")

# dtype names on the wire -> torch dtypes. Nothing else is ever built from a frame.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,  # sealed blobs of the shares mode (`tempo.protocol.sealed`): opaque here
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 8
MAX_DIMS = 6
DEFAULT_MAX_FRAME_BYTES = 2 << 30  # 2 GiB per tensor frame

@dataclass(frozen=True)
class Binding:
    """What a request computes: (job, step, layer, part). Keys the relays' operand cache."""

    job: str
    step: int
    layer: int
    part: int

    def to_wire(self) -> list:
        return [self.job, self.step, self.layer, self.part]

    @classmethod
    def from_wire(cls, value: Any) -> Binding:
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 4
            or not isinstance(value[0], str)
            or not 0 < len(value[0]) <= 128
            or not all(_is_int(x) and x >= 0 for x in value[1:])
        ):
            raise ProtocolError("bind must be [job: str, step: int, layer: int, part: int]")
        return cls(value[0], value[1], value[2], value[3])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's dtype name (from `DTYPES`) and shape, as a header lists it."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    def to_wire(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        if t.dtype not in _DTYPE_NAMES:
            raise ProtocolError(f"dtype {t.dtype} is not allowed on the wire")
        return cls(_DTYPE_NAMES[t.dtype], tuple(t.shape))

    @classmethod
    def from_wire(cls, value: Any) -> TensorSpec:
        if not isinstance(value, dict) or set(value) != {"dtype", "shape"}:
            raise ProtocolError("a tensor spec is a map with exactly dtype and shape")
        dtype, shape = value["dtype"], value["shape"]
        if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or map is not even hashable
            raise ProtocolError(f"dtype {str(dtype)[:64]!r} is not allowed")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(_is_int(s) and 0 <= s < 2**31 for s in shape)
        ):
            raise ProtocolError(f"bad shape {str(shape)[:64]}")
        return cls(dtype, tuple(shape))


@dataclass(frozen=True)
class Descriptor:
    """A region of the enclave's shared-memory arena holding one tensor: where it is and what it is."""

    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def at(cls, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> Descriptor:
        """The descriptor of a tensor of `shape` and `dtype` (an allowed one) at `offset`."""
        if dtype not in _DTYPE_NAMES:
            raise ProtocolError(f"dtype {dtype} is not allowed on the wire")
        spec = TensorSpec(_DTYPE_NAMES[dtype], tuple(shape))
        return cls(offset, spec.nbytes, spec.dtype, spec.shape)

    def inside(self, arena_size: int) -> Descriptor:
        """This descriptor, checked to lie inside an arena of `arena_size` bytes."""
        if self.offset < 0 or self.offset + self.nbytes > arena_size:
            raise ProtocolError("descriptor lies outside the arena")
        return self

    def to_wire(self) -> dict:
        return {"offset": self.offset, "nbytes": self.nbytes, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_wire(cls, value: Any, arena_size: int | None = None) -> Descriptor:
        """Parse a descriptor from a peer and check it fits its spec; given `arena_size`, also
        that it lies inside the arena."""
        if not isinstance(value, dict) or set(value) != {"offset", "nbytes", "dtype", "shape"}:
            raise ProtocolError("a descriptor is a map of offset, nbytes, dtype, shape")
        offset, nbytes = value["offset"], value["nbytes"]
        if not (_is_int(offset) and _is_int(nbytes)) or offset < 0 or nbytes < 0:
            raise ProtocolError("descriptor offset and nbytes must be non-negative integers")
        spec = TensorSpec.from_wire({"dtype": value["dtype"], "shape": value["shape"]})
        if nbytes != spec.nbytes:
            raise ProtocolError("descriptor length does not match its dtype and shape")
        desc = cls(offset, nbytes, spec.dtype, spec.shape)
        return desc if arena_size is None else desc.inside(arena_size)


# -- header fields: one type each, checked on arrival --
Check = Callable[[Any], object]


def _text(max_len: int) -> Check:
    def check(value: Any) -> None:
        if not isinstance(value, str) or not 0 < len(value) <= max_len:
            raise ProtocolError(f"must be a string of 1 to {max_len} characters")

    return check


def _choice(*allowed: str) -> Check:
    def check(value: Any) -> None:
        if not isinstance(value, str) or value not in allowed:
            raise ProtocolError(f"must be one of {', '.join(allowed)}")

    return check


def _count(value: Any) -> None:
    if not _is_int(value) or value < 0:
        raise ProtocolError("must be a non-negative integer")


def _seconds(value: Any) -> None:
    if not (_is_int(value) or isinstance(value, float)) or not 0 <= value < math.inf:
        raise ProtocolError("must be a finite, non-negative number")


def _flag(value: Any) -> None:
    if not isinstance(value, bool):
        raise ProtocolError("must be true or false")


def _descriptors(value: Any) -> list[Descriptor]:
    if not isinstance(value, list) or len(value) > 4:
        raise ProtocolError("must be a list of at most 4 descriptors")
    return [Descriptor.from_wire(v) for v in value]


def tensor_specs(value: Any) -> list[TensorSpec]:
    """A header's ``tensors``: at most `MAX_TENSORS` specs."""
    if not isinstance(value, list) or len(value) > MAX_TENSORS:
        raise ProtocolError(f"must be a list of at most {MAX_TENSORS} specs")
    return [TensorSpec.from_wire(s) for s in value]


def _tables(value: Any) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and _is_int(v) and v >= 0 for k, v in value.items()):
        raise ProtocolError("must map names to non-negative integers")


# Every header field any op uses, by name, with the one type it has in every op; `_OP_FIELDS`
# holds the exceptions. A nil where a field is expected is as wrong as any other type.
FIELDS: dict[str, Check] = {
    "tensors": tensor_specs,
    "id": _text(64),  # a request id
    "bind": Binding.from_wire,
    "digest": _text(64),
    "arena": _text(255),  # an arena's segment name (Arena.attach checks its form)
    "kind": _choice("forward", "backward", "sealed"),
    "pool": _text(64),  # a relay pool's name (the shares mode)
    "pools": _tables,  # relays per pool (pong)
    "inputs": _descriptors,
    "operands": _descriptors,
    "outputs": _descriptors,
    "staged": _choice("a", "b"),  # which operand of a forward was shipped ahead
    "slot": _choice("a", "b"),
    "job": _text(128),
    "relay": _text(255),  # a relay's name (its routing identity)
    "reason": _text(4096),
    "event": _text(64),
    "device": _text(64),
    "name": _text(255),
    "free_memory": _count,
    "cache_bytes": _count,
    "relays": _count,
    "compute_s": _seconds,
    "relay_s": _seconds,
    "turnaround_s": _seconds,
    "tables": _tables,
    "mode": _choice(*MODES),  # a work request's protection mode (2.4)
    "code": _text(64),  # an error's `ErrorCode` (one this peer does not know reads as ERROR)
}
# Filled by `tempo.protocol.messages` from its message classes (their fields are the one list):
# the exceptions to `FIELDS` by (op, field), and the fields each op cannot do without.
_OP_FIELDS: dict[tuple[str, str], Check] = {}
REQUIRED: dict[str, tuple[str, ...]] = {}


def check_fields(op: str, header: dict) -> None:
    """Check each known field of `header` against its type, and that `op`'s required fields are
    there; raise `ProtocolError` naming the first that is not."""
    for name, value in header.items():
        check = _OP_FIELDS.get((op, name)) or FIELDS.get(name)
        if check is None:
            continue
        try:
            check(value)
        except ProtocolError as exc:
            raise ProtocolError(f"header field {name!r}: {exc}") from None
    missing = [name for name in REQUIRED.get(op, ()) if name not in header]
    if missing:
        raise ProtocolError(f"{op} lacks {', '.join(missing)}")


@dataclass
class Message:
    """A decoded envelope: the checked header map, and its tensors (views of the received frames).
    The peers read messages as their classes (`tempo.protocol.messages.parse`), built from this."""

    op: str
    header: dict
    tensors: list[torch.Tensor] = field(default_factory=list)

    @property
    def request_id(self) -> str | None:
        rid = self.header.get("id")
        return rid if isinstance(rid, str) else None

    @property
    def binding(self) -> Binding:
        return Binding.from_wire(self.header.get("bind"))


def inputs_digest(buffers) -> str:
    """SHA-256 (first 128 bits) over the bytes of a request's input tensors, in order (hex).

    SHA-256 because CPUs with SHA extensions hash it at about twice BLAKE2b's speed (1.6 vs
    0.8 GB/s measured here), and this runs on every byte a relay receives."""
    h = hashlib.sha256()
    for buf in buffers:
        h.update(len(buf).to_bytes(8, "little"))
        h.update(buf)
    return h.hexdigest()[:32]


def new_request_id() -> str:
    """A fresh, unguessable request id."""
    return secrets.token_hex(12)


def encode(op: str, tensors: Sequence[torch.Tensor] = (), **fields: Any) -> list:
    """Frames for one message: the msgpack header, then each tensor's bytes without a copy.

    Tensors must be contiguous CPU tensors of an allowed dtype: a non-contiguous one is refused
    rather than silently copied.
    """
    specs = []
    frames: list = [b""]
    for t in tensors:
        if t.device.type != "cpu":
            raise ProtocolError("tensors go on the wire from CPU memory")
        if not t.is_contiguous():
            raise ProtocolError("tensors must be contiguous to go on the wire")
        specs.append(TensorSpec.of(t).to_wire())
        frames.append(_tensor_buffer(t))
    header = {"v": list(PROTOCOL_VERSION), "op": op, "tensors": specs, **fields}
    frames[0] = msgpack.packb(header, use_bin_type=True)
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise ProtocolError("header too large")
    return frames


def _tensor_buffer(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    # uint8 view of the same memory (works for bfloat16, which numpy lacks)
    return memoryview(t.view(torch.uint8).numpy()) if t.dim() else memoryview(
        t.reshape(1).view(torch.uint8).numpy()
    )


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("msgpack extension types are not allowed")


def _unpack(frame: bytes | memoryview) -> Any:
    """msgpack with hard limits, no extension types, string or bytes map keys."""
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError("header too large")
    try:
        return msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            ext_hook=_no_ext,
            max_str_len=4096,
            max_bin_len=4096,
            max_array_len=256,
            max_map_len=64,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several types for malformed input
        raise ProtocolError(f"malformed msgpack header: {type(exc).__name__}") from None


def decode_header(frame: bytes | memoryview) -> dict:
    """Parse and check frame 0 with hard limits, and the type of each of its fields (`FIELDS`);
    raise `ProtocolError` with the reason."""
    header = _unpack(frame)
    if not isinstance(header, dict):
        raise ProtocolError("header must be a map")
    version = header.get("v")
    if (
        not isinstance(version, list)
        or len(version) != 2
        or not all(_is_int(x) for x in version)
    ):
        raise ProtocolError("header lacks a protocol version [major, minor]")
    if version[0] != PROTOCOL_VERSION[0]:
        raise ProtocolError(
            f"protocol version {version[0]}.{version[1]} is not supported "
            f"(this peer speaks {PROTOCOL_VERSION[0]}.x)"
        )
    op = header.get("op")
    if not isinstance(op, str):
        raise ProtocolError("header lacks an op")
    check_fields(op, header)
    return header


def claimed_request_id(frames: Sequence[bytes | memoryview]) -> str | None:
    """The request id a message names, read with no other check: a reply that breaks the
    protocol can still be pinned on the request it answers (the id is known only to the peer it
    was sent to). ``None`` when it names none."""
    try:
        header = _unpack(frames[0]) if frames else None
    except ProtocolError:
        return None
    rid = header.get("id") if isinstance(header, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 64 else None


def decode(
    frames: Sequence[bytes | memoryview],
    allowed_ops: frozenset[str],
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> Message:
    """Decode and validate one message; its tensors are zero-copy views of the frames.

    Raises `ProtocolError` for anything off: malformed or oversize header, wrong version,
    an op not in `allowed_ops`, tensor specs that do not match the frames byte for byte.
    """
    if not frames:
        raise ProtocolError("empty message")
    header = decode_header(frames[0])
    op = header["op"]
    if op not in allowed_ops:
        raise ProtocolError(f"unknown op {op[:64]!r}")
    specs = tensor_specs(header.get("tensors", []))  # checked by decode_header: cannot fail
    payload = frames[1:]
    if len(payload) != len(specs):
        raise ProtocolError(f"header lists {len(specs)} tensors but {len(payload)} frames follow")
    tensors = []
    for spec, frame in zip(specs, payload):
        size = len(frame)
        if size > max_frame_bytes or spec.nbytes > max_frame_bytes:
            raise ProtocolError(f"frame of {max(size, spec.nbytes)} bytes exceeds the limit")
        if size != spec.nbytes:
            raise ProtocolError(f"frame has {size} bytes, its spec {spec.shape} {spec.dtype} needs {spec.nbytes}")
        tensors.append(_tensor_from(frame, spec))
    return Message(op, header, tensors)


def _tensor_from(frame: bytes | memoryview, spec: TensorSpec) -> torch.Tensor:
    dtype = DTYPES[spec.dtype]
    if spec.nbytes == 0:
        return torch.empty(spec.shape, dtype=dtype)
    buf = frame if isinstance(frame, memoryview) else memoryview(frame)
    # torch.frombuffer warns on read-only buffers; the tensor is only ever read
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buf, dtype=torch.uint8)
    return flat.view(dtype).reshape(spec.shape)
