import msgpack
import pytest
import torch

from tempo.protocol import (
    FIELDS,
    OFFLOADER_TO_RELAY_OPS,
    PROTOCOL_VERSION,
    Binding,
    Descriptor,
    ProtocolError,
    TensorSpec,
    claimed_request_id,
    decode,
    decode_header,
    encode,
    error_frames,
    new_request_id,
)


def to_bytes(frames):
    return [bytes(f) for f in frames]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_round_trip_is_exact_and_zero_copy_on_send(dtype):
    a = torch.randn(3, 4).to(dtype)
    b = torch.randn(2, 4, 5).to(dtype)
    empty = torch.empty(0, 7, dtype=dtype)
    frames = encode("forward", [a, b, empty], id="x", bind=["j", 1, 2, 3])
    assert isinstance(frames[1], memoryview)  # the tensor's own memory, not a copy
    msg = decode(to_bytes(frames), OFFLOADER_TO_RELAY_OPS)
    assert msg.op == "forward" and msg.request_id == "x"
    assert msg.binding == Binding("j", 1, 2, 3)
    assert [t.dtype for t in msg.tensors] == [dtype] * 3
    assert torch.equal(msg.tensors[0], a) and torch.equal(msg.tensors[1], b)
    assert msg.tensors[2].shape == (0, 7)
    assert msg.header["v"] == list(PROTOCOL_VERSION)


def test_encode_refuses_non_contiguous_and_disallowed_dtypes():
    with pytest.raises(ProtocolError, match="contiguous"):
        encode("forward", [torch.randn(4, 4).T])
    with pytest.raises(ProtocolError, match="not allowed"):
        encode("forward", [torch.ones(2, dtype=torch.int64)])


def header(**fields):
    base = {"v": list(PROTOCOL_VERSION), "op": "forward", "tensors": []}
    base.update(fields)
    return msgpack.packb(base, use_bin_type=True)


