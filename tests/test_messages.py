"""The message classes (`tempo.protocol.messages`): every op in the registry has a strategy here;
a valid message of each round-trips through its frames; mutated ones raise `ProtocolError` and
nothing else."""

import dataclasses
import math

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tempo.protocol import (
    DTYPES,
    MAX_DIMS,
    MAX_TENSORS,
    MESSAGES,
    MODES,
    PROTOCOL_VERSION,
    Binding,
    Descriptor,
    Error,
    ErrorCode,
    Msg,
    ProtocolError,
    Release,
    ReleaseJob,
    Submit,
    decode_header,
    error_frames,
    parse,
)

ALL = frozenset(MESSAGES.values())


def text(max_len):
    return st.text(min_size=1, max_size=min(max_len, 40))


small_shape = st.lists(st.integers(0, 4), max_size=MAX_DIMS).map(tuple)


@st.composite
def tensors(draw, max_count=MAX_TENSORS):
    out = []
    for _ in range(draw(st.integers(0, max_count))):
        dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
        shape = draw(small_shape)
        raw = draw(st.binary(min_size=math.prod(shape) * dtype.itemsize, max_size=math.prod(shape) * dtype.itemsize))
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        out.append(flat.view(dtype).reshape(shape))
    return tuple(out)


@st.composite
def descriptor(draw):
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    shape = draw(small_shape)
    return Descriptor.at(draw(st.integers(0, 2**40)), shape, DTYPES[dtype])


count = st.integers(0, 2**63)
seconds = st.one_of(st.integers(0, 2**31), st.floats(0, 1e9, allow_nan=False, allow_infinity=False))
tables = st.dictionaries(text(16), count, max_size=6)

# Each header field's valid values (its `codec.FIELDS` type), by name.
FIELD_VALUES = {
    "id": text(64),
    "bind": st.builds(Binding, text(128), count, count, count),
    "digest": text(64),
    "arena": text(255),
    "kind": st.sampled_from(["forward", "backward", "sealed"]),
    "pool": text(64),
    "pools": tables,
    "inputs": st.lists(descriptor(), max_size=4).map(tuple),
    "operands": st.lists(descriptor(), max_size=4).map(tuple),
    "outputs": st.lists(descriptor(), max_size=4).map(tuple),
    "staged": st.sampled_from(["a", "b"]),
    "slot": st.sampled_from(["a", "b"]),
    "job": text(128),
    "relay": text(255),
    "reason": text(4096),
    "event": text(64),
    "device": text(64),
    "name": text(255),
    "free_memory": count,
    "cache_bytes": count,
    "relays": count,
    "compute_s": seconds,
    "relay_s": seconds,
    "turnaround_s": seconds,
    "tables": tables,
    "code": st.sampled_from(list(ErrorCode)),
    "mode": st.sampled_from(MODES),
    "tensors": tensors(),
}
# An op's exceptions to FIELD_VALUES (its class's CHECKS).
OP_FIELD_VALUES = {("done", "staged"): st.booleans()}


