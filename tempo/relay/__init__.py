"""GPU relay (untrusted): multiplies masked operands and keeps them for the backward pass.

A relay connects a DEALER socket to the off-loader's relay endpoint, announces itself
(``ready`` with its device and free memory), sends heartbeats, and serves requests from an
explicit ``{message class: handler}`` table. Forward: ``C' = A' @ B'``, with ``A'`` and ``B'`` kept on the
device under their binding (job, step, layer, part). Backward: ``T1' = B' @ D'`` and
``T2' = D' @ A'`` from the cached operands. The cache has a memory bound; the oldest entries go
first. Anything malformed gets an ``error`` reply and a log line; the relay keeps serving (no
message makes `Relay.handle` raise).

Each job is in one protection mode (protocol 2.4, `tempo.protocol.MODES`), the mode of the first
request the relay gets for it: a request in another mode, or a forward or backward whose staged
or cached operand came in another, is refused (``mode_mismatch``). ``release_job`` forgets it.
In mode ``asymml`` the operands are plaintext weights and noisy residuals, unmasked by design.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
import zmq

from tempo.core.products import relay_backward, relay_forward
from tempo.protocol import (
    MODES,
    TO_RELAY,
    Backward,
    BackwardFull,
    Binding,
    ErrorCode,
    Forward,
    Heartbeat,
    Ping,
    Pong,
    ProtocolError,
    Ready,
    Release,
    ReleaseJob,
    Result,
    Sealed,
    Stage,
    error_frames,
    inputs_digest,
    parse,
)


FAULT_MODES = ("corrupt", "nan", "lazy", "slow", "drop", "crash", "malformed", "noise")


@dataclass(frozen=True)
class Fault:
    """A misbehaviour to inject, for tests and demos: ``MODE[:RATE]`` (RATE per request, default 1).

    corrupt: one entry or a rank-1 change; nan: a NaN entry; lazy: zeros or a stale result;
    slow: replies after `slow_s` without heartbeats; drop: never replies (keeps heartbeating);
    crash: exits in the middle of a job; malformed: a result of the wrong dtype or shape;
    noise: adds ``+s, −s, +s, …`` along each row, ``s = noise_x · max|C|``, to every tensor of
    the result (balanced: a row's noise sums to 0 or ``s``, so row sums barely show it).
    `slow_s` and `noise_x` come from ``TEMPO_FAULT_SLOW_S`` and ``TEMPO_FAULT_NOISE_X``.
    """

    mode: str
    rate: float = 1.0
    slow_s: float = 30.0
    noise_x: float = 10.0

    @classmethod
    def parse(cls, text: str) -> Fault:
        mode, _, rate = text.partition(":")
        if mode not in FAULT_MODES:
            raise ValueError(f"fault mode must be one of {', '.join(FAULT_MODES)}, not {mode!r}")
        try:
            value = float(rate) if rate else 1.0
        except ValueError:
            raise ValueError(f"fault rate {rate!r} is not a number") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError("fault rate must be in [0, 1]")
        return cls(mode, value, float(os.environ.get("TEMPO_FAULT_SLOW_S", "30")),
                   float(os.environ.get("TEMPO_FAULT_NOISE_X", "10")))


@dataclass
class CacheEntry:
    a: torch.Tensor
    b: torch.Tensor
    nbytes: int
    mode: str = "masked"  # the protection mode they came in (protocol 2.4)


class OperandCache:
    """Masked operands per binding, on the relay's device, bounded in bytes (oldest out first)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Binding, CacheEntry] = OrderedDict()
        self.nbytes = 0
        self.evicted = 0

    def put(self, bind: Binding, a: torch.Tensor, b: torch.Tensor, mode: str = "masked") -> None:
        size = a.numel() * a.element_size() + b.numel() * b.element_size()
        self.pop(bind)
        if size > self.max_bytes:
            return  # cannot hold it: the backward pass will come with its operands
        while self.nbytes + size > self.max_bytes and self.entries:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes
            self.evicted += 1
        self.entries[bind] = CacheEntry(a, b, size, mode)
        self.nbytes += size

    def pop(self, bind: Binding) -> CacheEntry | None:
        entry = self.entries.pop(bind, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        return entry

    def release_job(self, job: str) -> int:
        doomed = [k for k in self.entries if k.job == job]
        for k in doomed:
            self.pop(k)
        return len(doomed)


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class Relay:
    """One relay process: one device, one connection to the off-loader."""

    def __init__(
        self,
        endpoint: str,
        device: str = "cpu",
        cache_bytes: int = 1 << 30,
        heartbeat_s: float = 0.5,
        max_frame_bytes: int = 1 << 30,
        log=None,
        name: str | None = None,
        fault: Fault | None = None,
        curve_secret: str | None = None,
        curve_server_key: str | None = None,
        record_dir: str | None = None,
        pool: str | None = None,
        pool_key: bytes | None = None,
    ) -> None:
        if (pool is None) != (pool_key is None):
            raise ValueError("a pool member needs both its pool's name and its key")
        # the shares mode: a member of `pool` opens blobs sealed under `pool_key` and serves only them
        self.pool, self._pool_key = pool, pool_key
        if (curve_secret is None) != (curve_server_key is None):
            raise ValueError("CURVE needs both the relay's secret key and the off-loader's public key")
        self.curve_secret, self.curve_server_key = curve_secret, curve_server_key
        self.endpoint = endpoint
        self.name = name or f"{os.uname().nodename}:{os.getpid()}"
        self.fault = fault
        self._rng = random.Random(os.urandom(16))
        self._stale: dict[tuple, list[torch.Tensor]] = {}
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
            torch.cuda.set_device(self.device)
        self.cache = OperandCache(cache_bytes)
        self.heartbeat_s = heartbeat_s
        self.max_frame_bytes = max_frame_bytes
        self.log = log
        self.served = 0
        self.recorder = None
        if record_dir is not None:  # what this relay receives, kept for audits (`tempo audit`)
            from tempo.relay.record import Recorder

            self.recorder = Recorder(record_dir, self.name, str(self.device))
            if self.log:
                self.log.warning("relay.recording", dir=str(self.recorder.dir),
                                 note="every request's op, binding and tensors are written to disk")
        self.handlers = {
            Forward: self._forward,
            Backward: self._backward,
            BackwardFull: self._backward_full,
            Release: self._release,
            ReleaseJob: self._release_job,
            Ping: self._ping,
            Stage: self._stage,
            Sealed: self._sealed,
        }
        assert set(self.handlers) == TO_RELAY
        # operands shipped ahead of their forward (the pipeline), by binding: (slot, tensor, mode)
        self.staged: OrderedDict[Binding, tuple[str, torch.Tensor, str]] = OrderedDict()
        self.max_staged = 256
        # each job's protection mode, from its first request, until release_job (protocol 2.4)
        self.job_modes: dict[str, str] = {}

    # -- device transfers --
    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            # No copy: a tensor made by torch.frombuffer holds a reference to the received frame,
            # so the frame's memory lives as long as the cached operand does.
            return t
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        pinned.copy_(t)
        return pinned.to(self.device, non_blocking=True)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous() if self.device.type == "cpu" else t.to("cpu").contiguous()

    @staticmethod
    def _check_chain(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
        if x.dim() < 2 or y.dim() < 2 or x.shape[-1] != y.shape[-2]:
            raise ProtocolError(f"{what}: shapes {tuple(x.shape)} and {tuple(y.shape)} do not multiply")
        if x.dtype != y.dtype:
            raise ProtocolError(f"{what}: dtypes differ ({x.dtype}, {y.dtype})")
        try:
            torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
        except RuntimeError:
            raise ProtocolError(f"{what}: batch shapes do not broadcast") from None

    def _hold_mode(self, bind: Binding, mode: str, op: str) -> None:
        """Hold `bind`'s job to one protection mode: the first request's; refuse any other."""
        if mode not in MODES:  # the codec checked it on arrival; this guards in-process callers
            raise ProtocolError(f"unknown protection mode {mode[:32]!r}")
        held = self.job_modes.setdefault(bind.job, mode)
        if held != mode:
            raise ProtocolError(f"job {bind.job[:128]!r} is in protection mode {held!r} on this relay; a {op} in mode "
                                f"{mode!r} is refused (a job never mixes modes)", ErrorCode.MODE_MISMATCH)

    # -- handlers: each returns (tensors, extra header fields) --
    def _stage(self, msg: Stage):
        """Keep a weight operand shipped ahead of its forward (no reply)."""
        slot = msg.slot  # a or b (protocol.FIELDS)
        if len(msg.tensors) != 1:
            raise ProtocolError("stage takes one tensor and a slot, a or b")
        self._hold_mode(msg.bind, msg.mode, "stage")
        self.staged.pop(msg.bind, None)
        self.staged[msg.bind] = (slot, self._to_device(msg.tensors[0]), msg.mode)
        while len(self.staged) > self.max_staged:
            self.staged.popitem(last=False)
        return None

    def _forward(self, msg: Forward):
        self._hold_mode(msg.bind, msg.mode, "forward")
        held = self.staged.pop(msg.bind, None)
        slot = msg.staged
        if slot is not None:  # one operand came ahead (stage); the other comes now
            if len(msg.tensors) != 1:
                raise ProtocolError("a staged forward takes one tensor and staged = a or b")
            if held is None or held[0] != slot:
                raise ProtocolError("no staged operand for this binding", ErrorCode.STAGE_MISS)
            if held[2] != msg.mode:
                raise ProtocolError(f"the operand staged for this binding came in mode {held[2]!r}, the forward in "
                                    f"mode {msg.mode!r}", ErrorCode.MODE_MISMATCH)
            now = msg.tensors[0]
            self._check_chain(*((held[1], now) if slot == "a" else (now, held[1])), "forward")
            now = self._to_device(now)  # the staged one is on the device already
            a_d, b_d = (held[1], now) if slot == "a" else (now, held[1])
        else:
            if len(msg.tensors) != 2:
                raise ProtocolError("forward takes two tensors, A' and B'")
            a, b = msg.tensors
            self._check_chain(a, b, "forward")
            a_d, b_d = self._to_device(a), self._to_device(b)
        c = relay_forward(a_d, b_d)
        self.cache.put(msg.bind, a_d, b_d, msg.mode)
        return [self._to_host(c)]

    def _backward_from(self, a: torch.Tensor, b: torch.Tensor, e: torch.Tensor):
        return [self._to_host(t) for t in relay_backward(a, b, e)]

    def _backward(self, msg: Backward):
        if len(msg.tensors) != 1:
            raise ProtocolError("backward takes one tensor, D'ᵀ")
        self._hold_mode(msg.bind, msg.mode, "backward")
        entry = self.cache.entries.get(msg.bind)
        if entry is not None and entry.mode != msg.mode:  # kept: they are the job's, not this request's
            raise ProtocolError(f"the operands cached for this binding came in mode {entry.mode!r}, the backward "
                                f"in mode {msg.mode!r}", ErrorCode.MODE_MISMATCH)
        entry = self.cache.pop(msg.bind)
        if entry is None:
            raise ProtocolError("no cached operands for this binding", ErrorCode.CACHE_MISS)
        return self._backward_from(entry.a, entry.b, self._to_device(msg.tensors[0]))

    def _backward_full(self, msg: BackwardFull):
        if len(msg.tensors) != 3:
            raise ProtocolError("backward_full takes A', B' and D'ᵀ")
        self._hold_mode(msg.bind, msg.mode, "backward_full")
        a, b, d = (self._to_device(t) for t in msg.tensors)
        self.cache.pop(msg.bind)
        return self._backward_from(a, b, d)

    def _sealed(self, msg: Sealed):
        """The shares mode: open the pool's request (a forward's, and for a backward the
        backward's too), compute this pool's share of the product, seal the answer."""
        from tempo.core.shares import pool_answer
        from tempo.protocol import sealed

        if self.pool is None:
            raise ProtocolError("this relay is in no pool")
        if msg.pool != self.pool:
            raise ProtocolError(f"a part for pool {msg.pool[:64]!r} reached a member of {self.pool!r}")
        if not 1 <= len(msg.tensors) <= 4 or any(t.dtype != torch.uint8 or t.dim() != 1 for t in msg.tensors):
            raise ProtocolError("sealed takes one to four sealed blobs (uint8)")
        bind = msg.bind
        self._hold_mode(bind, "masked", "sealed part")  # the shares mode's parts are never asymml
        blobs = [memoryview(t.numpy()) for t in msg.tensors]
        requests, i = [], 0
        for what in ("forward", "backward"):  # each: a head under the pool's key, and its bulk blob if it names one
            if i == len(blobs):
                break
            head = sealed.open_head(self._pool_key, sealed.associated(self.pool, bind, f"request-{what}"), blobs[i])
            i += 1
            tensors = ()
            bulk = head.pop("bulk", None)
            if bulk is not None:
                if i == len(blobs) or not isinstance(bulk, bytes):
                    raise ProtocolError("a head names a bulk blob that did not come")
                tensors = sealed.open_tensors(bulk, sealed.associated("bulk", bind, f"request-{what}"), blobs[i],
                                              sealed.check_shapes(head.pop("shapes", None)))
                i += 1
            requests.append((head, tensors))
        if i != len(blobs):
            raise ProtocolError("sealed takes a forward head (and bulk), then a backward head (and bulk)")
        forward, backward = requests[0], (requests[1] if len(requests) == 2 else None)
        if self.recorder is not None:  # a pool member's view: the opened requests (their bulk keys left out)
            for what, (header, tensors) in zip(("forward", "backward"), requests):
                self.recorder.write("sealed", {"bind": bind.to_wire(), "pool": self.pool, "part": what,
                                               "request": header}, list(tensors))  # mode: masked
        try:
            out = pool_answer(forward, backward)
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ProtocolError(f"a sealed request does not describe a pool product ({type(exc).__name__})") from None
        out = self._ring_lie(list(out))
        what = "answer-backward" if backward else "answer-forward"
        parts = [t.contiguous() for t in out]
        blob = torch.empty(sealed.sealed_size(parts), dtype=torch.uint8)
        sealed.seal_into(self._pool_key, sealed.associated(self.pool, bind, what), parts, memoryview(blob.numpy()))
        return [blob]

    def _release(self, msg: Release):
        self.cache.pop(msg.bind)
        self.staged.pop(msg.bind, None)
        return None

    def _release_job(self, msg: ReleaseJob):
        self.cache.release_job(msg.job)
        for key in [k for k in self.staged if k.job == msg.job]:
            del self.staged[key]
        self.job_modes.pop(msg.job, None)
        return None

    def _ping(self, msg: Ping):
        if msg.bind is None:  # a relay's requests all name their binding
            raise ProtocolError("bind must be [job: str, step: int, layer: int, part: int]")
        return []

    # -- the loop --
    def _ready_frames(self, cls: type[Ready] = Ready) -> list:
        return cls(device=str(self.device), free_memory=_free_memory(self.device), cache_bytes=self.cache.nbytes,
                   name=self.name[:255], pool=self.pool).to_frames()

    def handle(self, frames: list) -> list | None:
        """Decode one request and produce the reply frames (``None``: nothing to send back).
        Never raises: whatever goes wrong becomes an ``error`` reply and a log line."""
        try:
            msg = parse(frames, TO_RELAY, self.max_frame_bytes)
        except ProtocolError as exc:
            self._warn("relay.bad_message", reason=str(exc))
            return error_frames(str(exc), code=exc.code)
        except Exception as exc:  # noqa: BLE001 - one message must never stop the relay
            self._warn("relay.handler_failed", op=None, error=type(exc).__name__, reason=str(exc)[:300])
            return error_frames(f"the relay failed on this message ({type(exc).__name__})", code=ErrorCode.INTERNAL)
        rid, bind = getattr(msg, "id", None), getattr(msg, "bind", None)
        try:
            digest = getattr(msg, "digest", None)
            if digest is not None and digest != inputs_digest(frames[1:]):
                raise ProtocolError("inputs do not match the request's digest", ErrorCode.DIGEST_MISMATCH)
            if self.recorder is not None and not isinstance(msg, Sealed):  # sealed: recorded opened
                self.recorder.write(msg.OP, msg.header(), list(getattr(msg, "tensors", ())))
            t0 = time.perf_counter()
            out = self.handlers[type(msg)](msg)
            compute_s = time.perf_counter() - t0  # results are on the host by now (synchronized)
            if out is None:
                return None
            self.served += 1
            if isinstance(msg, Ping):
                return Pong(id=rid, bind=bind).to_frames()
            if not isinstance(msg, Sealed) or (self.fault is not None and self.fault.mode not in self.RING_LIES):
                out = self._misbehave(out)  # a pool member's value lies were told before sealing
            if out is None:
                return None
            return Result(rid, bind, compute_s=round(compute_s, 6), digest=digest, tensors=tuple(out)).to_frames()
        except ProtocolError as exc:
            self._warn("relay.request_failed", op=msg.OP, reason=str(exc))
            return error_frames(str(exc), rid, bind, exc.code)
        except (LookupError, RuntimeError, ValueError) as exc:
            self._warn("relay.request_failed", op=msg.OP, reason=str(exc))
            return error_frames(str(exc), rid, bind, ErrorCode.COMPUTE_FAILED)
        except Exception as exc:  # noqa: BLE001 - one message must never stop the relay
            self._warn("relay.handler_failed", op=msg.OP, error=type(exc).__name__, reason=str(exc)[:300])
            return error_frames(f"the relay failed on this request ({type(exc).__name__})", rid, bind,
                                ErrorCode.INTERNAL)

    RING_LIES = ("corrupt", "nan", "lazy", "noise")  # on a pool member: a wrong ring answer, sealed properly

    def _ring_lie(self, out: list[torch.Tensor]) -> list[torch.Tensor]:
        """A pool member's injected lie: a well-formed, properly sealed, wrong share (one entry
        off by a random amount, or zeros for lazy), which only the enclave's exact check finds."""
        fault = self.fault
        if fault is None or fault.mode not in self.RING_LIES or self._rng.random() >= fault.rate:
            return out
        if self.log:
            self.log.warning("relay.fault_injected", mode=fault.mode, pool=self.pool)
        if fault.mode == "lazy":
            return [torch.zeros_like(t) for t in out]
        out = [t.contiguous() for t in out]  # answers may be transposed views
        t = out[self._rng.randrange(len(out))]
        if t.numel():
            t.view(-1)[self._rng.randrange(t.numel())] += self._rng.randrange(1, 1 << 20)
        return out

    def _misbehave(self, out: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Apply the injected fault, if any, to a result about to be sent."""
        fault = self.fault
        if fault is None:
            return out
        key = tuple(tuple(t.shape) for t in out)
        honest = [t.clone() for t in out]
        if self._rng.random() >= fault.rate:
            self._stale[key] = honest
            return out
        if self.log:
            self.log.warning("relay.fault_injected", mode=fault.mode)
        if fault.mode == "corrupt":
            t = out[self._rng.randrange(len(out))]
            if t.numel() and self._rng.random() < 0.5:
                t.view(-1)[self._rng.randrange(t.numel())] += 1.0 + t.abs().max()
            elif t.dim() >= 2 and t.numel():
                u = torch.randn(*t.shape[:-1], 1, dtype=t.dtype)
                v = torch.randn(*t.shape[:-2], 1, t.shape[-1], dtype=t.dtype)
                t += (1.0 + t.abs().max()) * (u @ v)
        elif fault.mode == "nan":
            t = out[0]
            if t.numel():
                t.view(-1)[self._rng.randrange(t.numel())] = float("nan")
        elif fault.mode == "lazy":
            stale = self._stale.get(key)
            out = stale if stale is not None and self._rng.random() < 0.5 else [torch.zeros_like(t) for t in out]
        elif fault.mode == "slow":
            time.sleep(fault.slow_s)
        elif fault.mode == "drop":
            return None
        elif fault.mode == "crash":
            os._exit(3)
        elif fault.mode == "malformed":
            i = self._rng.randrange(len(out))
            t = out[i]
            if self._rng.random() < 0.5:
                out[i] = t.to(torch.float32 if t.dtype == torch.float64 else torch.float64)
            else:  # one column too many
                out[i] = torch.nn.functional.pad(t, (0, 1))
        elif fault.mode == "noise":
            for t in out:
                if t.numel():
                    signs = torch.ones(t.shape[-1], dtype=t.dtype)
                    signs[1::2] = -1.0
                    t += fault.noise_x * t.abs().max() * signs
        self._stale[key] = honest
        return out

    def _warn(self, event: str, **kw) -> None:
        if self.log is not None:
            self.log.warning(event, **kw)

    def _warm_up(self) -> None:
        """One small product before ``ready``.

        The first product on a device pays one-time costs (the thread pool, BLAS set-up; on a
        GPU the CUDA context and cuBLAS handle, which take up to seconds). Paid here, they do
        not land on a real part's deadline, where the off-loader would count them as a relay
        that does not answer.
        """
        x = torch.ones(2, 64, 64, device=self.device)
        (x @ x).sum().item()  # .item() waits for the device

    def run(self, stop: callable = lambda: False, context: zmq.Context | None = None) -> None:
        """Serve until `stop()` returns true (checked at least every heartbeat).

        Requests are computed one after another on a worker thread, in the order they came;
        this thread only moves messages and sends heartbeats, so a relay busy with a long
        product (seconds on a GPU, or a CPU shared with other processes) stays alive to the
        off-loader, and a part that takes too long is the part timeout's business."""
        ctx = context or zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # the relay's name is its routing identity: the off-loader's logs and quarantine use it
        sock.setsockopt(zmq.IDENTITY, self.name.encode()[:255])
        if self.curve_secret:
            from tempo import curve

            curve.connect_as(sock, self.curve_secret, self.curve_server_key)
        sock.connect(self.endpoint)
        wake_address = f"inproc://relay-wake-{id(self)}"
        wake_rx = ctx.socket(zmq.PAIR)
        wake_rx.setsockopt(zmq.LINGER, 0)
        wake_rx.bind(wake_address)
        requests: queue.Queue = queue.Queue()
        replies: queue.Queue = queue.Queue()

        def work() -> None:
            wake_tx = ctx.socket(zmq.PAIR)  # a socket belongs to one thread: this one is the worker's
            wake_tx.setsockopt(zmq.LINGER, 0)
            wake_tx.connect(wake_address)
            try:
                while (frames := requests.get()) is not None:
                    replies.put(self.handle([f.buffer for f in frames]))
                    wake_tx.send(b"")
            finally:
                wake_tx.close(linger=0)

        worker = threading.Thread(target=work, name="relay-compute", daemon=True)
        try:
            self._warm_up()
            worker.start()
            sock.send_multipart(self._ready_frames(), copy=False)
            if self.log:
                self.log.info("relay.ready", endpoint=self.endpoint, device=str(self.device), name=self.name,
                              fault=f"{self.fault.mode}:{self.fault.rate}" if self.fault else None)
            last_beat = time.monotonic()
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(wake_rx, zmq.POLLIN)
            while not stop():
                events = dict(poller.poll(int(self.heartbeat_s * 1000)))
                if sock in events:
                    while True:  # hand every waiting request to the worker
                        try:
                            requests.put(sock.recv_multipart(zmq.NOBLOCK, copy=False))
                        except zmq.Again:
                            break
                if wake_rx in events:
                    while True:
                        try:
                            wake_rx.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                    while not replies.empty():
                        reply = replies.get()
                        if reply is not None:
                            sock.send_multipart(reply, copy=False)
                if time.monotonic() - last_beat >= self.heartbeat_s:
                    sock.send_multipart(self._ready_frames(Heartbeat), copy=False)
                    last_beat = time.monotonic()
        finally:
            requests.put(None)
            worker.join(timeout=1.0)  # one still computing dies with the process (daemon)
            sock.close(linger=0)
            wake_rx.close(linger=0)
