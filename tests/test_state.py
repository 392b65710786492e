"""The off-loader's, the relays' and the enclave client's state holds what is in flight, not what
a job has done: it must not grow with the steps of a job (real processes, real sockets)."""

import torch
import torch.nn.functional as F
import zmq
from conftest import ask_relay
from torch import nn

from tempo.cluster import LocalCluster
from tempo.enclave.client import OffloadClient
from tempo.enclave.private import ClientEngine, PrivateContext, to_private
from tempo.protocol import Binding, encode, inputs_digest


def client_tables(client):
    """The sizes of the enclave client's own tables."""
    return {"forwards": len(client._forwards), "pending": len(client._pending), "replies": len(client._replies),
            "pings": len(client._pings)}


def test_a_long_job_holds_only_what_is_in_flight():
    """400 training steps of a private MLP over 2 relays, weights shipped ahead, and an
    evaluation every 10 steps (forwards with no backward): the tables are the same at step 40
    and at step 400, and hold nothing between steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    seen = {}
    with LocalCluster(relays=2, heartbeat_timeout_s=3.0) as cluster, \
            OffloadClient(cluster.enclave_endpoint, "long", arena_bytes=4 << 20) as client:
        client.wait_for_relays(2)
        engine = ClientEngine(client)
        pctx = PrivateContext(engine, job="long")
        private = to_private(model, pctx, keep=())
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(1, 401):
            x, y = torch.randn(4, 8), torch.randint(0, 4, (4,))
            loss = F.cross_entropy(private(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            pctx.end_step()
            if step % 10 == 0:
                with torch.no_grad():
                    private(torch.randn(3, 8))  # evaluation: each product released as it is made
                pctx.end_step()
                private(torch.randn(2, 8))  # a graph with no backward: released by end_step
                pctx.end_step()
            if step in (40, 400):
                seen[step] = (client.offloader_tables(), client_tables(client))
        assert engine.prefetch_used > 0 and client.counters.staged_forwards > 0  # weights did go ahead
        assert client.counters.premasks_dropped > 0  # and some were dropped (the evaluation's shapes)
    assert seen[40] == seen[400], seen
    tables, own = seen[400]
    assert {k: tables[k] for k in ("parts", "waiting", "affinity", "staged", "quarantined")} == dict.fromkeys(
        ("parts", "waiting", "affinity", "staged", "quarantined"), 0), tables
    assert tables["arenas"] == tables["jobs"] == tables["arena_owners"] == 1 and tables["relays"] == 2
    assert own == dict.fromkeys(own, 0)


def test_an_operand_shipped_ahead_and_dropped_leaves_no_trace():
    """`drop_premasked` releases the binding: the off-loader forgets the staged operand."""
    with LocalCluster(relays=2) as cluster, \
            OffloadClient(cluster.enclave_endpoint, "drop", arena_bytes=1 << 20) as client:
        client.wait_for_relays(2)
        bind = Binding("drop", 0, 0, 0)
        pre = client.premask(bind, "b", torch.randn(4, 2), (3, 4, 2))
        assert client.offloader_tables()["staged"] == 1
        client.drop_premasked(pre)
        assert client.offloader_tables()["staged"] == 0
        a, b = torch.randn(3, 4), torch.randn(4, 2)  # the binding is still free to use
        assert torch.allclose(client.forward(a, b, bind), a @ b, atol=1e-5)
        client.release(bind)
        assert client.offloader_tables()["affinity"] == 0 and client.arena.bytes_in_use == 0


def test_releasing_a_binding_drops_its_staged_operand_on_the_relay(relay_driven_by_test):
    ctx = zmq.Context()
    try:
        with relay_driven_by_test(ctx) as (router, identity, _):
            bind = ["j", 0, 0, 0]
            a, b = torch.randn(3, 4), torch.randn(4, 2)
            digest_a = inputs_digest([a.numpy().tobytes()])
            staged = encode("stage", [b], bind=bind, slot="b")
            use = encode("forward", [a], id="x", bind=bind, staged="b", digest=digest_a)
            router.send_multipart([identity, *staged])
            reply = ask_relay(router, identity, use)  # held: used
            assert reply.op == "result" and torch.allclose(reply.tensors[0], a @ b, atol=1e-6)
            router.send_multipart([identity, *staged])
            router.send_multipart([identity, *encode("release", bind=bind)])
            reply = ask_relay(router, identity, use)  # released: gone
            assert reply.op == "error" and "no staged operand" in reply.header["reason"]
    finally:
        ctx.destroy(linger=0)


