"""The relay's handling of one request, in-process (`Relay.handle`: frames in, reply frames out;
the loop around it only moves messages and beats, tests/test_processes.py)."""

from __future__ import annotations

import torch

from tempo.protocol import FROM_RELAY, Backward, Binding, Error, ErrorCode, Forward, Release, Result, inputs_digest, parse
from tempo.relay import Relay


def wire(frames) -> list[bytes]:
    return [bytes(memoryview(f).cast("B")) if isinstance(f, memoryview) else bytes(f) for f in frames]


def ask(relay: Relay, msg):
    reply = relay.handle(wire(msg.to_frames()))
    return None if reply is None else parse(wire(reply), FROM_RELAY)


def test_a_relay_computes_forward_and_backward_from_its_cache_and_names_a_miss():
    relay = Relay("tcp://unused", name="in-process")
    a, b, e = torch.randn(5, 4), torch.randn(4, 3), torch.randn(5, 3)
    bind = Binding("j", 0, 0, 0)
    out = ask(relay, Forward(id="f" * 24, bind=bind, digest=inputs_digest(wire([a.numpy(), b.numpy()])),
                             tensors=(a, b)))
    assert isinstance(out, Result) and out.id == "f" * 24 and torch.allclose(out.tensors[0], a @ b, atol=1e-6)
    out = ask(relay, Backward(id="b" * 24, bind=bind, tensors=(e,)))
    assert isinstance(out, Result)
    torch.testing.assert_close(out.tensors[0], e @ b.T)
    torch.testing.assert_close(out.tensors[1], a.T @ e)
    out = ask(relay, Backward(id="c" * 24, bind=bind, tensors=(e,)))  # the backward ended the binding
    assert isinstance(out, Error) and out.code is ErrorCode.CACHE_MISS and out.id == "c" * 24


def test_a_relay_with_no_room_to_cache_answers_a_backward_with_a_cache_miss():
    relay = Relay("tcp://unused", name="no-room", cache_bytes=0)
    a, b = torch.randn(5, 4), torch.randn(4, 3)
    bind = Binding("j", 0, 0, 0)
    assert isinstance(ask(relay, Forward(id="f" * 24, bind=bind, tensors=(a, b))), Result)
    out = ask(relay, Backward(id="b" * 24, bind=bind, tensors=(torch.randn(5, 3),)))
    assert isinstance(out, Error) and out.code is ErrorCode.CACHE_MISS
    assert ask(relay, Release(bind)) is None  # a release answers nothing
