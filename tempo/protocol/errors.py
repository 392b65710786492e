"""Why a message was refused or a request failed: a code for the peer's decisions, a reason for people.

An ``error`` carries both (since 2.3): the ``code`` (`ErrorCode`) is what a peer acts on (send a
part again with all its operands, give up on a request no relay holds, blame the relay), and the
``reason`` is what it logs and shows. No decision reads the reason's text.
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """What went wrong, as an ``error`` names it on the wire (the value)."""

    ERROR = "error"  # unspecified: a peer older than 2.3 names none, a later one one this peer does not know
    BAD_REQUEST = "bad_request"  # the message breaks the protocol (a field, a shape, a count)
    FORBIDDEN = "forbidden"  # a job or arena another enclave connection opened
    DIGEST_MISMATCH = "digest_mismatch"  # the inputs are not those the request's digest names
    CACHE_MISS = "cache_miss"  # the relay holds no cached operands for the binding (evicted, restarted)
    STAGE_MISS = "stage_miss"  # the relay holds no operand staged for the binding
    NO_RELAY = "no_relay"  # no relay holds the request to quarantine (none healthy is left)
    RESOURCES = "resources"  # out of memory or an OS resource (arena full, segment unreadable)
    COMPUTE_FAILED = "compute_failed"  # the relay's product failed (device error, out of device memory)
    MODE_MISMATCH = "mode_mismatch"  # a request's protection mode is not its job's (or its staged operand's); 2.4
    GAVE_UP = "gave_up"  # the off-loader dispatched a part too many times
    INTERNAL = "internal"  # a handler failed in a way no check foresaw

    @classmethod
    def from_wire(cls, value: str) -> ErrorCode:
        try:
            return cls(value)
        except ValueError:
            return cls.ERROR  # a code from a later minor version: still an error, just unnamed


class ProtocolError(ValueError):
    """A message that breaks the protocol, or a request refused; the reason is safe to send back
    to the peer, and `code` says why for the peer's decisions (`ErrorCode`)."""

    def __init__(self, reason: str = "", code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(reason)
        self.code = code
