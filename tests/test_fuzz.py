"""Fuzz: >= 10,000 random and mutated frames at the off-loader's two sockets and at a relay; and
every header field of every op replaced by values of every msgpack type while a job runs."""

import math
import random
import threading
import time

import msgpack
import torch
import zmq

from tempo import arena as arena_mod
from tempo.arena import Arena
from tempo.cluster import LocalCluster
from tempo.enclave.client import OffloadClient
from tempo.protocol import (
    ENCLAVE_OPS,
    OFFLOADER_TO_RELAY_OPS,
    PROTOCOL_VERSION,
    RELAY_OPS,
    Binding,
    decode,
    decode_header,
    encode,
    inputs_digest,
)
from tempo.relay import Relay


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


# -- type confusion of every header field of every op, while a real job runs --

# One value of each msgpack type, and the awkward ints and floats.
EVERY_TYPE = [None, True, 7, -1, 2**64 - 1, 1.5, float("nan"), "fuzz", b"\x00\xff", [1, "a"], [[1], [2, [3]]], {"k": 1}]


def field_paths(value, prefix=()):
    """Every place in a header a value sits: each map entry and list element, nested ones too."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield (*prefix, key)
        yield from field_paths(child, (*prefix, key))


def confused(frames):
    """`frames` with each header field, in turn, replaced by a value of every msgpack type."""
    header = msgpack.unpackb(bytes(frames[0]), raw=False)
    for path in list(field_paths(header)):
        for value in EVERY_TYPE:
            copy = msgpack.unpackb(bytes(frames[0]), raw=False)
            node = copy
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            yield [msgpack.packb(copy, use_bin_type=True), *frames[1:]]


def desc(offset, shape):
    return {"offset": offset, "nbytes": 4 * math.prod(shape), "dtype": "float32", "shape": list(shape)}


def enclave_seeds(arena_name):
    """A valid message of each enclave op (and of each form of submit and release), into the
    fuzzer's own arena."""
    bind = ["fuzzjob", 0, 0, 0]
    a, b, c, d = desc(0, (3, 4)), desc(64, (4, 2)), desc(128, (3, 2)), desc(192, (3, 2))
    t1, t2 = desc(256, (3, 4)), desc(320, (4, 2))
    seeds = {
        "submit": encode("submit", id="f1", bind=bind, arena=arena_name, kind="forward", inputs=[a, b], outputs=[c],
                         staged="b"),
        "stage": encode("stage", arena=arena_name, bind=bind, slot="b", inputs=[b]),
        "submit backward": encode("submit", id="f2", bind=bind, arena=arena_name, kind="backward", inputs=[d],
                                  operands=[a, b], outputs=[t1, t2]),
        "release binding": encode("release", bind=bind),
        "release job": encode("release_job", job="fuzzjob", arena=arena_name),
        "ping": encode("ping", id="f3"),
        "quarantine": encode("quarantine", relay="fuzz-nobody", reason="fuzz", id="f4"),
    }
    assert {decode_header(f[0])["op"] for f in seeds.values()} == ENCLAVE_OPS
    return seeds


def relay_seeds():
    """A valid message of each op a relay sends to the off-loader."""
    bind = ["fuzzjob", 0, 0, 0]
    seeds = {
        "ready": encode("ready", device="cpu", free_memory=1 << 30, cache_bytes=0, name="prober"),
        "heartbeat": encode("heartbeat", device="cpu", free_memory=1 << 30, cache_bytes=0, name="prober"),
        "result": encode("result", [torch.ones(3, 2)], id="r1", bind=bind, compute_s=0.001, digest="00" * 16),
        "error": encode("error", reason="fuzz", id="r2", bind=bind),
        "pong": encode("pong", id="r3", bind=bind),
    }
    assert set(seeds) == RELAY_OPS
    return seeds


def offloader_seeds():
    """A valid message of each op the off-loader sends a relay (and each form of forward and
    release), with the right digests."""
    bind = ["fuzzjob", 0, 0, 0]
    a, b, d = torch.randn(3, 4), torch.randn(4, 2), torch.randn(3, 2)
    blob = torch.randint(0, 256, (64,), dtype=torch.uint8)  # a sealed blob (unopenable: fuzz)

    def digest(*ts):
        return inputs_digest([t.numpy().tobytes() for t in ts])

    seeds = {
        "forward": encode("forward", [a, b], id="o1", bind=bind, digest=digest(a, b)),
        "stage": encode("stage", [b], bind=bind, slot="b", digest=digest(b)),
        "forward staged": encode("forward", [a], id="o2", bind=bind, staged="b", digest=digest(a)),
        "backward": encode("backward", [d], id="o3", bind=bind, digest=digest(d)),
        "backward_full": encode("backward_full", [a, b, d], id="o4", bind=bind, digest=digest(a, b, d)),
        "release binding": encode("release", bind=bind),
        "release job": encode("release_job", job="fuzzjob"),
        "ping": encode("ping", id="o5", bind=bind),
        "sealed": encode("sealed", [blob], id="o6", bind=bind, pool="fuzzpool", digest=digest(blob)),
    }
    assert {decode_header(f[0])["op"] for f in seeds.values()} == OFFLOADER_TO_RELAY_OPS
    return seeds


