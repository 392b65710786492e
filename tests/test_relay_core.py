"""The relay's handling of one request, in-process (`Relay.handle`: frames in, reply frames out;
the loop around it only moves messages and beats, tests/test_processes.py)."""

from __future__ import annotations

import torch

from tempo.protocol import (
    FROM_RELAY,
    Backward,
    BackwardFull,
    Binding,
    Error,
    ErrorCode,
    Forward,
    Release,
    ReleaseJob,
    Result,
    Stage,
    inputs_digest,
    parse,
)
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


def test_a_relay_holds_a_job_to_the_mode_of_its_first_request():
    relay = Relay("tcp://unused", name="modes")
    a, b, e = torch.randn(5, 4), torch.randn(4, 3), torch.randn(5, 3)
    bind, other = Binding("j", 0, 0, 0), Binding("j", 0, 1, 0)
    assert isinstance(ask(relay, Forward(id="f" * 24, bind=bind, tensors=(a, b), mode="asymml")), Result)
    assert relay.job_modes == {"j": "asymml"}
    for msg in (Forward(id="g" * 24, bind=other, tensors=(a, b)),  # masked, the default
                Backward(id="b" * 24, bind=bind, tensors=(e,), mode="masked"),
                BackwardFull(id="c" * 24, bind=other, tensors=(a, b, e), mode="masked")):
        out = ask(relay, msg)
        assert isinstance(out, Error) and out.code is ErrorCode.MODE_MISMATCH and out.id == msg.id, msg.OP
        assert "'asymml'" in out.reason and "'masked'" in out.reason
    assert list(relay.cache.entries) == [bind]  # a refusal computes and caches nothing, and drops nothing
    assert relay.cache.entries[bind].mode == "asymml"
    out = ask(relay, Backward(id="d" * 24, bind=bind, tensors=(e,), mode="asymml"))  # its own mode still works
    assert isinstance(out, Result)
    torch.testing.assert_close(out.tensors[1], a.T @ e)
    assert isinstance(ask(relay, Forward(id="h" * 24, bind=Binding("k", 0, 0, 0), tensors=(a, b))), Result)
    assert relay.job_modes == {"j": "asymml", "k": "masked"}  # another job has its own mode


def test_a_staged_or_cached_operand_is_used_only_in_the_mode_it_came_in():
    relay = Relay("tcp://unused", name="staged-modes")
    a, b, e = torch.randn(5, 4), torch.randn(4, 3), torch.randn(5, 3)
    bind = Binding("j", 0, 0, 0)
    assert ask(relay, Stage(bind, "b", tensors=(b,), mode="asymml")) is None
    assert relay.staged[bind][2] == "asymml"
    relay.job_modes.clear()  # even where the job's mode is not known (any more), the operand's is
    out = ask(relay, Forward(id="f" * 24, bind=bind, staged="b", tensors=(a,), mode="masked"))
    assert isinstance(out, Error) and out.code is ErrorCode.MODE_MISMATCH and "staged" in out.reason
    relay.job_modes.clear()
    assert ask(relay, Stage(bind, "b", tensors=(b,), mode="asymml")) is None
    out = ask(relay, Forward(id="g" * 24, bind=bind, staged="b", tensors=(a,), mode="asymml"))
    assert isinstance(out, Result) and torch.allclose(out.tensors[0], a @ b, atol=1e-6)
    relay.job_modes.clear()
    out = ask(relay, Backward(id="b" * 24, bind=bind, tensors=(e,), mode="masked"))
    assert isinstance(out, Error) and out.code is ErrorCode.MODE_MISMATCH and "cached" in out.reason
    assert bind in relay.cache.entries  # kept for the backward in its own mode


def test_releasing_a_job_forgets_its_mode():
    relay = Relay("tcp://unused", name="release-modes")
    a, b = torch.randn(5, 4), torch.randn(4, 3)
    bind = Binding("j", 0, 0, 0)
    assert isinstance(ask(relay, Forward(id="f" * 24, bind=bind, tensors=(a, b), mode="asymml")), Result)
    assert ask(relay, Release(bind)) is None  # one binding's release keeps the job's mode
    assert ask(relay, Forward(id="g" * 24, bind=bind, tensors=(a, b))).code is ErrorCode.MODE_MISMATCH
    assert ask(relay, ReleaseJob("j")) is None
    assert relay.job_modes == {}
    out = ask(relay, Forward(id="h" * 24, bind=bind, tensors=(a, b), mode="masked"))  # the name, free again
    assert isinstance(out, Result) and relay.job_modes == {"j": "masked"}
