"""Signals that end a run: Ctrl-C (SIGINT), SIGTERM (docker stop, systemd, schedulers), SIGHUP.

`handle_signals` turns each into an `Interrupted` exception in the main thread, so the code that
started processes and shared memory unwinds through its ``finally`` blocks exactly as it does for
Ctrl-C. `deferred` marks a section that must not be cut in half (an optimizer update and the
checkpoint after it): a signal that arrives inside it is raised when the section ends.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop by a signal; `signum` says which."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + self.signum


_state = {"depth": 0, "pending": None}


def _handler(signum, frame) -> None:  # noqa: ARG001
    if _state["depth"]:
        _state["pending"] = signum
        return
    raise Interrupted(signum)


@contextmanager
def handle_signals() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise `Interrupted`; the previous handlers
    come back afterwards. Outside the main thread (where Python cannot set handlers) it does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _state["pending"] = None


@contextmanager
def deferred() -> Iterator[None]:
    """A section a signal must not cut: one that arrives inside it is raised at its end."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
    pending = _state["pending"]  # (an exception from the section itself goes first)
    if not _state["depth"] and pending is not None:
        _state["pending"] = None
        raise Interrupted(pending)
