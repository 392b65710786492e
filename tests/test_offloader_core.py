"""The off-loader's policy on a fake clock, in-process: no socket, no subprocess.

`OffloaderCore` gets each message with the time it came and returns what to send; these tests
play the enclave and the relays around it with real messages (tempo.protocol) and a real arena."""

from __future__ import annotations

import pytest
import torch

from tempo.arena import Arena
from tempo.offloader.core import OffloaderCore
from tempo.protocol import (
    TO_ENCLAVE,
    TO_RELAY,
    Backward,
    BackwardFull,
    Binding,
    Done,
    Error,
    ErrorCode,
    Forward,
    Heartbeat,
    Ready,
    RelayEvent,
    Release,
    ReleaseJob,
    Result,
    Sealed,
    Stage,
    Submit,
    parse,
)

ENCLAVE = b"enclave-1"


def wire(frames) -> list[bytes]:
    """Frames as a socket delivers them: bytes (to_frames gives tensors' own memory)."""
    return [bytes(memoryview(f).cast("B")) if isinstance(f, memoryview) else bytes(f) for f in frames]


class Cluster:
    """An OffloaderCore, the clock, one enclave connection with its arena, and what was sent."""

    def __init__(self, **kw) -> None:
        self.core = OffloaderCore(heartbeat_timeout_s=3.0, **kw)
        self.now = 0.0
        self.arena = Arena.create("policy", 1 << 20)
        self.to_relays: list[tuple[bytes, object]] = []  # (relay, message) in the order sent
        self.to_enclave: list[tuple[bytes, object]] = []  # (connection, message)
        self.outputs: dict[str, list] = {}  # enclave request id -> output regions

    def close(self) -> None:
        self.arena.close()

    def _take(self, actions) -> list:
        for a in actions:
            if a.to == "relay":
                self.to_relays.append((a.identity, parse(wire(a.frames), TO_RELAY | {Error})))  # refusals too
            else:
                self.to_enclave.append((a.identity, parse(wire(a.frames), TO_ENCLAVE)))
        return actions

    def at(self, t: float) -> Cluster:
        self.now = t
        return self

    def join(self, name: str, pool: str | None = None) -> None:
        self._take(self.core.on_relay([name.encode(), *wire(Ready(device="cpu", name=name, pool=pool).to_frames())],
                                      self.now))

    def beat(self, name: str) -> None:
        self._take(self.core.on_relay([name.encode(), *wire(Heartbeat(device="cpu", name=name).to_frames())], self.now))

    def tick(self) -> None:
        self._take(self.core.tick(self.now))

    def enclave(self, msg, client: bytes = ENCLAVE) -> list:
        return self._take(self.core.on_enclave([client, *wire(msg.to_frames())], self.now))

    def _region(self, t: torch.Tensor):
        desc, view = self.arena.alloc_tensor(tuple(t.shape), t.dtype)
        view.copy_(t)
        return desc

    def forward(self, rid: str, bind: Binding, a: torch.Tensor, b: torch.Tensor, client: bytes = ENCLAVE,
                mode: str = "masked", staged: str | None = None, inputs=None) -> list:
        out = self._region(torch.zeros(a.shape[0], b.shape[1]))
        self.outputs[rid] = [out]
        return self.enclave(Submit(id=rid, bind=bind, arena=self.arena.name, kind="forward",
                                   inputs=inputs or (self._region(a), self._region(b)), outputs=(out,),
                                   staged=staged, mode=mode), client)

    def backward(self, rid: str, bind: Binding, a, b, e, mode: str = "masked") -> list:
        outs = [self._region(torch.zeros_like(a)), self._region(torch.zeros_like(b))]
        self.outputs[rid] = outs
        return self.enclave(Submit(id=rid, bind=bind, arena=self.arena.name, kind="backward",
                                   inputs=(self._region(e),), operands=(self._region(a), self._region(b)),
                                   outputs=tuple(outs), mode=mode))

    def reply(self, relay: str, msg, tensors=None) -> None:
        """`relay` answers `msg` honestly (or with `tensors`)."""
        if tensors is None:
            if isinstance(msg, Forward):
                tensors = [msg.tensors[0] @ msg.tensors[1]]
            else:
                a, b, e = msg.tensors if isinstance(msg, BackwardFull) else (*self._cached[msg.bind], msg.tensors[0])
                tensors = [e @ b.mT, a.mT @ e]
        result = Result(id=msg.id, bind=msg.bind, digest=msg.digest, compute_s=0.01, tensors=tuple(tensors))
        self._take(self.core.on_relay([relay.encode(), *wire(result.to_frames())], self.now))

    def error(self, relay: str, msg, code: ErrorCode, reason: str = "no") -> None:
        err = Error(reason=reason, code=code, id=msg.id, bind=msg.bind)
        self._take(self.core.on_relay([relay.encode(), *wire(err.to_frames())], self.now))

    @property
    def _cached(self) -> dict:
        """What each relay would hold from the forwards it computed: the operands, by binding."""
        return {m.bind: (m.tensors[0].clone(), m.tensors[1].clone()) for _, m in self.to_relays if isinstance(m, Forward)}

    def sent(self, kind=object, to: str | None = None) -> list:
        return [m for r, m in self.to_relays if isinstance(m, kind) and (to is None or r == to.encode())]

    def holder(self, msg) -> str:
        return next(r for r, m in self.to_relays if m is msg).decode()

    def events(self, kind, client: bytes = ENCLAVE) -> list:
        return [m for c, m in self.to_enclave if isinstance(m, kind) and c == client]