def strategy_for(cls):
    """Valid messages of `cls`: each required field, and each optional one or not."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        values = OP_FIELD_VALUES.get((cls.OP, f.name), FIELD_VALUES[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        # a field whose default is not None (mode) is always sent: None is not one of its values
        always = required or f.name == "tensors" or f.default is not None
        kwargs[f.name] = values if always else st.one_of(st.none(), values)
    for name in ("inputs", "operands", "outputs"):  # "none" is no descriptors
        if name in kwargs:
            kwargs[name] = st.one_of(st.just(()), FIELD_VALUES[name])
    if cls is Error:  # its defaults stand in for what is absent
        kwargs["reason"], kwargs["code"] = FIELD_VALUES["reason"], FIELD_VALUES["code"]
    return st.builds(cls, **kwargs)


STRATEGIES = {op: strategy_for(cls) for op, cls in MESSAGES.items()}


def test_every_op_in_the_registry_has_a_fuzz_strategy():
    assert set(STRATEGIES) == set(MESSAGES)
    for op, cls in MESSAGES.items():  # and every field of every message a value strategy
        assert cls.OP == op and issubclass(cls, Msg)
        for f in dataclasses.fields(cls):
            assert f.name in FIELD_VALUES or (op, f.name) in OP_FIELD_VALUES, (op, f.name)


any_message = st.sampled_from(sorted(STRATEGIES)).flatmap(lambda op: STRATEGIES[op])


def wire(msg):
    return [bytes(f) for f in msg.to_frames()]


def decodes_or_refuses(frames):
    """Decode `frames` as any message; only `ProtocolError` may come out."""
    try:
        return parse(frames, ALL)
    except ProtocolError:
        return None


@pytest.mark.parametrize("op", sorted(MESSAGES))
def test_each_message_round_trips_through_its_frames(op):
    @settings(max_examples=60, deadline=None)
    @given(STRATEGIES[op])
    def check(msg):
        frames = wire(msg)
        assert parse(frames, ALL) == msg
        assert type(msg).from_frames(frames) == msg
        assert decode_header(frames[0])["v"] == list(PROTOCOL_VERSION)

    check()


@pytest.mark.parametrize("op", sorted(MESSAGES))
def test_each_message_mutated_raises_only_protocol_error(op):
    @settings(max_examples=40, deadline=None)
    @given(STRATEGIES[op], st.data())
    def check(msg, data):
        frames = wire(msg)
        header = msgpack.unpackb(frames[0], raw=False)

        def refused(new_header, rest=None):
            with pytest.raises(ProtocolError):
                parse([msgpack.packb(new_header, use_bin_type=True), *(frames[1:] if rest is None else rest)], ALL)

        # bytes flipped or the header cut short: refused, or still a valid message
        head = bytearray(frames[0])
        for _ in range(data.draw(st.integers(1, 4))):
            head[data.draw(st.integers(0, len(head) - 1))] = data.draw(st.integers(0, 255))
        decodes_or_refuses([bytes(head), *frames[1:]])
        cut = data.draw(st.integers(0, len(frames[0]) - 1))
        decodes_or_refuses([frames[0][:cut], *frames[1:]])
        # a wrong major version, an unknown op, an op the receiver does not take
        refused({**header, "v": [PROTOCOL_VERSION[0] + data.draw(st.sampled_from([-1, 1, 2])), 0]})
        refused({**header, "op": data.draw(st.sampled_from(["__class__", "", "relay_events", "FORWARD"]))})
        with pytest.raises(ProtocolError):
            parse(frames, ALL - {type(msg)})
        # each field as a value of another type: nil and a nested list are no field's type
        for name in [k for k in header if k not in ("v", "op")]:
            for wrong in (None, [[1], [2, [3]]]):
                refused({**header, name: wrong})
            decodes_or_refuses([msgpack.packb({**header, name: data.draw(st.sampled_from(
                [True, 7, -1, 2**64 - 1, 1.5, float("nan"), "fuzz", b"\x00", [1, "a"], {"k": 1}]))}), *frames[1:]])
        # a required field missing
        required = [f.name for f in dataclasses.fields(msg) if f.name != "tensors"
                    and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if required:
            gone = data.draw(st.sampled_from(required))
            refused({k: v for k, v in header.items() if k != gone})
        # tensor frames whose lengths do not match their specs, or that should not be there
        if frames[1:]:
            i = data.draw(st.integers(0, len(frames) - 2))
            rest = list(frames[1:])
            rest[i] = rest[i] + b"\x00" * data.draw(st.integers(1, 9)) if data.draw(st.booleans()) or not rest[i] \
                else rest[i][:-1]
            refused(header, rest)
            refused(header, frames[1:-1])  # a frame missing
        if not type(msg).TENSORS:
            refused({**header, "tensors": [{"dtype": "float32", "shape": [1]}]}, [b"\x00" * 4])

    check()


def test_truncated_and_garbage_frames_raise_only_protocol_error():
    @settings(max_examples=300, deadline=None)
    @given(any_message, st.binary(max_size=64), st.integers(0, 3))
    def check(msg, noise, where):
        frames = wire(msg)
        if where == 0:
            frames = [noise]
        elif where == 1:
            frames = [frames[0] + noise, *frames[1:]]
        elif where == 2:
            frames = [*frames, noise]
        else:
            frames = [frames[0][: len(noise)], *frames[1:]]
        decodes_or_refuses(frames)

    check()


def test_errors_carry_a_code_and_unknown_codes_read_as_unspecified():
    frames = error_frames("x" * 2000, "rid", Binding("j", 0, 0, 0), ErrorCode.CACHE_MISS)
    msg = Error.from_frames([bytes(f) for f in frames])
    assert msg.code is ErrorCode.CACHE_MISS and len(msg.reason) == 500 and msg.bind == Binding("j", 0, 0, 0)
    later = msgpack.packb({"v": [PROTOCOL_VERSION[0], 99], "op": "error", "reason": "r", "code": "from_the_future"})
    assert Error.from_frames([later]).code is ErrorCode.ERROR
    older = msgpack.packb({"v": [PROTOCOL_VERSION[0], 2], "op": "error", "reason": "r"})
    assert Error.from_frames([older]).code is ErrorCode.ERROR


def test_releasing_a_job_is_its_own_message():
    assert ReleaseJob.from_frames(wire(ReleaseJob("job1", arena="tempo-job1-1"))) == ReleaseJob("job1", "tempo-job1-1")
    with pytest.raises(ProtocolError, match="release lacks bind"):  # no made-up binding stands for a job
        Release.from_frames([msgpack.packb({"v": list(PROTOCOL_VERSION), "op": "release", "job": "job1"})])


WORK = ("submit", "stage", "forward", "backward", "backward_full")  # the requests that carry operands


def test_work_requests_carry_their_protection_mode_and_nothing_else_does():
    assert MODES == ("masked", "asymml") and PROTOCOL_VERSION == (2, 4)
    for op, cls in MESSAGES.items():
        names = {f.name for f in dataclasses.fields(cls)}
        assert ("mode" in names) == (op in WORK), op


@pytest.mark.parametrize("op", WORK)
def test_each_mode_round_trips_and_an_unknown_mode_is_refused(op):
    @settings(max_examples=20, deadline=None)
    @given(STRATEGIES[op])
    def check(msg):
        for mode in MODES:
            frames = wire(dataclasses.replace(msg, mode=mode))
            assert msgpack.unpackb(frames[0], raw=False)["mode"] == mode  # sent explicitly, even the default
            assert parse(frames, ALL).mode == mode
        frames = wire(msg)
        header = msgpack.unpackb(frames[0], raw=False)
        for wrong in ("plain", "MASKED", "", 1, None):
            with pytest.raises(ProtocolError, match="'mode'"):
                parse([msgpack.packb({**header, "mode": wrong}), *frames[1:]], ALL)
        older = {k: v for k, v in header.items() if k != "mode"}  # a 2.3 peer names no mode: masked
        assert parse([msgpack.packb({**older, "v": [2, 3]}), *frames[1:]], ALL).mode == "masked"

    check()


def test_a_submit_keeps_its_positional_fields_and_defaults_to_masked():
    bind = Binding("j", 0, 0, 0)
    old_style = Submit("rid", bind, "arena", "forward", (), (), (), "a", None)
    assert old_style.staged == "a" and old_style.mode == "masked"
    assert Submit.from_frames(wire(Submit("rid", bind, "arena", "forward", mode="asymml"))).mode == "asymml"
