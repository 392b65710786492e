"""The enclave's link to the off-loader: offload a product, get it back decrypted and verified.

`OffloadClient.forward(a, b, bind)` draws a fresh key, encrypts ``A`` and ``B`` straight into
the job's shared-memory arena, submits descriptors, waits, decrypts ``C'`` from the arena and
verifies it with Freivalds. `backward(grad_c, bind)` encrypts ``Δᵀ`` only (the relay kept
``A'`` and ``B'``), and decrypts and verifies both gradients. `submit_*`/`wait` split these so
many parts can be in flight at once.

In the default protection mode (``mode="masked"``) nothing but masked operands ever leaves this
process; keys, plaintext and the Freivalds vectors stay here. In mode ``"asymml"`` the products
carry identity keys (`tempo.enclave.asymml`): plaintext weights and noisy residuals go out, and
every request says so on the wire (protocol 2.4), so that no peer mixes them with masked work.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field

import torch
import zmq

from tempo.arena import Arena, Descriptor
from tempo.enclave import protection
from tempo.core.keys import DEFAULT_KEY_SPACE, KeySchedule, KeySpace, MatmulKey
from tempo.core.roundtrip import MaskedProduct, mask_operand
from tempo.core.verify import IntegrityError
from tempo.protocol import (
    MODES,
    TO_ENCLAVE,
    Binding,
    Done,
    Error,
    ErrorCode,
    Ping,
    Pong,
    ProtocolError,
    Quarantine,
    RelayEvent,
    Release,
    ReleaseJob,
    Stage,
    Submit,
    new_request_id,
    parse,
)


class OffloadError(RuntimeError):
    """An offloaded part failed: an error reply, a timeout, or a protocol violation; `code` is
    the error reply's (`ErrorCode`), or ``None`` for a failure found here."""

    def __init__(self, message: str = "", code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class PartTimeout(OffloadError):
    """No answer for a part within the part timeout."""


class NoHealthyRelay(OffloadError):
    """Every relay that could take a part was quarantined or lost."""


class OffloaderGone(OffloadError):
    """The off-loader stopped answering (or, with a watchdog, its process exited)."""


@dataclass
class _Forward:
    """What the enclave keeps between a part's forward and its backward: the product's round
    trip, and where its masked operands and result live in the arena."""

    product: MaskedProduct
    a_enc: Descriptor
    b_enc: Descriptor
    c_enc: Descriptor | None = None


@dataclass
class Premasked:
    """One operand masked ahead of its product, waiting in the arena."""

    key: MatmulKey
    side: str  # "a" or "b"
    desc: Descriptor
    shape: tuple
    bind: Binding | None = None  # the product's binding, where it was shipped ahead (stage)


@dataclass
class Pending:
    rid: str
    kind: str
    bind: Binding
    outputs: list[Descriptor] = field(default_factory=list)
    relay: str = ""  # which relay computed it (from the off-loader's done)
    kind_pool: str = ""  # a sealed part's pool


@dataclass
class Counters:
    forward: int = 0
    backward: int = 0
    forward_encryptions: int = 0  # matrices masked, counted where it happens (2 per forward)
    backward_encryptions: int = 0  # 1 per backward: dL/dC^T only, never a weight again
    premasks_dropped: int = 0  # weights masked ahead (pipeline) whose product came with other shapes
    staged_forwards: int = 0  # forwards whose weights were shipped to their relay ahead of them
    encrypt_s: float = 0.0
    decrypt_s: float = 0.0
    verify_s: float = 0.0
    wait_s: float = 0.0  # blocked on replies
    send_s: float = 0.0  # encoding and sending requests
    relay_compute_s: float = 0.0  # the relays' own compute time for the answers used (their report)
    turnaround_s: float = 0.0  # the off-loader's dispatch-to-result time for them (transfer + compute)
    unmatched_replies: int = 0  # replies for no outstanding request (duplicates, replays)
    failed_verifications: int = 0
    timeouts: int = 0
    parts_by_relay: dict = field(default_factory=dict)  # answers used, per relay name
    bytes_sent: int = 0  # request tensors handed to the off-loader (a resend counts again)
    bytes_received: int = 0  # answers read back


class OffloadClient:
    def __init__(
        self,
        endpoint: str,
        job: str,
        arena_bytes: int = 256 << 20,
        timeout_s: float = 30.0,
        rounds: int = 16,
        part_timeout_s: float | None = None,
        max_attempts: int = 4,
        key_space: KeySpace = DEFAULT_KEY_SPACE,
        context: zmq.Context | None = None,
        log=None,
        keys: KeySchedule | None = None,
        mode: str = "masked",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        # the protection mode every work request names (protocol 2.4): the job's, for its life
        self.mode = mode
        self.job = job
        self.timeout_s = timeout_s
        self.part_timeout_s = timeout_s if part_timeout_s is None else part_timeout_s
        self.max_attempts = max_attempts
        self.relay_events: list[dict] = []  # relays quarantined (with evidence) or lost
        self.rounds = rounds
        # default: fresh keys per product, mixing as the default masking does (tempo.enclave.protection)
        self.keys = keys or KeySchedule("step", key_space, mix=protection.default().mix, ahead=True)
        self.log = log
        self.arena = Arena.create(job, arena_bytes)
        self._ctx = context or zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # The off-loader lets only the connection that opened a job use or release it, by this
        # identity: set here, it is unguessable and stays the same if the connection is remade.
        self.sock.setsockopt(zmq.IDENTITY, b"enclave-" + secrets.token_hex(16).encode())
        self.sock.connect(endpoint)
        self._forwards: dict[Binding, _Forward] = {}
        self._pending: dict[str, Pending] = {}
        self._replies: dict[str, object] = {}
        self._pings: set[str] = set()  # pings awaiting their pong (answered in _replies)
        self.counters = Counters()
        # Liveness of the off-loader while waiting: `watchdog` (e.g. `LocalCluster.check`) is
        # called about twice a second and may raise; and an off-loader silent for a third of
        # `offloader_silence_s` is pinged, one silent for all of it is given up on.
        self.watchdog = None
        self.offloader_silence_s = 15.0
        # `tempo audit` only: called with what the relays are sent for each product, as
        # InProcessEngine's observer is (the masked tensors, in the arena, and the round trip)
        self.observer = None
        self._last_heard = time.monotonic()
        self._probe_at = 0.0

    # -- arena helpers --
    def _alloc(self, shape, dtype) -> tuple[Descriptor, torch.Tensor]:
        return self.arena.alloc_tensor(tuple(shape), dtype)

    def _free(self, *descs: Descriptor | None) -> None:
        for d in descs:
            if d is not None:
                self.arena.free(d.offset)

    def _send(self, rid: str, bind: Binding, kind: str, **fields) -> None:
        t0 = time.perf_counter()
        self.sock.send_multipart(Submit(rid, bind, self.arena.name, kind, mode=self.mode, **fields).to_frames(),
                                 copy=False)
        self.counters.send_s += time.perf_counter() - t0

    # -- forward --
    def premask(self, bind: Binding, side: str, operand: torch.Tensor, shape: tuple[int, int, int],
                stage: bool = True) -> Premasked:
        """Mask one operand of a product that is still to come (the pipeline's look-ahead: the
        next layer's weights while the relays compute this one) under that product's key, and
        (`stage`) have the off-loader ship it to a relay ahead of the product."""
        m, n, p = shape
        t0 = time.perf_counter()
        sk = self.keys.key(bind.layer, m, n, p, bind.part)
        desc, buf = self._alloc(operand.shape, operand.dtype)
        mask_operand(sk, side, operand, buf)
        self.counters.forward_encryptions += 1
        self.counters.encrypt_s += time.perf_counter() - t0
        if stage:
            t1 = time.perf_counter()
            self.counters.bytes_sent += desc.nbytes
            stage_msg = Stage(bind, side, arena=self.arena.name, inputs=(desc,), mode=self.mode)
            self.sock.send_multipart(stage_msg.to_frames(), copy=False)
            self.counters.send_s += time.perf_counter() - t1
        return Premasked(sk, side, desc, tuple(operand.shape), bind if stage else None)

    def drop_premasked(self, pre: Premasked) -> None:
        """Throw away an operand masked ahead for a product that came with other shapes (or not
        at all); one shipped ahead is released, so neither the off-loader nor a relay keeps it."""
        self._free(pre.desc)
        if pre.bind is not None:
            self.sock.send_multipart(Release(pre.bind).to_frames(), copy=False)
        self.counters.premasks_dropped += 1

    def submit_forward(self, a: torch.Tensor, b: torch.Tensor, bind: Binding,
                       pre: Premasked | None = None) -> Pending:
        """Encrypt ``A``, ``B`` into the arena and send them off; returns a handle for `wait`.

        With `pre`, one operand was masked ahead of time (`premask`) under the key used here."""
        if bind in self._forwards:
            raise ValueError(f"binding {bind} already has a forward in flight or cached")
        m, n, p = a.shape[-2], a.shape[-1], b.shape[-1]
        if pre is not None and (pre.key.shape != (m, n, p) or pre.shape != tuple((a if pre.side == "a" else b).shape)):
            raise ValueError(f"a pre-masked operand of shape {pre.shape} under a {pre.key.shape} key does "
                             f"not fit A {tuple(a.shape)} @ B {tuple(b.shape)}")
        t0 = time.perf_counter()
        key = pre.key if pre is not None else self.keys.key(bind.layer, m, n, p, bind.part)
        product = MaskedProduct(key, a, b, where=f"layer {bind.layer}")  # checks A and B before anything leaves
        self.counters.verify_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        descs = {}
        for side, t in (("a", a), ("b", b)):
            if pre is not None and pre.side == side:
                descs[side] = pre.desc  # masked ahead under this key
                continue
            descs[side], buf = self._alloc(t.shape, t.dtype)
            mask_operand(key, side, t, buf)
            self.counters.forward_encryptions += 1
        c_desc, _ = self._alloc(product.c_shape, a.dtype)
        self.counters.encrypt_s += time.perf_counter() - t0
        if self.observer is not None:
            self.observer("forward", bind, (self.arena.tensor(descs["a"]), self.arena.tensor(descs["b"])), product)
        state = _Forward(product, descs["a"], descs["b"], c_desc)
        self._forwards[bind] = state
        self.counters.forward += 1
        return self._send_forward(state, bind, staged=pre.side if pre is not None else None)

    def _send_forward(self, state: _Forward, bind: Binding, staged: str | None = None) -> Pending:
        """Send a forward; `staged` says its weight operand was shipped ahead (first send only:
        a relay gives a staged operand up with the forward that uses it)."""
        rid = new_request_id()
        pending = Pending(rid, "forward", bind, [state.c_enc])
        self._pending[rid] = pending
        self.counters.bytes_sent += (0 if staged == "a" else state.a_enc.nbytes) + (0 if staged == "b" else state.b_enc.nbytes)
        self._send(rid, bind, "forward", inputs=(state.a_enc, state.b_enc), outputs=(state.c_enc,),
                   staged=staged or None)
        return pending

    def finish_forward(self, pending: Pending) -> torch.Tensor:
        """Wait for a forward part; return ``C = A @ B``, decrypted and verified.

        A result that fails verification gets its relay quarantined (with the evidence) and the
        part computed again elsewhere; so does a part with no answer in time.
        """
        state = self._forwards[pending.bind]
        for attempt in range(self.max_attempts):
            self._wait_or_quarantine(pending)
            t0 = time.perf_counter()
            c = state.product.unmask_c(self.arena.tensor(state.c_enc))
            self.counters.bytes_received += state.c_enc.nbytes
            t1 = time.perf_counter()
            verdict = state.product.verify_c(c, self.rounds, (self.arena.tensor(state.a_enc), self.arena.tensor(state.b_enc)))
            self.counters.decrypt_s += t1 - t0
            self.counters.verify_s += time.perf_counter() - t1
            if verdict.ok:
                self._free(state.c_enc)
                state.c_enc = None
                return c
            self._quarantine(pending, f"forward {pending.bind.to_wire()} failed verification: {verdict.reason}")
            pending = self._send_forward(state, pending.bind)
        raise IntegrityError(f"forward {pending.bind} failed verification on {self.max_attempts} relays")

    def forward(self, a: torch.Tensor, b: torch.Tensor, bind: Binding) -> torch.Tensor:
        return self.finish_forward(self.submit_forward(a, b, bind))

    # -- backward --
    def submit_backward(self, grad_c: torch.Tensor, bind: Binding) -> Pending:
        """Encrypt ``Δᵀ`` only and send it; the relay multiplies with its cached ``A'``, ``B'``."""
        state = self._forwards.get(bind)
        if state is None:
            raise ValueError(f"binding {bind} has no forward to take the backward of")
        t0 = time.perf_counter()
        state.product.check_grad(grad_c)  # finite before it leaves; kept for the checks
        self.counters.verify_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        # D' = mask(Δᵀ; p, m), held as D'ᵀ in Δ's own layout (no transpose copy)
        d_desc, d_buf = self._alloc(grad_c.shape, grad_c.dtype)
        state.product.mask_grad(grad_c, out=d_buf)
        self.counters.backward_encryptions += 1
        if self.observer is not None:
            self.observer("backward", bind, (d_buf,), state.product)
        # T1'ᵀ and T2'ᵀ come back, each summed over the slices its operand was broadcast across
        t1_shape, t2_shape = state.product.grad_shapes(d_desc.shape)
        t1_desc, _ = self._alloc(t1_shape, grad_c.dtype)
        t2_desc, _ = self._alloc(t2_shape, grad_c.dtype)
        self.counters.encrypt_s += time.perf_counter() - t0
        self.counters.backward += 1
        return self._send_backward(state, bind, [d_desc, t1_desc, t2_desc])

    def _send_backward(self, state: _Forward, bind: Binding, outputs: list) -> Pending:
        d_desc, t1_desc, t2_desc = outputs
        rid = new_request_id()
        pending = Pending(rid, "backward", bind, outputs)
        self._pending[rid] = pending
        self.counters.bytes_sent += d_desc.nbytes
        self._send(rid, bind, "backward", inputs=(d_desc,), operands=(state.a_enc, state.b_enc),
                   outputs=(t1_desc, t2_desc))
        return pending

    def finish_backward(self, pending: Pending) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for a backward part; return ``(dL/dA, dL/dB)``, decrypted and verified (with the
        same quarantine-and-recompute policy as `finish_forward`)."""
        state = self._forwards[pending.bind]
        d_desc, t1_desc, t2_desc = pending.outputs
        for attempt in range(self.max_attempts):
            self._wait_or_quarantine(pending)
            t0 = time.perf_counter()
            da, db = state.product.unmask_grads(self.arena.tensor(t1_desc), self.arena.tensor(t2_desc))
            self.counters.bytes_received += t1_desc.nbytes + t2_desc.nbytes
            t1 = time.perf_counter()
            masked = (self.arena.tensor(state.a_enc), self.arena.tensor(state.b_enc), self.arena.tensor(d_desc))
            verdict = state.product.verify_grads(da, db, self.rounds, masked)  # against the plaintext kept here
            self.counters.decrypt_s += t1 - t0
            self.counters.verify_s += time.perf_counter() - t1
            if verdict.ok:
                self._forwards.pop(pending.bind)
                self._free(d_desc, t1_desc, t2_desc, state.a_enc, state.b_enc)
                return da, db
            self._quarantine(pending, f"backward {pending.bind.to_wire()} failed verification: {verdict.reason}")
            pending = self._send_backward(state, pending.bind, [d_desc, t1_desc, t2_desc])
        raise IntegrityError(f"backward {pending.bind} failed verification on {self.max_attempts} relays")

    # -- the policy for misbehaving relays --
    def _quarantine(self, pending: Pending, evidence: str) -> None:
        """Tell the off-loader never to use this part's relay again (it answered wrongly)."""
        self.counters.failed_verifications += 1
        if self.log:
            self.log.warning("client.verification_failed", relay=pending.relay, evidence=evidence)
        self.sock.send_multipart(Quarantine(relay=pending.relay, reason=evidence).to_frames(), copy=False)

    def _wait_or_quarantine(self, pending: Pending) -> None:
        """Wait for a part; if its relay stays silent past the part timeout, quarantine that relay
        (the off-loader sends the part elsewhere) and wait again."""
        for attempt in range(self.max_attempts):
            lost_before = self._lost_relays()
            try:
                self.wait(pending, timeout_s=self.part_timeout_s)
                return
            except PartTimeout:
                self.counters.timeouts += 1
                if self.log:
                    self.log.warning("client.part_timeout", bind=pending.bind.to_wire(), seconds=self.part_timeout_s)
                if self._lost_relays() > lost_before:
                    # A relay of ours was lost meanwhile and its parts went to the others: this one
                    # may have reached its new relay a moment ago, which is not to blame. Wait again.
                    continue
                self.sock.send_multipart(
                    Quarantine(id=pending.rid, reason=f"no answer within {self.part_timeout_s}s").to_frames(),
                    copy=False)
            except OffloadError as exc:
                if exc.code is ErrorCode.NO_RELAY:
                    raise NoHealthyRelay(f"{pending.kind} {pending.bind}: no healthy relay left "
                                         f"({len(self.relay_events)} quarantined or lost)") from None
                raise
        raise NoHealthyRelay(f"{pending.kind} {pending.bind}: no answer after {self.max_attempts} relays")

    def _lost_relays(self) -> int:
        return sum(e["event"] == "lost" for e in self.relay_events)

    def backward(self, grad_c: torch.Tensor, bind: Binding) -> tuple[torch.Tensor, torch.Tensor]:
        return self.finish_backward(self.submit_backward(grad_c, bind))

    def release(self, bind: Binding) -> None:
        """Forget a forward that will have no backward (inference): free its regions, and have
        the relay drop its cached operands."""
        state = self._forwards.pop(bind, None)
        if state is not None:
            self._free(state.a_enc, state.b_enc, state.c_enc)
        self.sock.send_multipart(Release(bind).to_frames(), copy=False)

    def submit_masked(self, bind: Binding, inputs: list[Descriptor], outputs: list[Descriptor]) -> Pending:
        """Submit a forward of operands already masked in the arena (the transport benchmark)."""
        rid = new_request_id()
        pending = Pending(rid, "forward", bind, outputs)
        self._pending[rid] = pending
        self._send(rid, bind, "forward", inputs=tuple(inputs), outputs=tuple(outputs))
        return pending

    # -- sealed parts: the shares mode (tempo.enclave.pools) --
    def alloc_blob(self, nbytes: int) -> tuple[Descriptor, memoryview]:
        """A region of the arena for a sealed blob, and its memory to seal into; `free_blob`."""
        desc, buf = self._alloc((nbytes,), torch.uint8)
        return desc, memoryview(buf.numpy())

    def free_blob(self, *descs: Descriptor | None) -> None:
        self._free(*descs)

    def submit_sealed(self, pool: str, bind: Binding, inputs: list[Descriptor], answer_nbytes: int) -> Pending:
        """Send one pool's sealed request (forward: one blob; backward: the forward's and the
        backward's); the off-loader gives it to a relay of `pool` only. `finish_sealed` waits."""
        out, _ = self._alloc((answer_nbytes,), torch.uint8)
        rid = new_request_id()
        pending = Pending(rid, "sealed", bind, [*inputs, out], kind_pool=pool)
        self._pending[rid] = pending
        self._send(rid, bind, "sealed", pool=pool, inputs=tuple(inputs), outputs=(out,))
        return pending

    def finish_sealed(self, pending: Pending) -> memoryview:
        """Wait for a sealed part (a silent relay is quarantined and the part sent to another of
        its pool); return the sealed answer where it lies in the arena (valid until `blame` or
        `free_blob` of ``pending.outputs[-1]``)."""
        self._wait_or_quarantine(pending)
        return self.arena.buffer(pending.outputs[-1])

    def blame(self, pending: Pending, evidence: str) -> Pending:
        """Quarantine the relay that answered `pending` (its answer failed verification) and send
        the same request again: the off-loader picks another member of the same pool."""
        self._quarantine(pending, evidence)
        *inputs, out = pending.outputs
        self._free(out)
        pool = pending.kind_pool
        return self.submit_sealed(pool, pending.bind, inputs, out.nbytes)

    def pools(self, timeout_s: float = 5.0) -> dict[str, int]:
        """Relays per pool at the off-loader (protocol 2.2)."""
        return dict(self._ping(timeout_s).pools or {})

    def wait_for_pools(self, names: list[str], timeout_s: float = 30.0) -> None:
        """Wait until every pool in `names` has a relay; then a clear error naming the missing."""
        deadline = time.monotonic() + timeout_s
        while True:
            have = self.pools()
            missing = [n for n in names if have.get(n, 0) < 1]
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise OffloadError(f"the shares mode needs a relay in each of the pools {', '.join(names)}; none "
                                   f"joined for {', '.join(missing)} within {timeout_s:g}s (start them with "
                                   f"`tempo relay --pool NAME --pool-key FILE`)")
            time.sleep(0.05)

    # -- replies --
    def wait(self, pending: Pending, timeout_s: float | None = None) -> None:
        """Block until `pending` is answered; raise `OffloadError` on an error reply, or
        `PartTimeout` after `timeout_s` (default: the client's timeout)."""
        t0 = time.perf_counter()
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        try:
            while pending.rid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PartTimeout(f"{pending.kind} {pending.bind} timed out after {timeout_s}s")
                self._check_offloader()
                if self.sock.poll(int(min(left, 0.5) * 1000) + 1):
                    self._receive()
            reply = self._replies.pop(pending.rid)
            self._pending.pop(pending.rid, None)
            if isinstance(reply, Error):
                if reply.code is ErrorCode.MODE_MISMATCH:  # this job's mistake: no relay to blame, nothing to retry
                    raise OffloadError(f"{pending.kind} {pending.bind} refused in protection mode {self.mode!r}: "
                                       f"{reply.reason}", reply.code)
                raise OffloadError(f"{pending.kind} {pending.bind} failed: {reply.reason}", reply.code)
            pending.relay = reply[1]
            self.counters.parts_by_relay[pending.relay] = self.counters.parts_by_relay.get(pending.relay, 0) + 1
            self.counters.relay_compute_s += reply[2]
            self.counters.turnaround_s += reply[3]
        finally:
            self.counters.wait_s += time.perf_counter() - t0

    def _check_offloader(self) -> None:
        """Raise `OffloaderGone` if the off-loader died (watchdog) or has been silent too long;
        ping it when it has been quiet for a while (a slow relay keeps it quiet, not dead)."""
        if self.watchdog is not None:
            self.watchdog()
        now = time.monotonic()
        silent = now - self._last_heard
        if silent > self.offloader_silence_s:
            raise OffloaderGone(f"the off-loader has not answered for {silent:.0f}s (is it running?)")
        if silent > self.offloader_silence_s / 3 and now - self._probe_at > self.offloader_silence_s / 3:
            self._probe_at = now
            self.sock.send_multipart(Ping(id=new_request_id()).to_frames(), copy=False)

    def _receive(self) -> None:
        frames = self.sock.recv_multipart(copy=False)
        self._last_heard = time.monotonic()
        try:
            msg = parse([f.buffer for f in frames], TO_ENCLAVE, max_frame_bytes=0)
        except ProtocolError as exc:
            if self.log:
                self.log.warning("client.bad_reply", reason=str(exc))
            return
        if isinstance(msg, RelayEvent):
            event = {"relay": msg.relay[:500], "event": msg.event[:500], "reason": (msg.reason or "")[:500]}
            self.relay_events.append(event)
            if self.log:
                self.log.warning("client.relay_event", relay=event["relay"], what=event["event"],
                                 reason=event["reason"])
            return
        rid = msg.id
        if isinstance(msg, Pong) or (isinstance(msg, Error) and rid in self._pings):
            if rid in self._pings:  # a liveness probe's pong only counts as having heard it
                self._pings.discard(rid)
                self._replies[rid] = msg
            return
        pending = self._pending.get(rid) if rid else None
        # An error about one of our control messages carries our id but no binding; an error can
        # only fail a request, never deliver data, so the id alone is enough for it.
        bind_ok = msg.bind == pending.bind if pending else False
        if isinstance(msg, Error) and pending is not None and msg.bind is None:
            bind_ok = True
        if pending is None or not bind_ok or rid in self._replies:
            self.counters.unmatched_replies += 1
            if self.log:
                self.log.warning("client.unmatched_reply", op=msg.OP, id=str(rid)[:64])
            return
        if isinstance(msg, Done):
            if msg.staged is True:
                self.counters.staged_forwards += 1
            timing = [t or 0.0 for t in (msg.relay_s, msg.turnaround_s)]
            timing = [float(t) if t < 1e6 else 0.0 for t in timing]
            self._replies[rid] = ("done", msg.relay or "", *timing)
        else:
            self._replies[rid] = msg  # an Error

    def _ping(self, timeout_s: float) -> Pong:
        """Ping the off-loader; return its pong. Replies to parts in flight that come
        meanwhile are kept for their `wait`."""
        rid = new_request_id()
        self._pings.add(rid)
        self.sock.send_multipart(Ping(id=rid).to_frames(), copy=False)
        deadline = time.monotonic() + timeout_s
        try:
            while rid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OffloaderGone(f"the off-loader did not answer a ping within {timeout_s:g}s")
                if self.watchdog is not None:
                    self.watchdog()
                if self.sock.poll(int(min(left, 0.5) * 1000) + 1):
                    self._receive()
        finally:
            self._pings.discard(rid)
        reply = self._replies.pop(rid)
        if isinstance(reply, Error):
            raise OffloadError(f"the off-loader refused a ping: {reply.reason}", reply.code)
        return reply

    def ping(self, timeout_s: float = 5.0) -> int:
        """Ask the off-loader how many relays it has; raises `OffloaderGone` if it does not answer."""
        return self._ping(timeout_s).relays or 0

    def offloader_tables(self, timeout_s: float = 5.0) -> dict[str, int]:
        """The sizes of the off-loader's tables (parts in flight and waiting, affinity, staged
        operands, arenas, jobs, quarantined relays, …), from a ping: what a long job must not
        make grow. Empty from an off-loader older than protocol 2.1."""
        return dict(self._ping(timeout_s).tables or {})

    def wait_for_relays(self, count: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ping() >= count:
                return
            time.sleep(0.05)
        raise OffloadError(f"fewer than {count} relays joined within {timeout_s}s")

    def close(self) -> None:
        try:
            self.sock.send_multipart(ReleaseJob(self.job, arena=self.arena.name).to_frames(), copy=False)
        except zmq.ZMQError:
            pass
        self.sock.close(linger=0)
        self.arena.close()

    def __enter__(self) -> OffloadClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def default_job_id() -> str:
    return f"job{os.getpid()}{new_request_id()[:6]}"