@pytest.fixture
def cl():
    c = Cluster()
    yield c
    c.close()


def _ab(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, generator=g), torch.randn(3, 2, generator=g)


def test_parts_spread_over_the_least_loaded_relays_and_results_land_in_the_arena(cl):
    cl.join("r1"), cl.join("r2")
    for i in range(4):
        cl.forward(f"f{i}", Binding("j", 0, i, 0), *_ab(i))
    sent = cl.sent(Forward)
    assert [cl.holder(m) for m in sent] == ["r1", "r2", "r1", "r2"]  # fewest in flight, then least used
    for m in sent:
        cl.reply(cl.holder(m), m)
    done = cl.events(Done)
    assert sorted(d.id for d in done) == ["f0", "f1", "f2", "f3"]
    for i in range(4):
        a, b = _ab(i)
        torch.testing.assert_close(cl.arena.tensor(cl.outputs[f"f{i}"][0]), a @ b)
    assert not cl.core.parts and cl.core.tables()["parts"] == 0


def test_a_silent_relay_expires_on_the_clock_and_its_parts_go_to_the_others(cl):
    cl.join("r1"), cl.join("r2")
    a, b = _ab()
    cl.forward("f", Binding("j", 0, 0, 0), a, b)
    fwd = cl.sent(Forward)[0]
    first = cl.holder(fwd)
    other = "r2" if first == "r1" else "r1"
    cl.reply(first, fwd)
    # the backward goes where the forward's operands are cached...
    cl.backward("bw", Binding("j", 0, 0, 0), a, b, torch.ones(4, 2))
    bwd = cl.sent(Backward)[0]
    assert cl.holder(bwd) == first
    cl.at(2.0).beat(other)
    cl.at(3.5).tick()  # first has said nothing since 0.0: lost; other beat at 2.0: alive
    assert first.encode() not in cl.core.relays and other.encode() in cl.core.relays
    assert [(e.relay, e.event) for e in cl.events(RelayEvent)] == [(first, "lost")]
    # ... and, with that relay gone, to the other with its operands (the cache died with it)
    full = cl.sent(BackwardFull)
    assert len(full) == 1 and cl.holder(full[0]) == other
    cl.reply(other, full[0])
    da, db = (cl.arena.tensor(d) for d in cl.outputs["bw"])
    torch.testing.assert_close(da, torch.ones(4, 2) @ b.mT)
    torch.testing.assert_close(db, a.mT @ torch.ones(4, 2))