BAD = {
    "empty message": [],
    "malformed msgpack": [b"\xc1\xff\x00"],
    "non-map header": [msgpack.packb([1, 2, 3])],
    "no version": [msgpack.packb({"op": "forward"})],
    "wrong major version": [header(v=[PROTOCOL_VERSION[0] + 1, 0])],
    "unknown op": [header(op="__class__")],
    "op not a string": [header(op=5)],
    "more frames than specs": [header(), b"abcd"],
    "fewer frames than specs": [header(tensors=[{"dtype": "float32", "shape": [1]}])],
    "length mismatch": [header(tensors=[{"dtype": "float32", "shape": [2]}]), b"\x00" * 4],
    "disallowed dtype": [header(tensors=[{"dtype": "int64", "shape": [1]}]), b"\x00" * 8],
    "object dtype": [header(tensors=[{"dtype": "object", "shape": [1]}]), b"\x00" * 8],
    "negative shape": [header(tensors=[{"dtype": "float32", "shape": [-1]}]), b""],
    "too many dims": [header(tensors=[{"dtype": "float32", "shape": [1] * 9}]), b"\x00" * 4],
    "extra spec keys": [header(tensors=[{"dtype": "float32", "shape": [1], "x": 1}]), b"\x00" * 4],
    "ext type": [msgpack.packb({"v": list(PROTOCOL_VERSION), "op": "forward", "x": msgpack.ExtType(1, b"a")})],
    "huge header": [b"\x80" + b"\x00" * (70 * 1024)],
    "non-string map key": [msgpack.packb({1: 2, "v": list(PROTOCOL_VERSION), "op": "forward"})],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_messages_raise_protocol_error(case):
    with pytest.raises(ProtocolError):
        decode(BAD[case], OFFLOADER_TO_RELAY_OPS)


def test_oversize_frame_is_refused_before_building_a_tensor():
    frames = to_bytes(encode("forward", [torch.zeros(1024)], id="x", bind=["j", 0, 0, 0]))
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(frames, OFFLOADER_TO_RELAY_OPS, max_frame_bytes=1000)


@pytest.mark.parametrize(
    "bind", [None, [], ["j", 0, 0], ["", 0, 0, 0], ["j", -1, 0, 0], ["j", 0.5, 0, 0], [1, 0, 0, 0], ["j", True, 0, 0]]
)
def test_bad_bindings_are_refused(bind):
    with pytest.raises(ProtocolError, match="bind"):
        decode(to_bytes(encode("forward", id="x", bind=bind)), OFFLOADER_TO_RELAY_OPS)
    with pytest.raises(ProtocolError):
        Binding.from_wire(bind)


# One value of each msgpack type (and the awkward ints and floats).
EVERY_TYPE = [None, True, 0, -1, 2**64 - 1, 1.5, float("nan"), "fuzz", b"\x00\xff", [1, "a"], [[1], [2, [3]]],
              {"k": 1}]


@pytest.mark.parametrize("value", EVERY_TYPE, ids=repr)
def test_unhashable_or_foreign_dtypes_are_a_protocol_error(value):
    spec = {"dtype": value, "shape": [1]}
    with pytest.raises(ProtocolError, match="dtype"):
        TensorSpec.from_wire(spec)
    with pytest.raises(ProtocolError, match="dtype"):
        Descriptor.from_wire({"offset": 0, "nbytes": 4, "dtype": value, "shape": [1]}, 64)
    with pytest.raises(ProtocolError, match="tensors"):
        decode_header(msgpack.packb({"v": list(PROTOCOL_VERSION), "op": "ready", "tensors": [spec]}))


# The msgpack type each field has on the wire (the values it may take are narrower still).
WIRE_TYPES = {
    **dict.fromkeys(("id", "digest", "arena", "kind", "staged", "slot", "job", "relay", "reason", "event", "device",
                     "name", "pool", "code"), str),
    **dict.fromkeys(("free_memory", "cache_bytes", "relays"), int),
    **dict.fromkeys(("compute_s", "relay_s", "turnaround_s"), (int, float)),
    **dict.fromkeys(("tensors", "bind", "inputs", "operands", "outputs"), list),
    **dict.fromkeys(("tables", "pools"), dict),
}


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_known_field_refuses_values_of_other_types(name):
    """A value of any other msgpack type than the field's own (nil and booleans included) is
    refused, with the field's name in the reason."""
    for value in EVERY_TYPE:
        raw = msgpack.packb({"v": list(PROTOCOL_VERSION), "op": "x", name: value})
        try:
            decode_header(raw)
        except ProtocolError as exc:
            assert name in str(exc)
            continue
        assert isinstance(value, WIRE_TYPES[name]) and not isinstance(value, bool), (name, value)


def test_required_fields_and_the_done_flag():
    with pytest.raises(ProtocolError, match="submit lacks id"):
        decode_header(msgpack.packb({"v": list(PROTOCOL_VERSION), "op": "submit", "bind": ["j", 0, 0, 0],
                                     "arena": "tempo-j-1", "kind": "forward"}))
    done = encode("done", id="x", bind=["j", 0, 0, 0], staged=True)
    assert decode(to_bytes(done), frozenset({"done"})).header["staged"] is True
    with pytest.raises(ProtocolError, match="staged"):
        decode(to_bytes(encode("forward", id="x", bind=["j", 0, 0, 0], staged=True)), OFFLOADER_TO_RELAY_OPS)
    unknown = msgpack.packb({"v": [PROTOCOL_VERSION[0], 99], "op": "ping", "later": {"x": [1]}})
    assert decode_header(unknown)["later"] == {"x": [1]}  # a field from a later minor version is ignored


def test_claimed_request_id_reads_through_a_broken_message():
    broken = [msgpack.packb({"v": list(PROTOCOL_VERSION), "op": "result", "id": "rid", "tensors": [{"dtype": []}]})]
    with pytest.raises(ProtocolError):
        decode(broken, frozenset({"result"}))
    assert claimed_request_id(broken) == "rid"
    assert claimed_request_id([b"\xc1"]) is None and claimed_request_id([msgpack.packb({"id": 5})]) is None


def test_error_frames_and_request_ids():
    msg = decode(to_bytes(error_frames("x" * 2000, "rid", ["j", 0, 0, 0])), frozenset({"error"}))
    assert len(msg.header["reason"]) == 500 and msg.request_id == "rid"
    assert len({new_request_id() for _ in range(1000)}) == 1000
