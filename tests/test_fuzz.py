"""Fuzz: >= 10,000 random and mutated frames at the off-loader's two sockets and at a relay."""

import random

import msgpack
import torch
import zmq

from tempo.cluster import LocalCluster
from tempo.enclave.client import OffloadClient
from tempo.protocol import PROTOCOL_VERSION, RELAY_OPS, Binding, decode, encode, inputs_digest


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def seeds():
    t = torch.randn(3, 4)
    return [
        encode("forward", [t, torch.randn(4, 2)], id="a", bind=["j", 0, 0, 0]),
        encode("backward", [torch.randn(2, 3)], id="b", bind=["j", 0, 0, 0]),
        encode("result", [t], id="c", bind=["j", 0, 0, 0]),
        encode("ready", device="cpu", free_memory=1),
        encode("submit", id="d", bind=["j", 0, 0, 0], arena="tempo-x-1", kind="forward",
               inputs=[{"offset": 0, "nbytes": 48, "dtype": "float32", "shape": [3, 4]}], outputs=[]),
        encode("quarantine", relay="nobody", reason="fuzz"),
        encode("ping", id="e"),
    ]


def random_value(rng, depth=0):
    kinds = ["int", "str", "bytes", "float", "none", "bool"] + (["list", "map"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64 - 1, rng.randint(-1000, 1000)])
    if kind == "str":
        return rng.choice(["op", "v", "forward", "submit", "float32", "tensors", "\x00", "é" * 3, "x" * 300])
    if kind == "bytes":
        return rng.randbytes(rng.randint(0, 64))
    if kind == "float":
        return rng.choice([0.0, float("nan"), float("inf"), 1e308])
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {rng.choice(["op", "v", "id", "bind", "tensors", "arena", "kind", "inputs", "outputs", "relay",
                        "x"]): random_value(rng, depth + 1) for _ in range(rng.randint(0, 6))}


def mutate(rng, frames):
    frames = [bytes(f) for f in frames]
    choice = rng.randrange(8)
    if choice == 0 and frames:  # flip bytes
        i = rng.randrange(len(frames))
        b = bytearray(frames[i])
        for _ in range(rng.randint(1, 8)):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
        frames[i] = bytes(b)
    elif choice == 1 and frames:  # truncate
        i = rng.randrange(len(frames))
        frames[i] = frames[i][: rng.randint(0, len(frames[i]))]
    elif choice == 2:  # extra or missing frames
        frames = frames + [rng.randbytes(rng.randint(0, 100))] if rng.random() < 0.5 else frames[:-1]
    elif choice == 3:  # a random msgpack header with the right version
        header = random_value(rng)
        if isinstance(header, dict) and rng.random() < 0.7:
            header["v"] = list(PROTOCOL_VERSION)
            header.setdefault("op", rng.choice(["forward", "submit", "result", "ready", "quarantine", "backward_full"]))
        frames = [msgpack.packb(header, use_bin_type=True)] + frames[1:]
    elif choice == 4:  # pure noise
        frames = [rng.randbytes(rng.randint(0, 200)) for _ in range(rng.randint(1, 4))]
    elif choice == 5:  # lying tensor specs
        header = msgpack.unpackb(frames[0]) if frames and frames[0] else {}
        if isinstance(header, dict):
            header["tensors"] = [{"dtype": rng.choice(["float32", "float64", "int8", "x"]),
                                  "shape": [rng.choice([0, 1, 3, 2**20, -1]) for _ in range(rng.randint(0, 7))]}]
            frames = [msgpack.packb(header, use_bin_type=True), rng.randbytes(rng.randint(0, 64))]
    elif choice == 6:  # an empty message
        frames = [b""]
    return frames or [b""]


def drain(sock):
    n = 0
    while True:
        try:
            sock.recv_multipart(zmq.NOBLOCK)
            n += 1
        except zmq.Again:
            return n


def test_fuzzed_offloader_and_relay_stay_up_bounded_and_correct(relay_driven_by_test):
    rng = random.Random(2026)
    base = seeds()
    ctx = zmq.Context()
    cluster = LocalCluster(relays=1, heartbeat_timeout_s=2.0, heartbeat_s=0.2).start()
    try:
        # a second relay, driven directly: the test plays its off-loader
        with relay_driven_by_test(ctx) as (router, identity, victim):
            as_relay = ctx.socket(zmq.DEALER)
            as_enclave = ctx.socket(zmq.DEALER)
            for s, ep in ((as_relay, cluster.relay_endpoint), (as_enclave, cluster.enclave_endpoint)):
                s.setsockopt(zmq.LINGER, 0)
                s.connect(ep)
            off_pid, relay_pid = cluster.offloader.popen.pid, victim.relays[0].popen.pid
            before = (rss_kb(off_pid), rss_kb(relay_pid))
            sent = 0
            for i in range(10_500):
                frames = mutate(rng, rng.choice(base))
                target = i % 3
                if target == 0:
                    as_relay.send_multipart(frames)
                elif target == 1:
                    as_enclave.send_multipart(frames)
                else:
                    router.send_multipart([identity, *frames])
                sent += 1
                if i % 50 == 0:
                    drain(as_relay), drain(as_enclave), drain(router)
            assert sent >= 10_000
            # still alive, memory bounded
            assert cluster.offloader.alive() and victim.relays[0].alive() and cluster.relays[0].alive()
            after = (rss_kb(off_pid), rss_kb(relay_pid))
            assert after[0] - before[0] < 200_000 and after[1] - before[1] < 200_000, (before, after)
            # and correct work is still served: the fuzzed relay multiplies, the off-loader offloads
            drain(router)
            a, b = torch.randn(3, 4), torch.randn(4, 2)
            digest = inputs_digest([a.numpy().tobytes(), b.numpy().tobytes()])
            router.send_multipart([identity, *encode("forward", [a, b], id="ok", bind=["j", 9, 9, 9], digest=digest)])
            router.setsockopt(zmq.RCVTIMEO, 60_000)
            while True:  # the relay may still be answering fuzz from its backlog
                reply = decode(router.recv_multipart()[1:], RELAY_OPS)
                if reply.op == "result" and reply.request_id == "ok":
                    break
            assert torch.allclose(reply.tensors[0], a @ b)
            with OffloadClient(cluster.enclave_endpoint, "afterfuzz", arena_bytes=1 << 20, part_timeout_s=3.0) as client:
                client.wait_for_relays(1)
                x, y = torch.randn(5, 6), torch.randn(6, 7)
                assert torch.allclose(client.forward(x, y, Binding("afterfuzz", 0, 0, 0)), x @ y, atol=1e-5)
    finally:
        cluster.stop()
        ctx.destroy(linger=0)  # closes every socket of the test, even after a failure
    assert cluster.offloader.popen.returncode == 0, cluster.logs()
