"""Integration: real `tempo offloader` and `tempo relay` processes on loopback, real sockets."""

import os
import random
import signal
import time

import msgpack
import pytest
import torch
import zmq
from conftest import ask_relay

from tempo import arena as arena_mod
from tempo.cluster import LocalCluster
from tempo.enclave.client import NoHealthyRelay, OffloadClient, OffloadError
from tempo.core.keys import KeySchedule
from tempo.core.verify import rounding_bound
from tempo.protocol import (
    PROTOCOL_VERSION,
    RELAY_OPS,
    Binding,
    ErrorCode,
    decode,
    encode,
    inputs_digest,
)


def digest_of(tensors):
    return inputs_digest([t.numpy().tobytes() for t in tensors])



def close_enough(got, want, x, y):
    tol = rounding_bound(x, y, slack=4.0).unsqueeze(-1)
    return got.shape == want.shape and bool(((got - want).abs() <= tol).all())


@pytest.fixture
def cluster():
    c = LocalCluster(relays=2, heartbeat_timeout_s=1.0, heartbeat_s=0.1).start()
    try:
        yield c
    except Exception:
        print(c.logs())
        raise
    finally:
        c.stop()
        assert not any(p.alive() for p in c.processes()), "a process outlived the cluster"
        assert all(p.popen.returncode == 0 for p in c.processes() if p.name == "offloader"), c.logs()


def new_client(cluster, job, **kw):
    # the paper's keys: these tests check the processes, and `close_enough` is the rounding
    # bound of unmixed keys (mixing keys have their own, checked in tests/test_mixing.py)
    kw.setdefault("keys", KeySchedule())
    client = OffloadClient(cluster.enclave_endpoint, job, arena_bytes=64 << 20, timeout_s=30, **kw)
    client.wait_for_relays(len([r for r in cluster.relays if r.alive()]))
    return client


def random_product(rng):
    m, n, p = (rng.choice([1, 2, 3, rng.randint(4, 48)]) for _ in range(3))
    batch = rng.choice([(), (), (), (2,)])
    dtype = rng.choice([torch.float32, torch.float32, torch.float64])
    return torch.randn(*batch, m, n, dtype=dtype), torch.randn(*batch, n, p, dtype=dtype)


def run_products(client, job, count, rng, window=16, on_progress=None):
    """`count` random products, forward then backward, `window` parts in flight; all checked."""
    inflight = []
    done = 0
    for i in range(count):
        a, b = random_product(rng)
        bind = Binding(job, i, 0, 0)
        inflight.append((bind, a, b, client.submit_forward(a, b, bind)))
        if len(inflight) >= window or i == count - 1:
            backs = []
            for bind, a, b, pending in inflight:
                c = client.finish_forward(pending)
                assert close_enough(c, a @ b, a, b)
                grad = torch.randn_like(c)
                backs.append((a, b, grad, client.submit_backward(grad, bind)))
            for a, b, grad, pending in backs:
                da, db = client.finish_backward(pending)
                assert close_enough(da, grad @ b.mT, grad, b.mT)
                assert close_enough(db, a.mT @ grad, a.mT, grad)
                done += 1
            inflight = []
            if on_progress:
                on_progress(done)
    return done


def test_thousands_of_offloaded_products_match_torch(cluster):
    with new_client(cluster, "many") as client:
        done = run_products(client, "many", 1500, random.Random(0))
        assert done == 1500
        assert client.counters.forward == 1500 and client.counters.backward == 1500
        assert client.counters.unmatched_replies == 0
        assert client.arena.bytes_in_use == 0


def test_a_relay_killed_mid_run_loses_and_duplicates_nothing(cluster):
    cluster.add_relay()
    killed = []

    def progress(done):
        if done >= 96 and not killed:
            cluster.kill_relay(0, signal.SIGKILL)
            killed.append(done)

    with new_client(cluster, "kill") as client:
        done = run_products(client, "kill", 400, random.Random(1), window=32, on_progress=progress)
        assert killed and done == 400
        assert client.counters.unmatched_replies == 0
    assert any("offloader.relay_lost" in line for line in cluster.offloader.lines)


