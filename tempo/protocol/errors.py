"""Why a message was refused or a request failed."""

from __future__ import annotations


class ProtocolError(ValueError):
    """A message that breaks the protocol; the reason is safe to send back to the peer."""