def test_an_answer_counts_as_a_sign_of_life(cl):
    """A relay busy computing sends results, not only heartbeats: a result keeps it alive."""
    cl.join("busy")
    cl.forward("f1", Binding("j", 0, 0, 0), *_ab())
    cl.forward("f2", Binding("j", 0, 1, 0), *_ab(1))
    f1, f2 = cl.sent(Forward)
    cl.at(2.5).reply("busy", f1)  # no heartbeat since joining at 0.0
    cl.at(4.0).tick()
    assert b"busy" in cl.core.relays  # 1.5 s since its answer
    cl.at(5.6).tick()  # 3.1 s of silence
    assert b"busy" not in cl.core.relays and cl.events(RelayEvent)[0].event == "lost"
    assert f2.id not in cl.core.parts and len(cl.core.waiting) == 1  # no relay left: it waits


def test_replies_that_do_not_answer_what_a_relay_holds_are_dropped(cl):
    cl.join("r1"), cl.join("r2")
    a, b = _ab()
    cl.forward("f", Binding("j", 0, 0, 0), a, b)
    fwd = cl.sent(Forward)[0]
    holder = cl.holder(fwd)
    stranger = "r2" if holder == "r1" else "r1"
    right = [a @ b]
    cl.reply(stranger, fwd, right)  # not sent to it
    cl.reply(holder, Forward(id="0" * 24, bind=fwd.bind, digest=fwd.digest, tensors=fwd.tensors), right)  # no such id
    cl.reply(holder, Forward(id=fwd.id, bind=Binding("j", 0, 9, 0), digest=fwd.digest, tensors=fwd.tensors), right)
    cl.reply(holder, Forward(id=fwd.id, bind=fwd.bind, digest="f" * 32, tensors=fwd.tensors), right)  # other inputs
    assert not cl.events(Done) and cl.core.stats["dropped_replies"] == 4
    assert len(cl.core.relays) == 2 and not cl.core.quarantined  # noise, not evidence
    cl.reply(holder, fwd)
    assert [d.id for d in cl.events(Done)] == ["f"]
    cl.reply(holder, fwd)  # a replay of an answered part
    assert len(cl.events(Done)) == 1 and cl.core.stats["dropped_replies"] == 5


def test_a_result_of_the_wrong_shape_quarantines_its_relay_and_the_part_goes_elsewhere(cl):
    cl.join("liar"), cl.join("honest")
    cl.forward("f", Binding("j", 0, 0, 0), *_ab())
    fwd = cl.sent(Forward)[0]
    liar = cl.holder(fwd)
    honest = "honest" if liar == "liar" else "liar"
    cl.reply(liar, fwd, [torch.zeros(4, 3)])
    assert liar.encode() in cl.core.quarantined and liar.encode() not in cl.core.relays
    event = cl.events(RelayEvent)[0]
    assert (event.relay, event.event) == (liar, "quarantined") and "wrong shape" in event.reason
    again = cl.sent(Forward)[1]
    assert cl.holder(again) == honest and again.bind == fwd.bind and again.id != fwd.id
    cl.join(liar)  # a quarantined relay is never taken back
    assert liar.encode() not in cl.core.relays
    cl.reply(honest, again)
    assert [d.id for d in cl.events(Done)] == ["f"]


def test_a_lost_cache_sends_the_backward_again_with_its_operands_and_blames_no_one(cl):
    cl.join("r1")
    a, b = _ab()
    cl.forward("f", Binding("j", 0, 0, 0), a, b)
    cl.reply("r1", cl.sent(Forward)[0])
    cl.backward("bw", Binding("j", 0, 0, 0), a, b, torch.ones(4, 2))
    cl.error("r1", cl.sent(Backward)[0], ErrorCode.CACHE_MISS, "evicted")
    full = cl.sent(BackwardFull)
    assert len(full) == 1 and cl.holder(full[0]) == "r1" and not cl.core.quarantined
    cl.error("r1", full[0], ErrorCode.COMPUTE_FAILED, "out of memory")  # any other error is evidence
    assert b"r1" in cl.core.quarantined and len(cl.core.waiting) == 1