def test_backward_after_the_cache_holder_died_is_recomputed_from_the_arena(cluster):
    with new_client(cluster, "orphan") as client:
        a, b = torch.randn(8, 5), torch.randn(5, 3)
        bind = Binding("orphan", 0, 0, 0)
        client.forward(a, b, bind)
        for i in range(len(cluster.relays)):  # whoever held it, it is gone now
            cluster.kill_relay(i, signal.SIGKILL)
        cluster.add_relay()
        client.wait_for_relays(1)
        time.sleep(1.5)  # the dead relays expire
        grad = torch.randn(8, 3)
        da, db = client.backward(grad, bind)
        assert close_enough(da, grad @ b.T, grad, b.T) and close_enough(db, a.T @ grad, a.T, grad)


def test_a_job_in_mode_asymml_is_served_and_held_to_it(cluster):
    """AsymML's unmasked products go through the real processes like masked ones; a request of
    the job in the other mode is refused with a clear error (no relay blamed, nothing retried),
    a masked job beside it is untouched, and once the job is released its name is free again."""
    from tempo.enclave.asymml import IdentityKeys

    a, b, grad = torch.randn(8, 5), torch.randn(5, 3), torch.randn(8, 3)
    with new_client(cluster, "masked-beside") as masked, new_client(cluster, "asym", keys=IdentityKeys(),
                                                                    mode="asymml") as client:
        bind = Binding("asym", 0, 0, 0)
        assert close_enough(client.forward(a, b, bind), a @ b, a, b)
        da, db = client.backward(grad, bind)
        assert close_enough(da, grad @ b.T, grad, b.T) and close_enough(db, a.T @ grad, a.T, grad)
        client.mode = "masked"  # the same job, now claiming the other mode
        with pytest.raises(OffloadError, match="refused in protection mode 'masked'") as refused:
            client.forward(a, b, Binding("asym", 1, 0, 0))
        assert refused.value.code is ErrorCode.MODE_MISMATCH and "is in protection mode 'asymml'" in str(refused.value)
        assert not client.relay_events and client.counters.timeouts == 0 and client.ping() == 2  # no one blamed
        client.mode = "asymml"
        assert close_enough(client.forward(a, b, Binding("asym", 2, 0, 0)), a @ b, a, b)  # the job goes on
        assert close_enough(masked.forward(a, b, Binding("masked-beside", 0, 0, 0)), a @ b, a, b)
        assert masked.offloader_tables()["modes"] == 2
    with new_client(cluster, "asym") as again:  # released (its mode too, off-loader and relays): free again
        deadline = time.monotonic() + 10
        while again.offloader_tables()["jobs"] and time.monotonic() < deadline:  # the release is on its way
            time.sleep(0.05)
        assert again.mode == "masked"
        assert close_enough(again.forward(a, b, Binding("asym", 0, 0, 0)), a @ b, a, b)
    assert not any("relay_quarantined" in line for line in cluster.offloader.lines)