def victim_job(client, stop, started, failures, done):
    """Products through the off-loader until `stop`, forward and backward, some with a weight
    shipped ahead, some dropped ahead or released without a backward; each checked against torch."""
    rng = random.Random(11)
    step = 0
    try:
        while not stop.is_set() or step < 40:
            window = []
            for _ in range(4):
                m, n, p = (rng.randint(1, 12) for _ in range(3))
                a, b = torch.randn(m, n, dtype=torch.float64), torch.randn(n, p, dtype=torch.float64)
                bind = Binding(client.job, step, 0, 0)
                pre = client.premask(bind, "b", b, (m, n, p)) if step % 3 else None
                if pre is not None and step % 5 == 0:
                    client.drop_premasked(pre)
                    pre = None
                window.append((a, b, bind, client.submit_forward(a, b, bind, pre=pre)))
                step += 1
            backs = []
            for a, b, bind, pending in window:
                c = client.finish_forward(pending)
                assert torch.allclose(c, a @ b, atol=1e-9), bind
                if bind.step % 4 == 3:
                    client.release(bind)  # a forward with no backward (evaluation)
                    continue
                grad = torch.randn_like(c)
                backs.append((a, b, grad, client.submit_backward(grad, bind)))
            for a, b, grad, pending in backs:
                da, db = client.finish_backward(pending)
                assert torch.allclose(da, grad @ b.T, atol=1e-9) and torch.allclose(db, a.T @ grad, atol=1e-9)
            started.set()
            done.append(step)
    except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
        failures.append(exc)
    finally:
        started.set()