def test_a_part_without_room_waits_until_an_answer_frees_a_slot():
    cl = Cluster(max_inflight=1)
    try:
        cl.forward("early", Binding("j", 0, 0, 0), *_ab())  # no relay yet
        assert not cl.sent() and len(cl.core.waiting) == 1
        cl.join("r1")  # a relay joins: the waiting part goes
        cl.forward("f2", Binding("j", 0, 1, 0), *_ab(1))  # r1 is full
        assert len(cl.sent(Forward)) == 1 and len(cl.core.waiting) == 1
        cl.reply("r1", cl.sent(Forward)[0])
        assert len(cl.sent(Forward)) == 2 and not cl.core.waiting
    finally:
        cl.close()


def test_a_part_re_dispatched_five_times_is_given_up(cl):
    cl.forward("f", Binding("j", 0, 0, 0), *_ab())
    for i in range(6):  # relays that join and die before answering
        cl.at(10.0 * i).join(f"r{i}")
        cl.at(10.0 * i + 5).tick()
    error = cl.events(Error)
    assert len(cl.sent(Forward)) == 5 and len(error) == 1
    assert error[0].code is ErrorCode.GAVE_UP and error[0].id == "f"


def test_a_job_belongs_to_the_connection_that_opened_it(cl):
    cl.join("r1")
    cl.forward("f", Binding("j", 0, 0, 0), *_ab())
    cl.forward("g", Binding("j", 0, 1, 0), *_ab(), client=b"intruder")
    cl.enclave(Release(Binding("j", 0, 0, 0)), client=b"intruder")
    assert len(cl.sent(Forward)) == 1 and not cl.sent(Release)
    refused = cl.events(Error, client=b"intruder")
    assert [e.code for e in refused] == [ErrorCode.FORBIDDEN] * 2 and refused[0].id == "g"
    assert not cl.events(Error)  # the owner is told nothing


def test_releasing_a_job_forgets_its_parts_and_tells_the_relays(cl):
    cl.join("r1"), cl.join("r2")
    cl.forward("f", Binding("j", 0, 0, 0), *_ab())
    fwd = cl.sent(Forward)[0]
    cl.enclave(ReleaseJob("j", arena=cl.arena.name))
    assert {r for r, m in cl.to_relays if isinstance(m, ReleaseJob)} == {b"r1", b"r2"}
    tables = cl.core.tables()
    assert tables["parts"] == tables["jobs"] == tables["arenas"] == tables["affinity"] == 0
    cl.reply(cl.holder(fwd), fwd)  # a late answer for the released job is dropped
    assert not cl.events(Done) and cl.core.stats["dropped_replies"] == 1


def test_a_reply_that_breaks_the_protocol_is_evidence_only_against_the_relay_holding_the_part(cl):
    """Undecodable frames, a wrong dtype or an error answering a part the sender holds
    quarantine it (and the part goes to an honest relay); the same garbage naming a part that
    someone else holds is only refused: no peer can get another relay quarantined."""
    cl.join("honest")
    cl.forward("warm", Binding("j", 0, 0, 0), *_ab())  # the honest relay has a part behind it
    a, b = _ab(1)

    def undecodable(msg) -> list:
        frames = wire(Result(id=msg.id, bind=msg.bind, digest=msg.digest, tensors=(torch.zeros(4, 2),)).to_frames())
        return [frames[0], b"\x00" * 5]

    cases = {"wrong dtype": lambda m: wire(Result(id=m.id, bind=m.bind, digest=m.digest,
                                                  tensors=((m.tensors[0] @ m.tensors[1]).double(),)).to_frames()),
             "relay error": lambda m: wire(Error(reason="CUDA out of memory", code=ErrorCode.COMPUTE_FAILED,
                                                 id=m.id, bind=m.bind).to_frames()),
             "malformed reply": undecodable}
    for step, (case, reply) in enumerate(cases.items(), start=1):
        fake = f"fake-{step}"
        cl.join(fake), cl.join("bystander")
        cl.forward(f"f{step}", Binding("j", step, 0, 0), a, b)
        msg = cl.sent(Forward, to=fake)[-1]  # the fake relay has none behind it: it gets this one
        noted = len(cl.sent(Error, to="bystander")) + cl.core.stats["dropped_replies"]
        cl._take(cl.core.on_relay([b"bystander", *reply(msg)], cl.now))
        assert b"bystander" in cl.core.relays and fake.encode() in cl.core.relays, case
        # only refused (an error back) or dropped (a well-formed reply to a part it does not hold)
        assert len(cl.sent(Error, to="bystander")) + cl.core.stats["dropped_replies"] == noted + 1, case
        cl._take(cl.core.on_relay([fake.encode(), *reply(msg)], cl.now))
        assert fake.encode() in cl.core.quarantined, case
        event = cl.events(RelayEvent)[-1]
        assert event.relay == fake and str(msg.bind.to_wire()) in event.reason, case
        again = cl.sent(Forward)[-1]
        assert again.bind == msg.bind and cl.holder(again) in ("honest", "bystander"), case
        cl.reply(cl.holder(again), again)
        assert cl.events(Done)[-1].id == f"f{step}", case
    assert sorted(cl.core.quarantined) == [b"fake-1", b"fake-2", b"fake-3"]


