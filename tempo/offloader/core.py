"""The off-loader's state and policy, free of I/O (`OffloaderCore`); `tempo.offloader` is the
poll loop around it.

The enclave writes masked operands into its shared-memory arena and sends ``submit`` with
descriptors; the off-loader reads the regions without a copy, sends them to a relay, writes the
relay's result into the output regions, and answers ``done``. Relays are tracked by their
``ready``, heartbeats and answers; a relay silent for longer than the timeout is dropped and its
outstanding parts are sent again to the others: a forward as it was, a backward with the cached
operands taken from the arena (``backward_full``), since the dead relay's cache died with it.

A reply from a relay is accepted only for an outstanding request id, from the relay it was sent
to, with the same binding; anything else is dropped with a log line, so a late or replayed reply
can neither duplicate nor corrupt a result. A reply that does answer a part the relay holds but
breaks the protocol (a result of the wrong shape or dtype, frames that do not decode, an error
other than a lost cache) is evidence against that relay: it is quarantined like one that failed
verification, and its parts go to the others.

Jobs and arenas belong to the enclave connection that first submitted into them: only it may
submit into, stage from or release them. A job is also held to the protection mode of its first
work request (protocol 2.4: ``masked`` or ``asymml``): a request in the other is refused
(``mode_mismatch``), a sealed part must be ``masked``, and every request to a relay, sent again
or not, carries its part's mode. No single message stops the off-loader: a handler
that raises is counted, logged and the next message is handled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from tempo.arena import Arena
from tempo.core.products import ProductShapeError, grad_shapes
from tempo.protocol import (
    DTYPES,
    FROM_ENCLAVE,
    FROM_RELAY,
    Backward,
    BackwardFull,
    Binding,
    Descriptor,
    Done,
    Error,
    ErrorCode,
    Forward,
    Heartbeat,
    Ping,
    Pong,
    ProtocolError,
    Quarantine,
    Ready,
    RelayEvent,
    Release,
    ReleaseJob,
    Result,
    Sealed,
    Stage,
    Submit,
    claimed_request_id,
    error_frames,
    inputs_digest,
    new_request_id,
    parse,
)


@dataclass
class RelayState:
    identity: bytes
    device: str
    free_memory: int
    last_seen: float
    inflight: set[str] = field(default_factory=set)
    given: int = 0  # parts dispatched to it so far (ties go to the least used)
    pool: str | None = None  # the shares mode: the pool it announced when it joined (never changes)


@dataclass
class Part:
    """One enclave request in flight: where its inputs and outputs live, and who computes it."""

    client: bytes  # the enclave's ROUTER identity
    client_id: str  # the enclave's request id
    kind: str  # forward | backward | sealed
    bind: Binding
    arena: Arena
    inputs: list[Descriptor]
    operands: list[Descriptor]  # A', B' for a backward (to resend if the cache is gone)
    outputs: list[Descriptor]
    relay: bytes | None = None
    relay_rid: str | None = None
    full: bool = False  # backward sent with its operands
    attempts: int = 0
    digest: str = ""
    sent_at: float = 0.0  # when the part last left for a relay (turnaround = transfer + compute)
    staged: str | None = None  # a forward whose weight operand (slot a or b) was staged ahead
    used_staged: bool = False
    pool: str | None = None  # a sealed part goes only to a relay of this pool
    mode: str = "masked"  # the protection mode (protocol 2.4), sent with every request for the part


def _expected_outputs(kind: str, inputs: list[Descriptor], operands: list[Descriptor]) -> list[tuple]:
    """Output shapes a submit must provide, from its input shapes (validated on arrival)."""

    def chain(x: tuple, y: tuple, what: str) -> tuple:
        if len(x) < 2 or len(y) < 2 or x[-1] != y[-2]:
            raise ProtocolError(f"{what}: shapes {x} and {y} do not multiply")
        try:
            batch = tuple(torch.broadcast_shapes(torch.Size(x[:-2]), torch.Size(y[:-2])))
        except RuntimeError:
            raise ProtocolError(f"{what}: batch shapes do not broadcast") from None
        return (*batch, x[-2], y[-1])

    if kind == "forward":
        if len(inputs) != 2 or operands:
            raise ProtocolError("a forward submit has inputs [A', B'] and no operands")
        return [chain(inputs[0].shape, inputs[1].shape, "forward")]
    if kind == "backward":
        if len(inputs) != 1 or len(operands) != 2:
            raise ProtocolError("a backward submit has inputs [D'ᵀ] and operands [A', B']")
        try:
            return list(grad_shapes(operands[0].shape, operands[1].shape, inputs[0].shape))
        except ProductShapeError as exc:
            raise ProtocolError(str(exc)) from None
    raise ProtocolError(f"unknown submit kind {kind!r}")


def _result_fits(part: Part, tensors: list[torch.Tensor]) -> bool:
    """A relay's result tensors have exactly the dtypes and shapes of the part's outputs."""
    return len(tensors) == len(part.outputs) and all(
        t.dtype == DTYPES[d.dtype] and tuple(t.shape) == d.shape for t, d in zip(tensors, part.outputs)
    )


class Send(NamedTuple):
    """An action of the core: send `frames` to the relay or enclave connection `identity`."""

    to: str  # "relay" or "enclave"
    identity: bytes
    frames: list


class OffloaderCore:
    """The off-loader's state and policy, without sockets or clocks: each event (frames from the
    enclave or a relay, or a tick of the clock) goes in with the time it happened, and comes back
    as the messages to send (`Send`). Dispatch, affinity, staging, pools, quarantine,
    re-dispatch and the relays' liveness are all here, and testable in-process on a fake clock
    (tests/test_offloader_core.py); `Offloader` is the poll loop around it."""

    def __init__(
        self,
        heartbeat_timeout_s: float = 3.0,
        max_frame_bytes: int = 1 << 30,
        log=None,
        max_inflight: int = 64,
        input_digest: bool = True,
    ) -> None:
        self.now = 0.0  # the time of the event being handled (seconds, monotonic)
        self.outbox: list[Send] = []  # what handling it decided to send
        self.input_digest = input_digest
        self.max_inflight = max_inflight  # outstanding parts per relay; more wait their turn
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.log = log
        self.relays: dict[bytes, RelayState] = {}
        self.parts: dict[str, Part] = {}  # by relay request id
        self.waiting: deque[Part] = deque()  # no relay available yet
        self.affinity: dict[Binding, bytes] = {}  # who holds a forward's cached operands, until its backward
        self.arenas: dict[str, Arena] = {}
        # the enclave connection (ROUTER identity) that opened a job or an arena: only it may use them
        self.job_owners: dict[str, bytes] = {}
        self.arena_owners: dict[str, bytes] = {}
        self.job_modes: dict[str, str] = {}  # each job's protection mode, from its first work request
        self.quarantined: dict[bytes, str] = {}  # relay -> why; never used again
        self.stats = {"dispatched": 0, "redispatched": 0, "dropped_replies": 0, "bad_messages": 0, "quarantined": 0,
                      "staged": 0, "staged_used": 0, "handler_failed": 0}
        self.staged: dict[Binding, tuple[bytes, str, Descriptor]] = {}  # shipped ahead: relay, slot, region
        self.enclave_handlers = {Submit: self._submit, Release: self._release, ReleaseJob: self._release_job,
                                 Ping: self._ping, Stage: self._stage, Quarantine: self._quarantine}
        self.relay_handlers = {
            Ready: self._relay_ready,
            Heartbeat: self._relay_ready,
            Result: self._relay_result,
            Error: self._relay_error,
            Pong: self._relay_pong,
        }
        assert set(self.enclave_handlers) == FROM_ENCLAVE and set(self.relay_handlers) == FROM_RELAY

    def _info(self, event: str, **kw) -> None:
        if self.log is not None:
            self.log.info(event, **kw)

    def _warn(self, event: str, **kw) -> None:
        if self.log is not None:
            self.log.warning(event, **kw)

    # -- the events --
    def on_enclave(self, frames: list, now: float) -> list[Send]:
        """A message from an enclave connection (``[identity, header, ...]``) at time `now`."""
        self.now = now
        self._on_enclave(frames)
        return self._flush()

    def on_relay(self, frames: list, now: float) -> list[Send]:
        """A message from a relay (``[identity, header, tensors...]``) at time `now`."""
        self.now = now
        self._on_relay(frames)
        return self._flush()

    def tick(self, now: float) -> list[Send]:
        """The clock: relays silent (no heartbeat, no reply) past the timeout are dropped and
        their parts sent to the others."""
        self.now = now
        self._expire_relays()
        return self._flush()

    def _flush(self) -> list[Send]:
        out, self.outbox = self.outbox, []
        return out

    def _to_relay(self, identity: bytes, frames: list) -> None:
        self.outbox.append(Send("relay", identity, frames))

    def _to_enclave(self, identity: bytes, frames: list) -> None:
        self.outbox.append(Send("enclave", identity, frames))

    def tables(self) -> dict[str, int]:
        """The sizes of the state kept per job, part and relay (what must not grow with steps)."""
        return {"parts": len(self.parts), "waiting": len(self.waiting), "affinity": len(self.affinity),
                "staged": len(self.staged), "arenas": len(self.arenas), "jobs": len(self.job_owners),
                "arena_owners": len(self.arena_owners), "modes": len(self.job_modes), "relays": len(self.relays),
                "quarantined": len(self.quarantined)}

    def pools(self) -> dict[str, int]:
        """Relays per pool (the shares mode), for the enclave's check that every pool is there."""
        counts: dict[str, int] = {}
        for r in self.relays.values():
            if r.pool is not None:
                counts[r.pool] = counts.get(r.pool, 0) + 1
        return counts

    # -- enclave side --
    def _claim(self, client: bytes, job: str, name: str) -> Arena:
        """The arena `name` for `client`'s work on `job`, attached on first use; refused when
        another connection opened the job or the arena (its results would land in their memory)."""
        for owners, key, what in ((self.job_owners, job, "job"), (self.arena_owners, name, "arena")):
            if owners.get(key, client) != client:
                raise ProtocolError(f"{what} {key!r} belongs to another enclave connection", ErrorCode.FORBIDDEN)
        if name not in self.arenas:
            self.arenas[name] = Arena.attach(name)
        self.job_owners[job] = client
        self.arena_owners[name] = client
        return self.arenas[name]

    def _hold_mode(self, job: str, mode: str, what: str) -> None:
        """Hold `job` to one protection mode: its first work request's; refuse a request in another."""
        held = self.job_modes.get(job)
        if held is not None and held != mode:
            raise ProtocolError(f"job {job[:128]!r} is in protection mode {held!r}; a {what} in mode {mode!r} is "
                                f"refused (a job never mixes modes)", ErrorCode.MODE_MISMATCH)
        self.job_modes[job] = mode

    def _submit(self, client: bytes, msg: Submit) -> None:
        bind = msg.bind
        arena = self._claim(client, bind.job, msg.arena)
        if msg.kind == "sealed" and msg.mode != "masked":
            raise ProtocolError(f"a sealed part (the shares mode) is in protection mode 'masked', not {msg.mode!r}",
                                ErrorCode.MODE_MISMATCH)
        self._hold_mode(bind.job, msg.mode, f"{msg.kind} submit")

        def descs(given: tuple[Descriptor, ...]) -> list[Descriptor]:
            return [d.inside(arena.size) for d in given]

        kind = msg.kind
        inputs, operands, outputs = descs(msg.inputs), descs(msg.operands), descs(msg.outputs)
        if kind == "sealed":  # the shares mode: blobs this process cannot open, for one pool's relays
            if msg.pool is None:
                raise ProtocolError("a sealed submit names its pool")
            if (not 1 <= len(inputs) <= 4 or operands or len(outputs) != 1
                    or any(d.dtype != "uint8" or len(d.shape) != 1 for d in inputs + outputs)):
                raise ProtocolError("a sealed submit has one to four sealed inputs and one sealed output (uint8)")
            self._dispatch(Part(client, msg.id, kind, bind, arena, inputs, [], outputs, pool=msg.pool))  # masked
            return
        if msg.pool is not None:
            raise ProtocolError("only a sealed submit names a pool")
        expected = _expected_outputs(kind, inputs, operands)
        if [tuple(o.shape) for o in outputs] != expected:
            raise ProtocolError(f"outputs must have shapes {expected}")
        dtypes = {d.dtype for d in inputs + operands + outputs}
        if len(dtypes) != 1:
            raise ProtocolError("all tensors of a submit must share one dtype")
        staged = msg.staged
        if staged is not None and kind != "forward":
            raise ProtocolError("staged is for a forward")
        part = Part(client, msg.id, kind, bind, arena, inputs, operands, outputs, staged=staged, mode=msg.mode)
        self._dispatch(part)

    def _stage(self, client: bytes, msg: Stage) -> None:
        """Ship a forward's weight operand to a relay before the forward itself (the pipeline:
        while the relays compute one layer, the next layer's masked weights travel)."""
        bind = msg.bind
        if msg.arena is None:
            raise ProtocolError("stage lacks an arena")
        arena = self._claim(client, bind.job, msg.arena)
        self._hold_mode(bind.job, msg.mode, "stage")
        if len(msg.inputs) != 1:
            raise ProtocolError("stage takes one descriptor and a slot, a or b")
        desc = msg.inputs[0].inside(arena.size)
        relay = self._least_loaded()
        if relay is None:
            return  # the forward will carry the operand itself
        self._unstage(bind, keep=relay.identity)  # staged again elsewhere: the first holder drops it
        relay.given += 1  # spread a product's parts over the relays
        digest = inputs_digest([arena.buffer(desc)]) if self.input_digest else None
        frames = Stage(bind, msg.slot, digest=digest, tensors=(arena.tensor(desc),), mode=msg.mode).to_frames()
        self._to_relay(relay.identity, frames)
        self.staged[bind] = (relay.identity, msg.slot, desc)
        self.stats["staged"] += 1

    def _unstage(self, bind: Binding, keep: bytes | None = None) -> None:
        """Forget `bind`'s staged operand, and have the relay that holds it (unless `keep`,
        which is about to take it with the forward) drop it too."""
        held = self.staged.pop(bind, None)
        if held is not None and held[0] != keep and held[0] in self.relays:
            self._to_relay(held[0], Release(bind).to_frames())

    def _release(self, client: bytes, msg: Release) -> None:
        """Drop one binding's cached and staged operands; only the connection that opened the job may."""
        bind = msg.bind
        if self.job_owners.get(bind.job, client) != client:
            raise ProtocolError(f"job {bind.job!r} belongs to another enclave connection", ErrorCode.FORBIDDEN)
        holder = self.affinity.pop(bind, None)
        self._unstage(bind, keep=holder)
        if holder in self.relays:
            self._to_relay(holder, Release(bind).to_frames())

    def _release_job(self, client: bytes, msg: ReleaseJob) -> None:
        """Drop a job: its parts, cached and staged operands, and arena; only the connection
        that opened the job may."""
        job, name = msg.job, msg.arena
        for owners, key, what in ((self.job_owners, job, "job"), (self.arena_owners, name, "arena")):
            if key is not None and owners.get(key, client) != client:
                raise ProtocolError(f"{what} {key!r} belongs to another enclave connection", ErrorCode.FORBIDDEN)
        arena = self.arenas.pop(name, None) if name is not None else None
        self.arena_owners.pop(name, None)
        self.job_modes.pop(job, None)
        if self.job_owners.pop(job, None) is not None:
            frames = ReleaseJob(job).to_frames()
            for identity in self.relays:
                self._to_relay(identity, frames)
        for key in [k for k in self.affinity if k.job == job]:
            del self.affinity[key]
        for key in [k for k in self.staged if k.job == job]:
            del self.staged[key]
        # its parts in flight or waiting would write into a closed arena: their answers are dropped
        def doomed(p: Part) -> bool:
            return p.bind.job == job or p.arena is arena

        for rid in [rid for rid, p in self.parts.items() if doomed(p)]:
            part = self.parts.pop(rid)
            if part.relay in self.relays:
                self.relays[part.relay].inflight.discard(rid)
        self.waiting = deque(p for p in self.waiting if not doomed(p))
        if arena is not None:
            arena.close()

    def _ping(self, client: bytes, msg: Ping) -> None:
        pong = Pong(id=msg.id, relays=len(self.relays), tables=self.tables(), pools=self.pools())
        self._to_enclave(client, pong.to_frames())

    def _reply_error(self, part: Part, reason: str, code: ErrorCode) -> None:
        self._to_enclave(part.client, error_frames(reason, part.client_id, part.bind, code))

    def _quarantine(self, client: bytes, msg: Quarantine) -> None:
        """Stop using a relay for good: by name, or the one holding the enclave's request `id`."""
        reason = (msg.reason or "")[:500]
        identity = msg.relay.encode() if msg.relay is not None else None
        rid = msg.id
        if identity is None and rid is not None:
            holder = next((p for p in self.parts.values() if p.client == client and p.client_id == rid), None)
            identity = holder.relay if holder else None
        if identity is None:
            raise ProtocolError("no relay holds this request (is any healthy relay left?)", ErrorCode.NO_RELAY)
        self._remove_relay(identity, quarantine_reason=reason or "quarantined by the enclave")
        self._notify(client, identity, "quarantined", reason)

    def _quarantine_for(self, identity: bytes, part: Part, evidence: str) -> None:
        """Quarantine a relay on evidence found here (a reply that breaks the protocol for a
        part it holds): its parts, this one too, go to the others, and each enclave whose parts
        it held is told why."""
        evidence = f"{part.kind} {part.bind.to_wire()}: {evidence}"[:500]
        clients = {p.client for p in self.parts.values() if p.relay == identity} | {part.client}
        self._remove_relay(identity, quarantine_reason=evidence)
        for client in clients:
            self._notify(client, identity, "quarantined", evidence)

    def _remove_relay(self, identity: bytes, quarantine_reason: str | None = None) -> None:
        """Drop a relay (lost or quarantined); send its outstanding parts to the others."""
        relay = self.relays.pop(identity, None)
        if quarantine_reason is not None:
            self.quarantined[identity] = quarantine_reason
            self.stats["quarantined"] += 1
            self._warn("offloader.relay_quarantined", relay=identity.decode("utf-8", "replace"),
                       evidence=quarantine_reason, relays=len(self.relays))
        for key in [k for k, v in self.affinity.items() if v == identity]:
            del self.affinity[key]
        for key in [k for k, v in self.staged.items() if v[0] == identity]:
            del self.staged[key]
        rids = relay.inflight if relay else {r for r, p in self.parts.items() if p.relay == identity}
        orphans = [self.parts.pop(rid) for rid in list(rids) if rid in self.parts]
        if quarantine_reason is None:
            self._warn("offloader.relay_lost", relay=identity.decode("utf-8", "replace"), parts=len(orphans),
                       relays=len(self.relays))
            for client in {p.client for p in orphans}:
                self._notify(client, identity, "lost", "stopped sending heartbeats")
        for part in orphans:
            self.stats["redispatched"] += 1
            if part.kind == "backward":
                part.full = True
            self._dispatch(part)

    def _notify(self, client: bytes, identity: bytes, event: str, reason: str) -> None:
        self._to_enclave(client, RelayEvent(identity.decode("utf-8", "replace"), event, reason[:500] or None).to_frames())

    # -- dispatch --
    def _staged_for(self, part: Part) -> tuple[bytes, str, Descriptor] | None:
        """The staged operand this forward can use: same binding, slot and arena region."""
        if part.kind != "forward" or part.staged is None or part.full:
            return None
        held = self.staged.get(part.bind)
        want = part.inputs[0 if part.staged == "a" else 1]
        if held is None or held[1] != part.staged or held[2] != want or held[0] not in self.relays:
            return None
        return held

    def _pick_relay(self, part: Part, held: tuple[bytes, str, Descriptor] | None) -> bytes | None:
        if part.kind == "sealed":  # the routing invariant: a pool's parts reach its relays only
            relay = self._least_loaded(part.pool)
            return relay.identity if relay is not None else None
        if held is not None:  # the relay that holds the weight, when it has room
            return held[0] if len(self.relays[held[0]].inflight) < self.max_inflight else None
        if part.kind == "backward" and not part.full:
            holder = self.affinity.get(part.bind)
            if holder in self.relays:
                return holder if len(self.relays[holder].inflight) < self.max_inflight else None
            part.full = True  # the cache is gone: send the operands along
        relay = self._least_loaded()
        return relay.identity if relay is not None else None

    def _least_loaded(self, pool: str | None = None) -> RelayState | None:
        """The relay of `pool` (None: relays in no pool) with room and the fewest parts in flight
        (ties: the least used so far). Every dispatch path picks relays here or reuses a relay
        picked here for the same binding and kind, so a pool's parts never leave its relays."""
        free = [r for r in self.relays.values() if r.pool == pool and len(r.inflight) < self.max_inflight]
        return min(free, key=lambda r: (len(r.inflight), r.given)) if free else None

    def _dispatch(self, part: Part) -> None:
        held = self._staged_for(part)
        relay = self._pick_relay(part, held)
        if relay is None:
            self.waiting.append(part)
            return
        part.attempts += 1
        if part.attempts > 5:
            self._reply_error(part, "gave up after 5 dispatch attempts", ErrorCode.GAVE_UP)
            return
        part.relay = relay
        part.relay_rid = new_request_id()
        arena = part.arena
        if part.kind == "forward":
            self._unstage(part.bind, keep=relay)  # a relay keeps a staged operand until this forward
        part.used_staged = held is not None
        extra = {"mode": part.mode}  # every request to a relay names its part's mode, sent again or not
        if part.kind == "sealed":
            cls, descs = Sealed, part.inputs
            extra = {"pool": part.pool}  # sealed: masked, always (its message has no mode)
        elif part.used_staged:  # only the activation travels now
            cls, descs = Forward, [part.inputs[1 if part.staged == "a" else 0]]
            extra["staged"] = part.staged
            self.stats["staged_used"] += 1
        elif part.kind == "forward":
            cls, descs = Forward, part.inputs
        elif part.full:
            cls, descs = BackwardFull, [*part.operands, *part.inputs]
        else:
            cls, descs = Backward, part.inputs
        if self.input_digest:
            part.digest = inputs_digest(arena.buffer(d) for d in descs)
        request = cls(id=part.relay_rid, bind=part.bind, digest=part.digest or None,
                      tensors=tuple(arena.tensor(d) for d in descs), **extra)
        self._to_relay(relay, request.to_frames())
        part.sent_at = self.now
        self.parts[part.relay_rid] = part
        self.relays[relay].inflight.add(part.relay_rid)
        self.relays[relay].given += 1
        if part.kind == "forward":
            self.affinity[part.bind] = relay
        self.stats["dispatched"] += 1

    def _drain_waiting(self) -> None:
        for _ in range(len(self.waiting)):  # each waiting part once; what still finds no slot stays
            if not self.relays:
                return
            self._dispatch(self.waiting.popleft())

    # -- relay side --
    def _relay_ready(self, identity: bytes, msg: Ready) -> None:
        known = identity in self.relays
        state = self.relays.get(identity) or RelayState(identity, "", 0, 0.0)
        state.device = msg.device or ""
        state.free_memory = msg.free_memory or 0
        state.last_seen = self.now
        if not known:
            state.pool = msg.pool
        self.relays[identity] = state
        if not known:
            self._info("offloader.relay_joined", relay=identity.decode("utf-8", "replace"), device=state.device,
                       relays=len(self.relays), **({"pool": state.pool} if state.pool else {}))
            self._drain_waiting()

    def _held(self, identity: bytes, rid: str | None) -> Part | None:
        """The part `identity` holds under request id `rid`, if any."""
        part = self.parts.get(rid) if rid else None
        return part if part is not None and part.relay == identity else None

    def _answered(self, identity: bytes, msg: Result | Error) -> Part | None:
        """The part `msg` answers: held by its sender, same binding and (for a result) the
        digest of the inputs it was sent. Anything else is dropped with a log line."""
        part = self._held(identity, msg.id)
        digest_ok = part is None or isinstance(msg, Error) or not self.input_digest or msg.digest == part.digest
        if part is None or msg.bind != part.bind or not digest_ok:
            self.stats["dropped_replies"] += 1
            self._warn("offloader.unmatched_reply", relay=identity.hex(), id=str(msg.id)[:64])
            return None
        self.relays[identity].last_seen = self.now  # an answer is a sign of life as good as a heartbeat
        return part

    def _take(self, part: Part) -> None:
        """The part is answered: it leaves the tables (a backward also ends its binding's
        affinity: the relay gave its cached operands up with it)."""
        del self.parts[part.relay_rid]
        if part.relay in self.relays:
            self.relays[part.relay].inflight.discard(part.relay_rid)
        if part.kind == "backward":
            self.affinity.pop(part.bind, None)
        self._drain_waiting()

    def _relay_result(self, identity: bytes, msg: Result) -> None:
        part = self._answered(identity, msg)
        if part is None:
            return
        if not _result_fits(part, msg.tensors):
            got = [(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for t in msg.tensors]
            want = [(d.dtype, d.shape) for d in part.outputs]
            self._warn("offloader.bad_result_shape", relay=identity.hex(), got=str(got)[:200], want=str(want)[:200])
            self._quarantine_for(identity, part, f"relay returned results of the wrong shape or dtype: {got} for {want}")
            return
        self._take(part)
        for t, d in zip(msg.tensors, part.outputs):
            part.arena.tensor(d).copy_(t)
        # Timing for the breakdown only (a relay may lie about it; it decides nothing): the
        # relay's own compute time, and this part's turnaround from dispatch to result in the arena.
        turnaround = self.now - part.sent_at
        compute = min(float(msg.compute_s or 0.0), turnaround)
        done = Done(part.client_id, part.bind, relay=identity.decode("utf-8", "replace"), relay_s=round(compute, 6),
                    turnaround_s=round(turnaround, 6), staged=part.used_staged)
        self._to_enclave(part.client, done.to_frames())

    def _relay_error(self, identity: bytes, msg: Error) -> None:
        reason = msg.reason[:300]
        if msg.id is None:
            self._warn("offloader.relay_error", relay=identity.hex(), reason=reason[:200])
            return
        part = self._answered(identity, msg)
        if part is None:
            return
        # The relay lost what it was asked to keep (evicted, restarted): the part goes again with
        # all its operands, and the relay is not to blame. Any other error is.
        if msg.code is ErrorCode.MODE_MISMATCH:
            # the relay holds the job in the other mode (its operands, or a job of that name from
            # before an off-loader restart): the request's fault, not the relay's; nothing is retried
            self._take(part)
            self._reply_error(part, f"a relay refused the part: {reason}", ErrorCode.MODE_MISMATCH)
            return
        lost_cache = part.kind == "backward" and not part.full and msg.code is ErrorCode.CACHE_MISS
        lost_stage = part.used_staged and msg.code is ErrorCode.STAGE_MISS
        if lost_cache or lost_stage:  # send it again with all its operands
            self._take(part)
            part.full = True
            self._dispatch(part)
            return
        self._quarantine_for(identity, part, f"relay error: {reason}")

    def _relay_pong(self, identity: bytes, msg: Pong) -> None:
        if identity in self.relays:
            self.relays[identity].last_seen = self.now

    def _expire_relays(self) -> None:
        for relay in [r for r in self.relays.values() if self.now - r.last_seen > self.heartbeat_timeout_s]:
            self._remove_relay(relay.identity)

    # -- the loop --
    def _handler_failed(self, side: str, op: object, exc: Exception) -> None:
        """A handler raised something no check foresaw: count it and log it; the loop goes on."""
        self.stats["handler_failed"] += 1
        self._warn("offloader.handler_failed", side=side, op=str(op)[:64], error=type(exc).__name__,
                   reason=str(exc)[:300])

    def _on_enclave(self, frames: list) -> None:
        if len(frames) < 2:
            return
        client, rest = bytes(frames[0]), frames[1:]
        msg = None
        try:
            if len(rest) != 1:
                raise ProtocolError("enclave messages carry no tensor frames")
            msg = parse(rest, FROM_ENCLAVE)
            self.enclave_handlers[type(msg)](client, msg)
        except Exception as exc:  # noqa: BLE001 - one message must never stop the loop
            if isinstance(exc, (ProtocolError, MemoryError, OSError)):
                self.stats["bad_messages"] += 1
                self._warn("offloader.bad_enclave_message", reason=str(exc))
                reason = str(exc)
                code = exc.code if isinstance(exc, ProtocolError) else ErrorCode.RESOURCES
            else:
                self._handler_failed("enclave", msg.OP if msg is not None else None, exc)
                reason = f"the off-loader failed on this message ({type(exc).__name__})"
                code = ErrorCode.INTERNAL
            # the id the message names (checked, where it decoded), to pin the error on its request
            rid = claimed_request_id(rest)
            self._to_enclave(client, error_frames(reason, rid, code=code))

    def _on_relay(self, frames: list) -> None:
        if len(frames) < 2:
            return
        identity, rest = bytes(frames[0]), frames[1:]
        if identity in self.quarantined:
            self.stats["dropped_replies"] += 1
            return
        msg = None
        try:
            try:
                msg = parse(rest, FROM_RELAY, self.max_frame_bytes)
            except ProtocolError as exc:
                # from the relay holding the part it names: evidence against it; else just noise
                part = self._held(identity, claimed_request_id(rest))
                if part is None:
                    raise
                self._warn("offloader.malformed_reply", relay=identity.hex(), reason=str(exc))
                self._quarantine_for(identity, part, f"malformed reply: {exc}")
                return
            if not isinstance(msg, Ready) and identity not in self.relays:  # Heartbeat is a Ready
                raise ProtocolError("unknown relay: announce yourself with ready first")
            self.relay_handlers[type(msg)](identity, msg)
        except ProtocolError as exc:
            self.stats["bad_messages"] += 1
            self._warn("offloader.bad_relay_message", relay=identity.hex(), reason=str(exc))
            self._to_relay(identity, error_frames(str(exc), code=exc.code))
        except Exception as exc:  # noqa: BLE001 - one message must never stop the loop
            self._handler_failed("relay", msg.OP if msg is not None else None, exc)