def recv_reply(sock, want_id=None, timeout_s=10.0, meanwhile=lambda: None):
    """The next ``error`` (with id `want_id`, if given) on `sock`; other messages are skipped.
    `meanwhile` runs while it waits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        meanwhile()
        if not sock.poll(10):
            continue
        frames = sock.recv_multipart()
        header = decode_header(frames[0])
        if header["op"] == "error" and (want_id is None or header.get("id") == want_id):
            return header
    raise AssertionError(f"no error reply{f' for {want_id}' if want_id else ''}")


class Prober:
    """A relay socket that the fuzzer sends from: it answers the parts the off-loader gives it
    honestly (an in-process `Relay`), so the job is not held up by it."""

    def __init__(self, ctx, endpoint):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, b"prober-relay")
        self.sock.connect(endpoint)
        self.relay = Relay("tcp://unused", name="prober-relay")
        self.beat = relay_seeds()["heartbeat"]
        self.last_beat = 0.0
        self.answered = 0

    def serve(self):
        if time.monotonic() - self.last_beat > 0.2:
            self.sock.send_multipart(self.beat)
            self.last_beat = time.monotonic()
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if decode_header(frames[0])["op"] in OFFLOADER_TO_RELAY_OPS:  # not the off-loader's error replies
                reply = self.relay.handle(frames)
                if reply is not None:
                    self.sock.send_multipart(reply)
                    self.answered += 1


def test_every_field_of_every_op_type_confused_while_a_job_runs(relay_driven_by_test):
    ctx = zmq.Context()
    cluster = LocalCluster(relays=2, heartbeat_timeout_s=2.0, heartbeat_s=0.2).start()
    empty = arena_mod.SHM_DIR / arena_mod.segment_name("fuzzempty")
    try:
        with relay_driven_by_test(ctx) as (router, identity, victim), \
                Arena.create("fuzzer", 1 << 12) as own, \
                OffloadClient(cluster.enclave_endpoint, "victim", arena_bytes=4 << 20, part_timeout_s=20.0) as client:
            client.wait_for_relays(2)

            def dealer(endpoint, name):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.IDENTITY, name)
                s.connect(endpoint)
                return s

            fuzzer = dealer(cluster.enclave_endpoint, b"fuzzer")
            intruder = dealer(cluster.enclave_endpoint, b"intruder")
            stranger = dealer(cluster.relay_endpoint, b"stranger")
            prober = Prober(ctx, cluster.relay_endpoint)
            prober.sock.send_multipart(relay_seeds()["ready"])  # joined: its fuzz reaches the handlers
            stop, started, failures, done = threading.Event(), threading.Event(), [], []
            job = threading.Thread(target=victim_job, args=(client, stop, started, failures, done))
            job.start()
            deadline = time.monotonic() + 60
            while not started.wait(0.01) and time.monotonic() < deadline:
                prober.serve()  # parts may go to the prober from the start
            assert started.is_set() and not failures, failures

            # the four single messages that used to stop the off-loader, aimed at the running job
            ready = msgpack.unpackb(bytes(relay_seeds()["ready"][0]))
            ready["tensors"] = [{"dtype": ["float32"], "shape": [1]}]
            stranger.send_multipart([msgpack.packb(ready), b"\x00" * 4])
            assert "dtype" in recv_reply(stranger, meanwhile=prober.serve)["reason"]
            victim_arena = client.arena.name
            hostile = {
                "release of its arena": encode("release_job", job="victim", arena=victim_arena, id="t1"),
                "release of one of its bindings": encode("release", bind=["victim", 0, 0, 0], id="t2"),
                "submit into its arena": encode("submit", id="t3", bind=["intruder", 0, 0, 0], arena=victim_arena,
                                                kind="forward", inputs=[desc(0, (1, 1)), desc(64, (1, 1))],
                                                outputs=[desc(128, (1, 1))]),
                "stage into its arena": encode("stage", id="t4", bind=["intruder", 0, 0, 0], arena=victim_arena,
                                               slot="a", inputs=[desc(0, (1, 1))]),
                "submit for its job": encode("submit", id="t5", bind=["victim", 0, 0, 0], arena=own.name,
                                             kind="forward", inputs=[desc(0, (1, 1)), desc(64, (1, 1))],
                                             outputs=[desc(128, (1, 1))]),
                "a map as a dtype": encode("submit", id="t6", bind=["intruder", 0, 0, 0], arena=own.name,
                                           kind="forward", inputs=[{**desc(0, (1, 1)), "dtype": {"k": 1}},
                                                                   desc(64, (1, 1))], outputs=[desc(128, (1, 1))]),
                "a zero-length segment": encode("submit", id="t7", bind=["intruder", 0, 0, 0], arena=empty.name,
                                                kind="forward", inputs=[desc(0, (1, 1)), desc(64, (1, 1))],
                                                outputs=[desc(128, (1, 1))]),
            }
            empty.write_bytes(b"")
            for name, frames in hostile.items():
                intruder.send_multipart(frames)
                reply = recv_reply(intruder, msgpack.unpackb(bytes(frames[0]))["id"], meanwhile=prober.serve)
                assert reply["reason"], name

            sent = {"enclave": 0, "relay socket": 0, "relay": 0}
            streams = [("enclave", fuzzer, s) for s in enclave_seeds(own.name).values()]
            streams += [("relay socket", prober.sock, s) for s in relay_seeds().values()]
            streams += [("relay", None, s) for s in offloader_seeds().values()]
            for target, sock, seed in streams:
                for frames in confused(seed):
                    if sock is None:
                        router.send_multipart([identity, *frames])
                    else:
                        sock.send_multipart(frames)
                    sent[target] += 1
                    if sum(sent.values()) % 16 == 0:
                        prober.serve()
                        drain(fuzzer), drain(router), drain(stranger)
            stop.set()
            while job.is_alive():  # the job may hold parts on the prober: keep answering
                prober.serve()
                drain(fuzzer)
                job.join(0.01)
            assert not failures, failures
            assert done[-1] >= 40 and client.counters.failed_verifications == 0
            assert client.relay_events == []  # no relay was lost, none quarantined: fuzz is no evidence
            assert prober.answered > 0  # the prober took part in the job
            assert min(sent.values()) > 500, sent
            assert cluster.offloader.alive() and victim.relays[0].alive()
            assert all(r.alive() for r in cluster.relays)
            # the fuzzed relay still multiplies
            drain(router)
            a, b = torch.randn(3, 4), torch.randn(4, 2)
            ok = encode("forward", [a, b], id="ok", bind=["j", 9, 9, 9],
                        digest=inputs_digest([a.numpy().tobytes(), b.numpy().tobytes()]))
            router.send_multipart([identity, *ok])
            router.setsockopt(zmq.RCVTIMEO, 60_000)
            while True:
                reply = decode(router.recv_multipart()[1:], RELAY_OPS)
                if reply.op == "result" and reply.request_id == "ok":
                    break
            assert torch.allclose(reply.tensors[0], a @ b)
            relay_lines = list(victim.relays[0].lines)
    finally:
        empty.unlink(missing_ok=True)
        cluster.stop()
        ctx.destroy(linger=0)
    assert cluster.offloader.popen.returncode == 0, cluster.logs()
    # every message was refused at the edge: none reached a handler that then failed
    assert not [line for line in cluster.offloader.lines if "offloader.handler_failed" in line], cluster.logs()
    assert not [line for line in relay_lines if "relay.handler_failed" in line]
