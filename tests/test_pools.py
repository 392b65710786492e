"""The shares mode (tempo.core.shares, tempo.enclave.pools, tempo.protocol.sealed): products
rebuilt exactly over the ring, forward and backward, linear and conv, fp32 and fp64 callers;
each pool's view independent of the data; a lying pool member caught; sealed blobs that open
only for their pool, binding and direction; the off-loader's routing invariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tempo.core import im2col
from tempo.core import shares as sh
from tempo.enclave.pools import LocalPools, SharesEngine
from tempo.enclave.private import PrivateContext, to_private
from tempo.core.verify import IntegrityError
from tempo.protocol import Binding, ProtocolError, sealed

SHAPES = [((8, 12), (12, 5)),  # a linear layer
          ((3, 8, 12), (12, 5)),  # batched A, shared B
          ((8, 12), (3, 12, 5)),  # shared A (a conv's weight over images), batched B
          ((2, 3, 8, 12), (3, 12, 5))]


def _answers(op, backward=False):
    return {r: sh.pool_answer(op.requests[r], op.grad_requests[r] if backward else None) for r in sh.ROLES}


def _bound(x, sx, y, sy):
    """|decode(enc x · enc y) − x·y| for encodings each off by at most half a unit of its scale."""
    hx, hy = 2.0 ** -(sx + 1), 2.0 ** -(sy + 1)
    n = x.shape[-1]
    return (hy * x.double().abs().sum(-1, keepdim=True) + hx * y.double().abs().sum(-2, keepdim=True)
            + n * hx * hy + 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("a_shape,b_shape", SHAPES)
def test_the_pools_answers_sum_to_the_product_exactly_forward_and_backward(dtype, a_shape, b_shape):
    torch.manual_seed(0)
    a, b = torch.randn(a_shape, dtype=dtype) * 3, torch.randn(b_shape, dtype=dtype)
    op = sh.open_forward(a, b)
    fwd = _answers(op)
    total = fwd[1][0] + fwd[2][0] + fwd[3][0]
    assert torch.equal(total, torch.matmul(op.enc_a, op.enc_b))  # exact, in the ring
    c = sh.combine_forward(op, fwd)
    assert c.dtype == dtype
    assert bool(((c.double() - a.double() @ b.double()).abs()
                 <= _bound(a, op.scale_a, b, op.scale_b) + 4 * torch.finfo(dtype).eps * (a.abs() @ b.abs())).all())
    grad = torch.randn(c.shape, dtype=dtype) * 1e-4  # gradients are small: the scale follows them
    sh.open_backward(op, grad)
    back = _answers(op, backward=True)
    da_ring = sum(back[r][0] for r in sh.ROLES)
    assert torch.equal(da_ring, sh.sum_to(torch.matmul(op.enc_d, op.enc_b.mT), op.a_shape))
    da, db = sh.combine_backward(op, back)
    want_da = sh.sum_to(grad.double() @ b.double().mT, a_shape)
    want_db = sh.sum_to(a.double().mT @ grad.double(), b_shape)
    assert da.shape == a.shape and db.shape == b.shape and da.dtype == dtype
    assert torch.allclose(da.double(), want_da, rtol=1e-5, atol=1e-6 * float(want_da.abs().max()))
    assert torch.allclose(db.double(), want_db, rtol=1e-5, atol=1e-6 * float(want_db.abs().max()))


def test_linear_and_conv_layers_through_local_pools_match_autograd():
    torch.manual_seed(1)
    for patch_rows in (True, False):
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        ref = [p.detach().clone().requires_grad_() for p in model.parameters()]
        x, y = torch.randn(5, 2, 6, 6), torch.tensor([0, 1, 2, 0, 1])
        engine = SharesEngine(LocalPools())
        net = to_private(model, PrivateContext(engine, patch_rows=patch_rows), keep=())
        F.cross_entropy(net(x), y).backward()
        h = F.relu(F.conv2d(x, ref[0], ref[1], padding=1)).flatten(1)
        F.cross_entropy(F.linear(h, ref[2], ref[3]), y).backward()
        for p, r in zip(model.parameters(), ref):
            assert torch.allclose(p.grad, r.grad, rtol=1e-4, atol=1e-6), patch_rows
        assert engine.counters.forward_products == 2 and engine.counters.backward_products == 2


CONVS = [(3, 3, 1, 1, 1, 1, 1, 1),  # ResNet's 3×3
         (3, 3, 1, 1, 1, 1, 2, 2),  # strided
         (1, 1, 1, 1, 0, 0, 2, 2),  # a 1×1 shortcut
         (3, 2, 2, 1, 2, 0, 1, 3)]  # dilated, unequal padding and stride


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("conv", CONVS)
def test_a_convolution_whose_pools_unfold_their_shares_is_exact_forward_and_backward(conv, dtype):
    """The pools get the images' shares, not the patch rows: the ring sums equal the patch-row
    product and its gradients (folded) exactly; decoded, they match F.conv2d and autograd."""
    torch.manual_seed(3)
    kh, kw, dh, dw, ph, pw, sh_, sw = conv
    x = torch.randn(2, 3, 9, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 3, kh, kw, dtype=dtype, requires_grad=True)
    op = sh.open_forward(x.detach(), w.detach().reshape(4, -1).t(), conv=conv)
    assert tuple(op.requests[1][1][0].shape) == (2, 3, 9, 8)  # what travels: image-sized
    fwd = _answers(op)
    rows = im2col.patch_rows(op.enc_a, conv)
    assert torch.equal(fwd[1][0] + fwd[2][0] + fwd[3][0], rows @ op.enc_b)
    c = sh.combine_forward(op, fwd)
    y = F.conv2d(x, w, dilation=(dh, dw), padding=(ph, pw), stride=(sh_, sw))
    want = y.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    assert c.dtype == dtype and torch.allclose(c, want, rtol=1e-4, atol=1e-4)
    grad = torch.randn(y.shape, dtype=dtype) * 1e-3
    sh.open_backward(op, grad.permute(0, 2, 3, 1).reshape(-1, 4))
    back = _answers(op, backward=True)
    d_ring = op.enc_d
    assert torch.equal(sum(back[r][0] for r in sh.ROLES), im2col.fold_rows(d_ring @ op.enc_b.mT, op.x_shape, conv))
    assert torch.equal(sum(back[r][1] for r in sh.ROLES), rows.mT @ d_ring)
    dx, dwr = sh.combine_backward(op, back)
    y.backward(grad)
    assert dx.shape == x.shape and torch.allclose(dx, x.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(dwr.t().reshape(w.shape), w.grad, rtol=1e-4, atol=1e-6)
    # any change to any answer, forward or backward, fails the exact check; blame finds the pool
    for role in sh.ROLES:
        for i, delta in ((0, 1), (0, -(1 << 63)), (1, 1 << 30)):
            bad = dict(back)
            t = back[role][i].clone(memory_format=torch.contiguous_format)
            t.view(-1)[5] += delta
            bad[role] = tuple(t if j == i else back[role][j] for j in range(2))
            assert sh.combine_backward(op, bad, rounds=64) is None
            assert not sh.honest_answer_check(op, role, bad[role], True)
        t = fwd[role][0].clone()
        t.view(-1)[-1] -= 7
        assert sh.combine_forward(op, {**fwd, role: (t,)}, rounds=64) is None
        assert sh.honest_answer_check(op, role, back[role], True) and sh.honest_answer_check(op, role, fwd[role], False)


def test_a_convolutions_product_is_refused_when_its_shapes_do_not_agree():
    with pytest.raises(ValueError, match="convolution"):
        sh.open_forward(torch.ones(2, 3, 5, 5), torch.ones(26, 4), conv=(3, 3, 1, 1, 1, 1, 1, 1))
    with pytest.raises(ValueError):
        sh.open_forward(torch.ones(2, 3, 5, 5), torch.ones(27, 4), conv=(3, 3, 1, 1, 1, 1, 0, 1))


def _bit_means(t: torch.Tensor) -> np.ndarray:
    raw = t.contiguous().numpy().view(np.uint64).ravel()
    return np.array([((raw >> np.uint64(k)) & np.uint64(1)).mean() for k in (0, 13, 31, 47, 62, 63)])


def test_each_pools_requests_look_the_same_whatever_the_data():
    """What each pool receives, forward and backward, for all-zero data and for large positive
    data (fixed seeds): every bit position's mean within 4.5 standard errors of 1/2 in every
    tensor, and the header fields equal but for the seeds. The plaintext encodings fail it."""
    views = {}
    for name, value in (("zeros", 0.0), ("large", 100.0)):
        a, b = torch.full((64, 48), value), torch.full((48, 32), value / 2)
        op = sh.open_forward(a, b, seeds=(bytes(16), bytes([1]) * 16))
        sh.open_backward(op, torch.full((64, 32), value / 10), seeds=(bytes([2]) * 16, bytes([3]) * 16))
        views[name] = (op.requests, op.grad_requests)
        for requests in views[name]:
            for role, (header, tensors) in requests.items():
                for t in tensors:
                    se = 0.5 / np.sqrt(t.numel())
                    assert (np.abs(_bit_means(t) - 0.5) < 4.5 * se).all(), (name, role)
        if value:
            assert np.abs(_bit_means(op.enc_a) - 0.5).max() > 0.4  # the data itself is told apart
    for i in range(2):
        for role in sh.ROLES:
            (h0, _), (h1, _) = views["zeros"][i][role], views["large"][i][role]
            assert {k: v for k, v in h0.items() if k != "seeds"} == {k: v for k, v in h1.items() if k != "seeds"}


def test_a_pool_alone_holds_no_share_of_what_it_lacks_and_two_pools_hold_everything():
    """Pool 1's seed expands to U₁ only: E + U₁ is still uniform (not A); adding pool 2's U₂
    (a collusion) gives A exactly."""
    a, b = torch.full((16, 8), 3.0), torch.full((8, 4), 2.0)
    op = sh.open_forward(a, b)
    (h1, (e, f)), (h2, _) = op.requests[1], op.requests[2]
    u1, _ = sh._expand(h1["seeds"][0], h1["a"], h1["b"])
    u2, _ = sh._expand(h2["seeds"][0], h2["a"], h2["b"])
    assert not torch.equal(e + u1, op.enc_a)
    assert torch.equal(e + u1 + u2, op.enc_a)


def _liar(forward, backward=None):
    out = sh.pool_answer(forward, backward)
    out[0].view(-1)[0] += 1
    return out


def test_a_lying_pool_member_is_caught_and_its_part_recomputed_by_another_of_its_pool():
    torch.manual_seed(2)
    pools = LocalPools({1: [sh.pool_answer], 2: [_liar, sh.pool_answer], 3: [sh.pool_answer]})
    engine = SharesEngine(pools)
    a, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    bind = Binding("j", 0, 0, 0)
    assert torch.allclose(engine.forward(a, b, bind), a @ b, atol=1e-6)
    assert pools.quarantined and pools.quarantined[0][0] == 2 and engine.shares.blamed == {2: 1}
    only_liars = SharesEngine(LocalPools({1: [sh.pool_answer], 2: [sh.pool_answer], 3: [_liar]}))
    with pytest.raises(IntegrityError, match="pool 3"):
        only_liars.forward(a, b, bind)


def test_any_change_to_an_answer_fails_the_exact_check():
    a, b = torch.randn(7, 9), torch.randn(9, 5)
    op = sh.open_forward(a, b)
    answers = _answers(op)
    for role in sh.ROLES:
        for delta in (1, -1, 1 << 40, -(1 << 63)):
            bad = dict(answers)
            t = answers[role][0].clone()
            t.view(-1)[3] += delta
            bad[role] = (t,)
            assert sh.combine_forward(op, bad, rounds=64) is None
            assert not sh.honest_answer_check(op, role, (t,), False, rounds=64)
        assert sh.honest_answer_check(op, role, answers[role], False)


def test_products_that_would_overflow_the_ring_are_refused():
    with pytest.raises(sh.RingOverflow):
        sh.open_forward(torch.ones(2, sh.MAX_INNER + 1), torch.ones(sh.MAX_INNER + 1, 1))
    from tempo.core.verify import NonFiniteError

    with pytest.raises(NonFiniteError):  # a diverged model, not an overflow: nothing leaves
        sh.open_forward(torch.tensor([[float("inf")]]), torch.ones(1, 1))


def test_sealed_blobs_open_only_for_their_pool_binding_and_direction():
    """A head (under the pool's key) and its bulk tensors (under the bulk key it carries), as
    `RelayPools` seals them and a relay opens them; and an answer."""
    k1, k2 = sealed.new_key(), sealed.new_key()
    bind = Binding("j", 1, 2, 0)
    header, tensors = {"role": 1, "seeds": [bytes(16)], "a": [2, 3], "b": [3, 1]}, (torch.arange(6).reshape(2, 3),)
    blob = sealed.seal_head(k1, sealed.associated("p1", bind, "request-forward"), header)
    bulk = sealed.seal(k2, sealed.associated("bulk", bind, "request-forward"), tensors)
    got_header = sealed.open_head(k1, sealed.associated("p1", bind, "request-forward"), blob)
    got = sealed.open_tensors(k2, sealed.associated("bulk", bind, "request-forward"), bulk, [(2, 3)])
    assert got_header == header and torch.equal(got[0], tensors[0])
    for key, aad in ((k2, sealed.associated("p1", bind, "request-forward")),  # another pool's key
                     (k1, sealed.associated("p2", bind, "request-forward")),  # another pool's name
                     (k1, sealed.associated("p1", Binding("j", 1, 2, 1), "request-forward")),  # another part
                     (k1, sealed.associated("p1", bind, "request-backward"))):  # another direction
        with pytest.raises(ProtocolError, match="does not open"):
            sealed.open_head(key, aad, blob)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(ProtocolError):
        sealed.open_head(k1, sealed.associated("p1", bind, "request-forward"), bytes(tampered))
    answer = sealed.seal(k1, b"x", [torch.ones(2, 2, dtype=torch.int64)])
    assert len(answer) == sealed.answer_nbytes([(2, 2)])
    assert torch.equal(sealed.open_tensors(k1, b"x", answer, [(2, 2)])[0], torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ProtocolError, match="size"):
        sealed.open_tensors(k1, b"x", answer, [(2, 3)])

def test_every_dispatch_path_of_the_off_loader_keeps_a_pools_parts_on_its_relays():
    """The routing invariant, on the off-loader's own tables: fresh parts, parts waiting for room,
    re-dispatch after a relay is lost or quarantined, backward affinity and staged operands:
    a sealed part of pool P goes only to a relay of P, and nothing else goes to a pool relay."""
    from tempo.offloader.core import OffloaderCore, Part, RelayState

    off = OffloaderCore(max_inflight=2)
    for name, pool in (("a1", "p1"), ("a2", "p1"), ("b1", "p2"), ("c1", "p3"), ("m1", None), ("m2", None)):
        off.relays[name.encode()] = RelayState(name.encode(), "cpu", 0, 1e18, pool=pool)

    class FakeArena:
        size = 1 << 20

        def tensor(self, d):
            return torch.zeros(d.shape, dtype=torch.uint8 if d.dtype == "uint8" else torch.float32)

        def buffer(self, d):
            return memoryview(bytes(d.nbytes))

    from tempo.protocol import Descriptor

    blob, out = Descriptor(0, 64, "uint8", (64,)), Descriptor(64, 92, "uint8", (92,))
    a, b, c = Descriptor(0, 24, "float32", (2, 3)), Descriptor(24, 12, "float32", (3, 1)), Descriptor(36, 8, "float32", (2, 1))
    parts = []
    for i in range(30):
        pool = ("p1", "p2", "p3")[i % 3]
        bind = Binding("j", i, 0, 0)
        parts.append(Part(b"enc", f"s{i}", "sealed", bind, FakeArena(), [blob], [], [out], pool=pool))
        parts.append(Part(b"enc", f"f{i}", "forward", bind, FakeArena(), [a, b], [], [c]))
    for p in parts:
        off._dispatch(p)
    off._remove_relay(b"a1")  # lost: its parts go elsewhere
    off._remove_relay(b"m1", quarantine_reason="lied")
    off._remove_relay(b"c1")  # pool 3 is empty now: its parts wait
    while off.parts:  # answers free room: waiting parts go out, each to a relay of its own kind
        for p in list(off.parts.values()):
            off._take(p)
    pools = {r.identity: r.pool for r in off.relays.values()} | {b"a1": "p1", b"m1": None, b"c1": "p3"}
    for part in parts:
        if part.relay is not None:
            assert pools[part.relay] == part.pool, (part.kind, part.pool, part.relay)
    # everything has been computed but pool 3's parts, which wait for a relay of pool 3
    assert off.waiting and all(p.pool == "p3" for p in off.waiting)
    routed = [a.frames for a in off.outbox if a.to == "relay" and b"sealed" in bytes(a.frames[0])]
    assert routed  # sealed ops went out


# -- real processes: the off-loader, pool relays, the engine through the arena --

def test_through_real_pools_every_fault_is_survived_and_no_relay_sees_another_pools_part(tmp_path):
    """Three pools of relay processes, recording; pool 1 has a member that lies in the ring
    (caught by the enclave's exact check), pool 2 one that crashes (lost: re-dispatched), pool 3
    one that answers malformed (quarantined by the off-loader). Every product comes back right,
    and each relay recorded only its own pool's requests. (A silent relay's part timeout is the
    same path as the masking's: tests/test_faults.py.)"""
    from tempo.cluster import LocalCluster
    from tempo.enclave.client import OffloadClient, default_job_id
    from tempo.enclave.pools import POOL_NAMES, RelayPools

    record = tmp_path / "rec"
    with LocalCluster(relays=0, pools={}, record_dir=str(record)) as cl:
        job = default_job_id()
        # a part's timeout well above the heartbeats' (3 s): the crashed member is lost by its
        # silence, not quarantined by a timeout that a loaded machine can win the race for
        client = OffloadClient(cl.enclave_endpoint, job, part_timeout_s=10.0, max_attempts=5)
        client.watchdog = cl.check
        # the misbehaving members join before the honest ones: on a tie the off-loader picks
        # the relay that joined first, so every fault meets a part
        for members in ((("p1", "corrupt"), ("p2", "crash"), ("p3", "malformed")), (("p1", None), ("p2", None), ("p3", None))):
            for pool, fault in members:
                cl.add_pool_relay(pool, fault=fault)
            while sum(client.pools().values()) < len(cl.relays):
                cl.check()
        engine = SharesEngine(RelayPools(client, {r: (n, cl.pool_keys[n]) for r, n in zip(sh.ROLES, POOL_NAMES)}),
                              max_attempts=5)
        torch.manual_seed(3)
        for step in range(4):
            a, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
            bind = Binding(job, step, 0, 0)
            assert torch.allclose(engine.forward(a, b, bind), a @ b, atol=1e-6)
            g = torch.randn(5, 3, dtype=torch.float64)
            da, db = engine.backward(g, bind)
            assert torch.allclose(da, g @ b.T, atol=1e-6) and torch.allclose(db, a.T @ g, atol=1e-6)
        events = {(e["relay"].split("-")[0], e["event"]) for e in client.relay_events}
        engine.close()
    assert ("p1", "quarantined") in events and ("p2", "lost") in events and ("p3", "quarantined") in events
    assert engine.shares.blamed.get(1, 0) >= 1
    # what the audit reads of a pool's recording: uniform ring elements, nothing of the data
    from tempo.audit.view import pools_view, shares_records

    view, what = pools_view(shares_records(record, job=job), ("p1",), {"p1": 1, "p2": 2, "p3": 3})
    assert view.products and "uniform" in what
    assert all(float(p.a.abs().max()) > 2.0**56 for p in view.products)  # ring-wide values, not encodings (< 2^28)
    seen = {}
    for path in record.glob("*/*.pt"):
        rec = torch.load(path, weights_only=False)
        assert rec["op"] == "sealed"
        seen.setdefault(path.parent.name.split("-")[0], set()).add(rec["pool"])
    assert seen and all(pools == {name} for name, pools in seen.items()), seen


def test_tempo_train_shares_matches_plain_accuracy_on_the_digits_mlp(tmp_path):
    from tempo.train import TrainConfig, run

    common = dict(model="mlp", epochs=1, val_fraction=0.0, checkpoint_every=0)
    plain = run(TrainConfig(mode="plain", out=str(tmp_path / "plain"), **common))
    shared = run(TrainConfig(protection="shares", relays=1, out=str(tmp_path / "shares"), **common))
    assert abs(shared.test_accuracy - plain.test_accuracy) <= 0.005
    assert shared.offload["protection"] == "shares" and shared.offload["failed_sums"] == 0
    assert sorted(r.split("-")[0] for r in shared.offload["parts_by_relay"]) == ["p1", "p2", "p3"]


def test_fewer_pools_than_the_mode_needs_is_a_clear_error_at_start():
    from tempo.enclave.client import OffloadClient, OffloadError
    from tempo.enclave.pools import RelayPools

    class TwoPools:  # an off-loader that has relays in p1 and p2 only
        def pools(self, timeout_s=5.0):
            return {"p1": 2, "p2": 1}

        wait_for_pools = OffloadClient.wait_for_pools

    with pytest.raises(OffloadError, match="none joined for p3"):
        SharesEngine(RelayPools(TwoPools(), {1: ("p1", bytes(16)), 2: ("p2", bytes(16)), 3: ("p3", bytes(16))},
                                wait_s=0.2))
    with pytest.raises(ValueError, match="three different names"):
        RelayPools(TwoPools(), {1: ("p1", bytes(16)), 2: ("p1", bytes(16)), 3: ("p3", bytes(16))})
    with pytest.raises(ValueError, match="three pools"):
        LocalPools({1: [sh.pool_answer], 2: [sh.pool_answer], 3: []})


def test_the_shares_mode_is_the_default_wherever_the_three_pools_are_configured(tmp_path):
    from tempo.train import TrainConfig, load_job

    assert not TrainConfig().uses_shares()  # no pools: the masking (and its one-line notice)
    assert TrainConfig(pool_keys="keys").uses_shares()
    assert not TrainConfig(protection="masking", pool_keys="keys").uses_shares()
    assert TrainConfig(protection="shares").uses_shares()
    job = tmp_path / "job.toml"
    job.write_text('model = "mlp"\npool_keys = "/keys"\n')
    assert load_job(job).uses_shares()


def test_edge_shapes_and_values_are_handled_or_refused_clearly():
    """Found in review: the largest entry rounding up to 2^h, empty batches, 1-D operands, and
    a diverged model (NaN) all take a defined path."""
    from tempo.core.verify import NonFiniteError

    a = torch.full((1, 1, 1), 1 - 2.0**-31, dtype=torch.float64)  # rounds up to 2^h at its scale
    b = torch.randn(1 << 12, 1, 2, dtype=torch.float64)
    op = sh.open_forward(a, b)
    assert op.max_a < 1 << ((sh.RING_BITS - 0) // 2)
    sh.open_backward(op, torch.randn(1 << 12, 1, 2, dtype=torch.float64))
    back = _answers(op, backward=True)
    da, db = sh.combine_backward(op, back)
    assert da.shape == a.shape and db.shape == b.shape
    for x, y in ((torch.zeros(0, 4, 5), torch.randn(5, 3)), (torch.randn(4, 5), torch.zeros(0, 5, 3))):
        op = sh.open_forward(x, y)
        c = sh.combine_forward(op, _answers(op))
        sh.open_backward(op, torch.zeros(c.shape))
        assert sh.combine_backward(op, _answers(op, backward=True)) is not None
    with pytest.raises(ValueError, match="matrices"):
        sh.open_forward(torch.randn(5), torch.randn(5, 3))
    with pytest.raises(NonFiniteError):
        sh.open_forward(torch.tensor([[float("nan")]]), torch.ones(1, 1))