def test_a_backward_sent_again_with_its_operands_ends_its_binding(cl):
    cl.join("r1")
    a, b = _ab()
    for step in range(3):
        bind = Binding("j", step, 0, 0)
        cl.forward(f"f{step}", bind, a, b)
        cl.reply("r1", cl.sent(Forward)[-1])
        cl.backward(f"b{step}", bind, a, b, torch.ones(4, 2))
        cl.error("r1", cl.sent(Backward)[-1], ErrorCode.CACHE_MISS)
        cl.reply("r1", cl.sent(BackwardFull)[-1])
    assert [d.id for d in cl.events(Done)] == ["f0", "b0", "f1", "b1", "f2", "b2"]
    assert cl.core.tables()["affinity"] == 0 and cl.core.tables()["parts"] == 0


def test_a_job_is_held_to_the_mode_of_its_first_work_request(cl):
    cl.join("r1")
    a, b = _ab()
    cl.forward("f", Binding("j", 0, 0, 0), a, b, mode="asymml")
    assert [m.mode for m in cl.sent(Forward)] == ["asymml"]  # the relay is told, too
    cl.forward("g", Binding("j", 0, 1, 0), a, b, mode="masked")
    cl.backward("h", Binding("j", 0, 0, 0), a, b, torch.ones(4, 2), mode="masked")
    cl.enclave(Stage(Binding("j", 0, 2, 0), "b", arena=cl.arena.name, inputs=(cl._region(b),), mode="masked"))
    refused = cl.events(Error)
    assert [e.code for e in refused] == [ErrorCode.MODE_MISMATCH] * 3
    assert [e.id for e in refused[:2]] == ["g", "h"]  # pinned on their requests (a stage names none)
    assert all("'asymml'" in e.reason and "'masked'" in e.reason for e in refused)
    assert len(cl.sent(Forward)) == 1 and not cl.sent(Backward) and not cl.sent(Stage)  # nothing reached a relay
    assert not cl.core.quarantined and cl.core.job_modes == {"j": "asymml"}
    cl.forward("k", Binding("other", 0, 0, 0), a, b)  # another job: its own mode
    assert cl.sent(Forward)[-1].mode == "masked" and cl.core.tables()["modes"] == 2
    cl.enclave(ReleaseJob("j"))  # the job's mode goes with it
    assert cl.core.job_modes == {"other": "masked"}
    cl.forward("m", Binding("j", 1, 0, 0), a, b, mode="masked")
    assert cl.sent(Forward)[-1].mode == "masked" and len(cl.events(Error)) == 3


