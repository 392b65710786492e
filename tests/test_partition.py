"""Partitioning a product across relays: the parts reassemble the product and its gradients."""

import pytest
import torch
from conftest import ask_relay
from hypothesis import given, settings
from hypothesis import strategies as st

from tempo.core import partition


@st.composite
def products(draw):
    """Linear (2-D × 2-D), conv (W 2-D × batched patches), grouped conv (W g×m×n × patches
    batch×g×n×p: two batch dimensions, the weight broadcast along the first), attention
    (4-D × 4-D), broadcast."""
    m, n, p = (draw(st.integers(1, 7)) for _ in range(3))
    kind = draw(st.sampled_from(["linear", "conv", "grouped", "attention", "broadcast"]))
    if kind == "linear":
        return (m, n), (n, p)
    bsz = draw(st.integers(1, 6))
    if kind == "conv":
        return (m, n), (bsz, n, p)
    if kind == "grouped":
        groups = draw(st.integers(1, 4))
        return (groups, m, n), (bsz, groups, n, p)
    if kind == "attention":
        heads = draw(st.integers(1, 3))
        return (bsz, heads, m, n), (bsz, heads, n, p)
    return (1, m, n), (bsz, n, p)


@settings(max_examples=300, deadline=None)
@given(products(), st.integers(1, 5), st.sampled_from([torch.float32, torch.float64]))
def test_parts_reassemble_the_product_and_its_gradients(shapes, parts, dtype):
    a_shape, b_shape = shapes
    a = torch.randn(a_shape, dtype=dtype, requires_grad=True)
    b = torch.randn(b_shape, dtype=dtype, requires_grad=True)
    plan = partition.plan(a.shape, b.shape, parts)
    assert 1 <= plan.parts <= parts
    pieces = partition.split(a.detach(), b.detach(), plan)
    assert len(pieces) == plan.parts
    c = partition.gather_c([ai @ bi for ai, bi in pieces], plan)
    full = a @ b
    assert c.shape == full.shape
    torch.testing.assert_close(c, full.detach())

    grad = torch.randn(full.shape, dtype=dtype)
    full.backward(grad)
    grads = []
    for (ai, bi), gi in zip(pieces, partition.split_grad(grad, plan)):
        # what a relay computes for one part: dA_i = Δ_i B_iᵀ, dB_i = A_iᵀ Δ_i, each summed to
        # its operand's shape
        grads.append(((gi @ bi.mT).sum_to_size(ai.shape), (ai.mT @ gi).sum_to_size(bi.shape)))
    da, db = partition.gather_grads(grads, plan, a.shape, b.shape)
    torch.testing.assert_close(da, a.grad)  # already in the operands' shapes
    torch.testing.assert_close(db, b.grad)


def test_the_split_follows_the_layer_kind():
    conv = partition.plan((16, 27), (64, 27, 1024), 2)  # W @ patches: by data
    assert conv.axis == "batch" and conv.bounds == ((0, 32), (32, 64))
    linear = partition.plan((64, 512), (512, 10), 3)  # x @ Wᵀ: by output features
    assert linear.axis == "cols" and linear.bounds == ((0, 4), (4, 7), (7, 10))
    attention = partition.plan((8, 4, 65, 16), (8, 4, 16, 65), 4)
    assert attention.axis == "batch" and attention.parts == 4
    rows = partition.plan((4096, 144), (144, 32), 2)  # patches of the whole batch @ Wᵀ: by patch rows
    assert rows.axis == "rows" and rows.bounds == ((0, 2048), (2048, 4096))
    assert partition.plan((64, 512), (512, 10), 1).axis == "none"
    assert partition.plan((5, 3), (3, 1), 4).axis == "none"  # nothing to split
    assert partition.plan((2, 5, 3), (2, 3, 4), 8).parts == 2  # no more parts than slices


def test_a_grouped_convolution_is_split_by_data_with_its_weight_whole_in_every_part():
    """``W (g × out/g × K) @ patches (batch × g × K × L)``: cut along the batch (not the groups),
    the weight sent whole to each part, its gradient the sum of the parts' (each already summed
    over its part's batch by the relay, as `protocol.relay_backward` does)."""
    from tempo.core.products import relay_backward

    torch.manual_seed(0)
    g, o, k, n, L = 4, 3, 18, 5, 7
    w = torch.randn(g, o, k, dtype=torch.float64, requires_grad=True)
    x = torch.randn(n, g, k, L, dtype=torch.float64, requires_grad=True)
    plan = partition.plan(w.shape, x.shape, 2)
    assert plan.axis == "batch" and plan.batch_dims == 2 and plan.bounds == ((0, 3), (3, 5))
    pieces = partition.split(w.detach(), x.detach(), plan)
    assert all(wi.shape == w.shape for wi, _ in pieces)
    assert [xi.shape[0] for _, xi in pieces] == [3, 2]
    # the shapes-only split that the pipeline's look-ahead does (meta operands) cuts the same way
    meta = partition.split(torch.empty(w.shape, device="meta"), torch.empty(x.shape, device="meta"), plan)
    assert [(wi.shape, xi.shape) for wi, xi in meta] == [(wi.shape, xi.shape) for wi, xi in pieces]
    c = partition.gather_c([wi @ xi for wi, xi in pieces], plan)
    full = w @ x
    torch.testing.assert_close(c, full.detach())
    grad = torch.randn(full.shape, dtype=torch.float64)
    full.backward(grad)
    parts = []
    for (wi, xi), gi in zip(pieces, partition.split_grad(grad, plan)):
        t1t, t2t = relay_backward(wi, xi, gi)  # unmasked stand-ins: the same shapes and sums
        assert t1t.shape == w.shape and t2t.shape == xi.shape
        parts.append((t1t, t2t))
    dw, dx = partition.gather_grads(parts, plan, tuple(w.shape), tuple(x.shape))
    assert dw.shape == (g, o, k)
    torch.testing.assert_close(dw, w.grad)
    torch.testing.assert_close(dx, x.grad)


