"""The messages: one frozen dataclass per op, its fields the header's fields.

A message class names its op (``OP``) and lists its header fields as dataclass fields: one
without a default is required, one that defaults to ``None`` (or to no descriptors) is left
out of the header when unset; one with another default (``mode``) is always sent, and reads as
its default from a peer that sends none. Each field's wire type is its entry in `codec.FIELDS` (or the
class's ``CHECKS`` where an op gives a field another type), checked once on arrival by
`decode_header`; `from_frames` and `parse` then build the message from the checked header, with
a `Binding`, `Descriptor`s and an `ErrorCode` where the header has their wire forms.
``to_frames`` encodes it (`encode` stamps the protocol version). A class that carries tensors
(``TENSORS``) has them in its ``tensors`` field; any other is refused with tensor frames.

`MESSAGES` maps each op to its class: adding a message is adding a class here, decorated with
`message`, and naming it in the direction sets below.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, TypeVar

import torch

from tempo.protocol import codec
from tempo.protocol.codec import (
    DEFAULT_MAX_FRAME_BYTES,
    FIELDS,
    Binding,
    Check,
    Descriptor,
    _flag,
    decode,
    encode,
)
from tempo.protocol.errors import ErrorCode, ProtocolError

__all__ = [
    "FROM_ENCLAVE", "FROM_RELAY", "MESSAGES", "TO_ENCLAVE", "TO_RELAY", "ENCLAVE_OPS", "OFFLOADER_TO_ENCLAVE_OPS",
    "OFFLOADER_TO_RELAY_OPS", "RELAY_OPS", "Backward", "BackwardFull", "Done", "Error", "Forward", "Heartbeat", "Msg",
    "Ping", "Pong", "Quarantine", "Ready", "RelayEvent", "Release", "ReleaseJob", "Result", "Sealed", "Stage",
    "Submit", "error_frames", "parse",
]

_DESCRIPTOR_FIELDS = frozenset({"inputs", "operands", "outputs"})


def _to_wire(name: str, value: Any) -> Any:
    if isinstance(value, Binding):
        return value.to_wire()
    if name in _DESCRIPTOR_FIELDS:
        return [d.to_wire() for d in value]
    if isinstance(value, ErrorCode):
        return value.value
    return value


def _from_wire(name: str, value: Any) -> Any:
    """A checked header value as the message holds it."""
    if name == "bind":
        return Binding.from_wire(value)
    if name in _DESCRIPTOR_FIELDS:
        return tuple(Descriptor.from_wire(v) for v in value)
    if name == "code":
        return ErrorCode.from_wire(value)
    return value


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaNs included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) if a.numel() else True


@dataclass(frozen=True, eq=False)
class Msg:
    """A protocol message (the base of every message class)."""

    OP: ClassVar[str] = ""
    TENSORS: ClassVar[bool] = False  # carries tensor frames (in a ``tensors`` field)
    CHECKS: ClassVar[dict[str, Check]] = {}  # this op's exceptions to `codec.FIELDS`

    def header(self) -> dict:
        """The header's fields (no version, op or tensor specs: `encode` adds those)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "tensors" or value is None or (f.name in _DESCRIPTOR_FIELDS and not value):
                continue
            out[f.name] = _to_wire(f.name, value)
        return out

    def to_frames(self) -> list:
        """The message's frames: the msgpack header, then its tensors' bytes, without a copy."""
        return encode(self.OP, getattr(self, "tensors", ()), **self.header())

    @classmethod
    def from_frames(cls: type[M], frames: Sequence, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> M:
        """Decode and check `frames` as this message; `ProtocolError` for anything off (another op too)."""
        return parse(frames, (cls,), max_frame_bytes)

    @classmethod
    def from_envelope(cls: type[M], envelope: codec.Message) -> M:
        """This message from a decoded envelope (its header checked by `decode_header`)."""
        if envelope.tensors and not cls.TENSORS:
            raise ProtocolError(f"{cls.OP} carries no tensors")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "tensors":
                kwargs["tensors"] = tuple(envelope.tensors)
            elif f.name in envelope.header:
                kwargs[f.name] = _from_wire(f.name, envelope.header[f.name])
        return cls(**kwargs)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        mine, theirs = getattr(self, "tensors", ()), getattr(other, "tensors", ())
        return self.header() == other.header() and len(mine) == len(theirs) and all(
            _same_tensor(a, b) for a, b in zip(mine, theirs))

    __hash__ = None  # messages are values, compared by content; none is a key


M = TypeVar("M", bound=Msg)

# op -> message class
MESSAGES: dict[str, type[Msg]] = {}


def message(cls: type[M]) -> type[M]:
    """Register a message class (a frozen dataclass of its fields) under its op, and its fields'
    requirements and exceptions with the codec's header check."""
    cls = dataclass(frozen=True, eq=False)(cls)
    if not cls.OP or cls.OP in MESSAGES:
        raise TypeError(f"{cls.__name__}: a message class names a new op")
    names = [f.name for f in fields(cls)]
    if ("tensors" in names) != cls.TENSORS:
        raise TypeError(f"{cls.__name__}: a class that carries tensors has a tensors field, and only it")
    unknown = [n for n in names if n != "tensors" and n not in FIELDS and n not in cls.CHECKS]
    if unknown:
        raise TypeError(f"{cls.__name__}: fields {unknown} have no wire type (codec.FIELDS)")
    MESSAGES[cls.OP] = cls
    codec.REQUIRED[cls.OP] = tuple(
        f.name for f in fields(cls) if f.name != "tensors" and f.default is MISSING and f.default_factory is MISSING)
    for name, check in cls.CHECKS.items():
        codec._OP_FIELDS[(cls.OP, name)] = check
    return cls


# -- enclave -> off-loader --

@message
class Submit(Msg):
    """A part to compute, by arena descriptors: a forward (inputs A', B'; output C'), a backward
    (inputs D'ᵀ, operands A', B'; outputs T1'ᵀ, T2'ᵀ) or a sealed part for a relay pool."""

    OP = "submit"
    id: str
    bind: Binding
    arena: str
    kind: str
    inputs: tuple[Descriptor, ...] = ()
    operands: tuple[Descriptor, ...] = ()
    outputs: tuple[Descriptor, ...] = ()
    staged: str | None = None  # a forward whose operand (a or b) was shipped ahead
    pool: str | None = None  # a sealed part's pool
    mode: str = "masked"  # the protection mode (codec.MODES; 2.4): the job's, which never changes


@message
class Stage(Msg):
    """A forward's weight operand, shipped ahead of it: from the enclave by descriptor (``arena``,
    ``inputs``), from the off-loader to a relay as a tensor."""

    OP = "stage"
    TENSORS = True
    bind: Binding
    slot: str
    arena: str | None = None
    inputs: tuple[Descriptor, ...] = ()
    digest: str | None = None
    tensors: tuple[torch.Tensor, ...] = ()
    mode: str = "masked"  # the forward's protection mode (2.4)


@message
class Release(Msg):
    """Drop one binding's cached and staged operands (enclave -> off-loader -> relay)."""

    OP = "release"
    bind: Binding


@message
class ReleaseJob(Msg):
    """Drop a whole job: its parts, cached and staged operands, and (from the enclave) its arena."""

    OP = "release_job"
    job: str
    arena: str | None = None


@message
class Ping(Msg):
    OP = "ping"
    id: str | None = None
    bind: Binding | None = None


@message
class Quarantine(Msg):
    """Stop using a relay for good: by name, or the one holding the request `id`."""

    OP = "quarantine"
    relay: str | None = None
    id: str | None = None
    reason: str | None = None


# -- off-loader -> enclave --

@message
class Done(Msg):
    """A part's outputs are in the arena; which relay computed them, and how long it took."""

    OP = "done"
    CHECKS = {"staged": _flag}  # whether the forward used an operand shipped ahead
    id: str
    bind: Binding
    relay: str | None = None
    relay_s: float | None = None
    turnaround_s: float | None = None
    staged: bool | None = None


@message
class Error(Msg):
    """A request failed or a message was refused: a code to act on, a reason to show."""

    OP = "error"
    reason: str = "error"
    code: ErrorCode = ErrorCode.ERROR
    id: str | None = None
    bind: Binding | None = None

    @classmethod
    def reply(cls, reason: str, code: ErrorCode = ErrorCode.BAD_REQUEST, id: str | None = None,
              bind: Binding | None = None) -> Error:
        """An error reply; the reason is cut to a safe length (and is never empty)."""
        return cls(reason[:500] or "error", code, id, bind)


@message
class Pong(Msg):
    """A ping's answer; from the off-loader with its relays, tables (2.1) and pools (2.2)."""

    OP = "pong"
    id: str | None = None
    bind: Binding | None = None
    relays: int | None = None
    tables: dict | None = None
    pools: dict | None = None


@message
class RelayEvent(Msg):
    """A relay that held this enclave's parts was lost or quarantined."""

    OP = "relay_event"
    relay: str
    event: str
    reason: str | None = None


# -- off-loader -> relay --

@message
class Forward(Msg):
    """``A', B' → C'`` (with ``staged``: one operand came ahead, the other is the one tensor)."""

    OP = "forward"
    TENSORS = True
    id: str
    bind: Binding
    digest: str | None = None
    staged: str | None = None
    tensors: tuple[torch.Tensor, ...] = ()
    mode: str = "masked"  # the protection mode (2.4): masked products, or AsymML's plaintext operands


@message
class Backward(Msg):
    """``D'ᵀ`` with the relay's cached ``A', B'`` → ``T1'ᵀ, T2'ᵀ``."""

    OP = "backward"
    TENSORS = True
    id: str
    bind: Binding
    digest: str | None = None
    tensors: tuple[torch.Tensor, ...] = ()
    mode: str = "masked"  # the protection mode (2.4): masked products, or AsymML's plaintext operands


@message
class BackwardFull(Msg):
    """``A', B', D'ᵀ → T1'ᵀ, T2'ᵀ``: a backward whose cache died with its relay."""

    OP = "backward_full"
    TENSORS = True
    id: str
    bind: Binding
    digest: str | None = None
    tensors: tuple[torch.Tensor, ...] = ()
    mode: str = "masked"  # the protection mode (2.4): masked products, or AsymML's plaintext operands


@message
class Sealed(Msg):
    """The shares mode: one to four blobs sealed for `pool`'s relays → one sealed answer."""

    OP = "sealed"
    TENSORS = True
    id: str
    bind: Binding
    pool: str
    digest: str | None = None
    tensors: tuple[torch.Tensor, ...] = ()


# -- relay -> off-loader --

@message
class Ready(Msg):
    """A relay joins: its device, free memory, cache use, name, and pool (a pool member)."""

    OP = "ready"
    device: str | None = None
    free_memory: int | None = None
    cache_bytes: int | None = None
    name: str | None = None
    pool: str | None = None


@message
class Heartbeat(Ready):
    """A relay is alive (the fields of ``ready``)."""

    OP = "heartbeat"


@message
class Result(Msg):
    """A request's results, with the digest of the inputs it was computed from."""

    OP = "result"
    TENSORS = True
    id: str
    bind: Binding
    compute_s: float | None = None
    digest: str | None = None
    tensors: tuple[torch.Tensor, ...] = ()


# Which messages each side takes, by direction.
FROM_ENCLAVE: frozenset[type[Msg]] = frozenset({Submit, Stage, Release, ReleaseJob, Ping, Quarantine})
TO_ENCLAVE: frozenset[type[Msg]] = frozenset({Done, Error, Pong, RelayEvent})
TO_RELAY: frozenset[type[Msg]] = frozenset({Forward, Backward, BackwardFull, Release, ReleaseJob, Ping, Stage, Sealed})
FROM_RELAY: frozenset[type[Msg]] = frozenset({Ready, Heartbeat, Result, Error, Pong})

ENCLAVE_OPS = frozenset(c.OP for c in FROM_ENCLAVE)
OFFLOADER_TO_ENCLAVE_OPS = frozenset(c.OP for c in TO_ENCLAVE)
OFFLOADER_TO_RELAY_OPS = frozenset(c.OP for c in TO_RELAY)
RELAY_OPS = frozenset(c.OP for c in FROM_RELAY)


def parse(frames: Sequence, allowed: Iterable[type[Msg]],
          max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Msg:
    """Decode and check one message of the `allowed` classes; its tensors are zero-copy views of
    the frames. `ProtocolError` for anything off (`codec.decode`), and for tensor frames on a
    message that carries none."""
    envelope = decode(frames, frozenset(c.OP for c in allowed), max_frame_bytes)
    return MESSAGES[envelope.op].from_envelope(envelope)


def error_frames(reason: str, request_id: str | None = None, bind: Binding | list | None = None,
                 code: ErrorCode = ErrorCode.BAD_REQUEST) -> list:
    """An ``error`` reply's frames (`Error.reply`); `bind` as a `Binding` or its wire form."""
    if bind is not None and not isinstance(bind, Binding):
        bind = Binding.from_wire(bind)
    return Error.reply(reason, code, request_id, bind).to_frames()