def test_a_sealed_part_is_refused_in_mode_asymml(cl):
    cl.join("p1", pool="p")

    def sealed(rid: str, job: str, mode: str) -> None:
        blob, out = cl._region(torch.zeros(8, dtype=torch.uint8)), cl._region(torch.zeros(8, dtype=torch.uint8))
        cl.enclave(Submit(id=rid, bind=Binding(job, 0, 0, 0), arena=cl.arena.name, kind="sealed", pool="p",
                          inputs=(blob,), outputs=(out,), mode=mode))

    sealed("s1", "shares-job", "asymml")
    sealed("s2", "shares-job", "masked")  # the refusal took no mode for the job: masked is its first
    cl.forward("f", Binding("asym-job", 0, 0, 0), *_ab(), mode="asymml")
    sealed("s3", "asym-job", "masked")  # a sealed part in a job that is in asymml
    refused = cl.events(Error)
    assert [(e.id, e.code) for e in refused] == [("s1", ErrorCode.MODE_MISMATCH), ("s3", ErrorCode.MODE_MISMATCH)]
    assert "sealed" in refused[0].reason
    assert [(cl.holder(m), m.bind.job) for m in cl.sent(Sealed)] == [("p1", "shares-job")]


def test_every_request_for_a_part_carries_its_mode_when_it_is_sent_again(cl):
    """Staged, sent again after its relay died, or with its operands after a lost cache: the
    part's mode goes with each request."""
    cl.join("r1"), cl.join("r2")
    a, b = _ab()
    bind = Binding("j", 0, 0, 0)
    cl.enclave(Stage(bind, "b", arena=cl.arena.name, inputs=((wb := cl._region(b)),), mode="asymml"))
    stage = cl.sent(Stage)[0]
    assert stage.mode == "asymml"
    first = cl.holder(stage)
    other = "r2" if first == "r1" else "r1"
    cl.forward("f", bind, a, b, mode="asymml", staged="b", inputs=(cl._region(a), wb))
    fwd = cl.sent(Forward)[0]
    assert cl.holder(fwd) == first and fwd.staged == "b" and fwd.mode == "asymml"
    cl.at(2.0).beat(other)
    cl.at(3.5).tick()  # the relay holding the forward is lost: the forward goes again, whole
    again = cl.sent(Forward)[1]
    assert cl.holder(again) == other and again.staged is None and again.mode == "asymml"
    cl.reply(other, again)
    cl.backward("bw", bind, a, b, torch.ones(4, 2), mode="asymml")
    bwd = cl.sent(Backward)[0]
    assert cl.holder(bwd) == other and bwd.mode == "asymml"
    cl.error(other, bwd, ErrorCode.CACHE_MISS)  # sent again with its operands
    full = cl.sent(BackwardFull)
    assert len(full) == 1 and full[0].mode == "asymml"
    cl.join("r3")
    cl.at(7.0).beat("r3")
    cl.at(7.0).tick()  # the relay holding the backward_full is lost too
    full = cl.sent(BackwardFull)
    assert len(full) == 2 and cl.holder(full[1]) == "r3" and full[1].mode == "asymml"
    cl.reply("r3", full[1])
    assert [d.id for d in cl.events(Done)] == ["f", "bw"] and not cl.events(Error)


def test_a_relay_that_refuses_a_part_for_its_mode_is_not_blamed(cl):
    """A relay may hold a job's other mode (say, from before the off-loader restarted): its
    refusal goes to the enclave as it is, the part is not sent again, and no one is quarantined."""
    cl.join("r1"), cl.join("r2")
    cl.forward("f", Binding("j", 0, 0, 0), *_ab(), mode="asymml")
    fwd = cl.sent(Forward)[0]
    cl.error(cl.holder(fwd), fwd, ErrorCode.MODE_MISMATCH, "job 'j' is in protection mode 'masked' on this relay")
    refused = cl.events(Error)
    assert [(e.id, e.code) for e in refused] == [("f", ErrorCode.MODE_MISMATCH)]
    assert "is in protection mode 'masked'" in refused[0].reason
    assert not cl.core.quarantined and len(cl.sent(Forward)) == 1 and not cl.core.parts and not cl.core.waiting
    assert not cl.events(RelayEvent)