def test_split_returns_views_not_copies():
    a, b = torch.randn(64, 512), torch.randn(512, 10)
    for ai, bi in partition.split(a, b, partition.plan(a.shape, b.shape, 2)):
        assert ai.data_ptr() == a.data_ptr()
        assert bi.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_bad_part_counts_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        partition.plan((2, 2), (2, 2), 0)
    with pytest.raises(ValueError, match="matrices"):
        partition.plan((2,), (2, 2), 2)


@pytest.fixture(scope="module")
def engine():
    """A real off-loader and 2 relays; products split in two, pipelined, weights masked ahead."""
    from tempo.cluster import LocalCluster
    from tempo.enclave.client import OffloadClient, default_job_id
    from tempo.enclave.private import ClientEngine

    with LocalCluster(relays=2) as cluster:
        client = OffloadClient(cluster.enclave_endpoint, default_job_id(), arena_bytes=64 << 20)
        client.wait_for_relays(2)
        yield ClientEngine(client, parts=2, pipeline=True, split_min_mb=0.0)
        client.close()


def test_weights_masked_ahead_are_used_only_while_they_are_current(engine):
    from tempo.enclave.private import PrivateContext, to_private

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6),
                              torch.nn.ReLU(), torch.nn.Linear(6, 4))
    pctx = PrivateContext(engine, job=engine.client.job)
    private = to_private(net, pctx, keep=())
    x = torch.randn(10, 12)
    used0 = engine.prefetch_used
    with torch.no_grad():
        for _ in range(2):  # the first pass shows the layers; the second masks ahead
            torch.testing.assert_close(private(x), net(x), rtol=1e-4, atol=1e-4)
            pctx.end_step()
        assert engine.prefetch_used == used0 + 2  # layers 1 and 2, masked during layers 0 and 1
        # weights changed between the look-ahead and their product: the look-ahead is dropped
        dropped0 = engine.client.counters.premasks_dropped
        _ = private[0](x)  # layer 0 runs and masks layer 1's weights ahead
        net[2].weight.mul_(2.0)
        h = private[1](_)
        torch.testing.assert_close(private[2](h), net[2](net[1](net[0](x))), rtol=1e-4, atol=1e-4)
        assert engine.client.counters.premasks_dropped == dropped0 + 2  # both parts of layer 1
        pctx.end_step()
        # another batch size: masked-ahead weights do not fit and are dropped, results stay right
        x3 = torch.randn(3, 12)
        torch.testing.assert_close(private(x3), net(x3), rtol=1e-4, atol=1e-4)
        pctx.end_step()


def test_weights_masked_ahead_are_shipped_to_their_relay_ahead(engine):
    """With the pipeline on, the next layer's masked weights travel before their forward, which
    then carries the activations only; results stay exact."""
    from tempo.enclave.private import PrivateContext, to_private

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6))
    pctx = PrivateContext(engine, job=engine.client.job)
    private = to_private(net, pctx, keep=())
    x = torch.randn(10, 12)
    before = engine.client.counters.staged_forwards
    for _ in range(3):
        y = private(x)
        loss = y.square().sum()
        loss.backward()  # backward of a staged forward: the relay cached both operands
        pctx.end_step()
    assert engine.client.counters.staged_forwards >= before + 2 * 2  # layer 1, 2 parts, steps 2 and 3
    with torch.no_grad():
        torch.testing.assert_close(private(x), net(x), rtol=1e-4, atol=1e-4)
        pctx.end_step()


def test_a_relay_refuses_a_staged_forward_it_holds_nothing_for(relay_driven_by_test):
    import zmq

    from tempo.protocol import encode

    ctx = zmq.Context()
    with relay_driven_by_test(ctx) as (router, identity, _):

        def ask(frames):
            return ask_relay(router, identity, frames)

        a, b = torch.randn(3, 4), torch.randn(4, 2)
        missing = ask(encode("forward", [b], id="f1", bind=["j", 0, 1, 0], staged="a"))
        assert missing.op == "error" and "no staged operand" in missing.header["reason"]
        router.send_multipart([identity, *encode("stage", [a], bind=["j", 0, 1, 0], slot="a")])
        done = ask(encode("forward", [b], id="f2", bind=["j", 0, 1, 0], staged="a"))
        assert done.op == "result"
        torch.testing.assert_close(done.tensors[0], a @ b)
        again = ask(encode("forward", [b], id="f3", bind=["j", 0, 1, 0], staged="a"))  # given up with f2
        assert again.op == "error"
    ctx.term()


def test_patch_rows_split_by_rows_reassemble_the_product_and_both_gradients():
    """``patches (m × K) @ Wᵀ (K × p)`` cut along m: C and dA concatenated, dB summed."""
    from tempo.core.products import relay_backward

    torch.manual_seed(1)
    a = torch.randn(700, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    plan = partition.plan(a.shape, b.shape, 3)
    assert plan.axis == "rows" and plan.parts == 3
    parts = partition.split(a.detach(), b.detach(), plan)
    c = partition.gather_c([x @ y for x, y in parts], plan)
    want = a @ b
    assert torch.allclose(c, want.detach())
    grad = torch.randn_like(want)
    want.backward(grad)
    grads = [relay_backward(x, y, g) for (x, y), g in zip(parts, partition.split_grad(grad, plan))]
    da, db = partition.gather_grads(grads, plan, a.shape, b.shape)
    assert torch.allclose(da, a.grad) and torch.allclose(db, b.grad)