def test_an_asymml_session_marks_its_requests_asymml():
    from tempo.session import Session

    with Session(protection="asymml", relays=1) as session:
        assert session.client.mode == "asymml"
        model = session.private(torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
        opt = session.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
        model(torch.randn(5, 6)).sum().backward()
        opt.step()
        assert session.client.counters.forward == session.client.counters.backward == 2
        session.client.mode = "masked"  # had any request gone out as masked, this one would be let through
        with pytest.raises(OffloadError) as refused:
            model(torch.randn(5, 6))
        assert refused.value.code is ErrorCode.MODE_MISMATCH


def raw(ctx, endpoint, kind=zmq.DEALER, identity=None):
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    if identity is not None:
        s.setsockopt(zmq.IDENTITY, identity)
    s.connect(endpoint)
    return s


def good_header(op, **fields):
    return msgpack.packb({"v": list(PROTOCOL_VERSION), "op": op, **fields})


HOSTILE = {
    "malformed msgpack": [b"\xc1\xc1\xc1"],
    "non-map header": [msgpack.packb("hello")],
    "unknown op": [good_header("__init__")],
    "wrong protocol version": [msgpack.packb({"v": [PROTOCOL_VERSION[0] + 1, 0], "op": "ping"})],
    "header/frame length mismatch": [good_header("result", id="x", tensors=[{"dtype": "float32", "shape": [4]}]), b"\x00" * 3],
    "disallowed dtype": [good_header("result", id="x", tensors=[{"dtype": "int8", "shape": [1]}]), b"\x00"],
    "oversize frame": [good_header("result", id="x", tensors=[{"dtype": "float32", "shape": [2**30]}]), b""],
}


def assert_still_serving(cluster, job):
    with new_client(cluster, job) as client:
        assert run_products(client, job, 20, random.Random(5)) == 20


def test_hostile_input_to_the_offloader_relay_socket(cluster):
    ctx = zmq.Context()
    try:
        s = raw(ctx, cluster.relay_endpoint)
        for name, frames in HOSTILE.items():
            s.send_multipart(frames)
            reply = decode(s.recv_multipart(), RELAY_OPS | {"error"})
            assert reply.op == "error", name
        # a relay that never said ready, and a replayed/unmatched result from one that did
        s.send_multipart(encode("result", [torch.zeros(2)], id="nope", bind=["j", 0, 0, 0]))
        assert decode(s.recv_multipart(), frozenset({"error"})).op == "error"
        s.send_multipart(encode("ready", device="fake", free_memory=0))
        s.send_multipart(encode("result", [torch.zeros(2)], id="unmatched", bind=["j", 0, 0, 0]))
        s.close()
    finally:
        ctx.term()
    assert_still_serving(cluster, "after-relay-attack")
    assert any("offloader.unmatched_reply" in line for line in cluster.offloader.lines)


def test_hostile_input_to_the_offloader_enclave_socket(cluster):
    ctx = zmq.Context()
    try:
        s = raw(ctx, cluster.enclave_endpoint)
        with arena_mod.Arena.create("hostile", 4096) as arena:
            bad_submits = {
                **{k: v[:1] for k, v in HOSTILE.items()},
                "tensor frames to the enclave socket": [good_header("ping"), b"\x00" * 8],
                "no such arena": [good_header("submit", id="a", bind=["j", 0, 0, 0], arena="tempo-none-1", kind="forward")],
                "foreign arena name": [good_header("submit", id="a", bind=["j", 0, 0, 0], arena="../../etc/passwd", kind="forward")],
                "descriptor outside the arena": [good_header(
                    "submit", id="a", bind=["j", 0, 0, 0], arena=arena.name, kind="forward",
                    inputs=[{"offset": 4000, "nbytes": 400, "dtype": "float32", "shape": [100]},
                            {"offset": 0, "nbytes": 4, "dtype": "float32", "shape": [1]}],
                    outputs=[{"offset": 0, "nbytes": 4, "dtype": "float32", "shape": [1]}])],
                "shapes that do not multiply": [good_header(
                    "submit", id="a", bind=["j", 0, 0, 0], arena=arena.name, kind="forward",
                    inputs=[{"offset": 0, "nbytes": 24, "dtype": "float32", "shape": [2, 3]},
                            {"offset": 64, "nbytes": 16, "dtype": "float32", "shape": [2, 2]}],
                    outputs=[{"offset": 128, "nbytes": 16, "dtype": "float32", "shape": [2, 2]}])],
                "bad binding": [good_header("submit", id="a", bind="x", arena=arena.name, kind="forward")],
                "unknown kind": [good_header("submit", id="a", bind=["j", 0, 0, 0], arena=arena.name, kind="sideways")],
            }
            for name, frames in bad_submits.items():
                s.send_multipart(frames)
                reply = decode(s.recv_multipart(), frozenset({"error", "pong"}))
                assert reply.op == "error", name
        s.close()
    finally:
        ctx.term()
    assert_still_serving(cluster, "after-enclave-attack")


def test_hostile_input_to_a_relay_and_replayed_results(relay_driven_by_test):
    """The test plays the off-loader for a real relay process."""
    ctx = zmq.Context()
    with relay_driven_by_test(ctx) as (router, identity, fake):

            def ask(frames):
                return ask_relay(router, identity, frames)

            hostile = {**HOSTILE, "unknown op": [good_header("result")]}
            for name, frames in hostile.items():
                assert ask(frames).op == "error", name
            bind = ["j", 0, 0, 0]
            assert ask(encode("forward", [torch.randn(2, 3)], id="x", bind=bind)).op == "error"  # one tensor
            assert ask(encode("forward", [torch.randn(2, 3), torch.randn(4, 5)], id="x", bind=bind)).op == "error"
            assert ask(encode("backward", [torch.randn(3, 2)], id="x", bind=["j", 9, 9, 9])).op == "error"  # no cache
            assert ask(encode("forward", [torch.randn(2, 3)] * 2, bind=bind)).op == "error"  # no id
            a, b = torch.randn(4, 3), torch.randn(3, 2)
            tampered = ask(encode("forward", [a, b], id="x", bind=bind, digest=digest_of([a, b * 2])))
            assert tampered.op == "error" and "digest" in tampered.header["reason"]
            reply = ask(encode("forward", [a, b], id="ok", bind=bind, digest=digest_of([a, b])))
            assert reply.op == "result" and reply.request_id == "ok" and reply.header["digest"] == digest_of([a, b])
            assert torch.allclose(reply.tensors[0], a @ b)
    ctx.destroy(linger=0)
    assert fake.relays[0].popen.returncode == 0


def test_submit_with_no_relay_fails_with_a_clear_error():
    with LocalCluster(relays=0) as cluster:
        client = OffloadClient(cluster.enclave_endpoint, "lonely", arena_bytes=1 << 20, timeout_s=1.0)
        with pytest.raises(NoHealthyRelay, match="no healthy relay"):
            client.forward(torch.randn(2, 2), torch.randn(2, 2), Binding("lonely", 0, 0, 0))
        client.close()


def test_a_client_takes_only_a_known_protection_mode():
    before = {p.name for p in arena_mod.list_segments()}
    for wrong in ("plain", "MASKED", ""):
        with pytest.raises(ValueError, match="mode must be one of masked, asymml"):
            OffloadClient("tcp://127.0.0.1:9", "badmode", arena_bytes=1 << 20, mode=wrong)
    assert {p.name for p in arena_mod.list_segments()} <= before  # refused before it made anything


def test_nothing_is_left_behind():
    before = {p.name for p in arena_mod.list_segments()}
    cluster = LocalCluster(relays=2).start()
    client = OffloadClient(cluster.enclave_endpoint, "leftover", arena_bytes=1 << 20)
    client.wait_for_relays(2)
    client.forward(torch.randn(3, 3), torch.randn(3, 3), Binding("leftover", 0, 0, 0))
    client.close()
    cluster.stop()
    after = {p.name for p in arena_mod.list_segments()}
    assert after <= before
    assert not any(p.alive() for p in cluster.processes())
    assert not os.path.exists(cluster.workdir)


def test_bench_transport_reports_and_leaves_nothing_behind():
    from click.testing import CliRunner

    from tempo.cli import main

    before = {p.name for p in arena_mod.list_segments()}
    result = CliRunner().invoke(main, ["bench", "transport", "--relays", "2", "--mb", "1", "--rounds", "3", "--json"])
    assert result.exit_code == 0, result.output
    import json

    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["gbps"] > 0 and figures["copy_gbps"] > 0 and figures["relays"] == 2
    assert {p.name for p in arena_mod.list_segments()} <= before


def test_relay_on_cuda_without_a_gpu_fails_cleanly():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA test below covers it")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "tempo", "relay", "--device", "cuda"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_relays_compute_offloaded_products():
    with LocalCluster(relays=2, device="cuda", heartbeat_timeout_s=5.0) as cluster:
        with new_client(cluster, "cuda") as client:
            assert run_products(client, "cuda", 300, random.Random(3)) == 300


def test_a_relay_keeps_its_heartbeat_while_it_computes(monkeypatch):
    """Alive means alive, not 'the last product finished in time': a relay busy with one part
    (here a slow fault: 30 s) still beats; the part timeout, not the heartbeat, judges slowness."""
    monkeypatch.setenv("TEMPO_FAULT_SLOW_S", "30")
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    cluster = LocalCluster(relays=0, heartbeat_s=0.2)
    cluster.relay_endpoint = f"tcp://127.0.0.1:{port}"
    try:
        cluster.add_relay(fault="slow")
        identity, *frames = router.recv_multipart()
        assert decode(frames, RELAY_OPS).op == "ready"
        a, b = torch.randn(3, 4), torch.randn(4, 2)
        router.send_multipart([identity, *encode("forward", [a, b], id="busy", bind=["j", 0, 0, 0])])
        beats, start = 0, time.monotonic()
        while time.monotonic() - start < 2.0:
            if router.poll(100):
                _, *reply = router.recv_multipart()
                msg = decode(reply, RELAY_OPS)
                assert msg.op == "heartbeat", msg.op  # the result is 30 s away
                beats += 1
        assert beats >= 5
    finally:
        cluster.stop(timeout_s=5.0)
        ctx.destroy(linger=0)
