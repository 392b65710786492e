"""The shares mode's engine: every product secret-shared across three relay pools.

`SharesEngine` has the engines' interface (`forward`, `backward`, `release`, `end_step`,
`close`), so `PrivateLinear`, `PrivateConv2d` (through its im2col product) and training use it
as they use the masking engines. Per product it opens ``E, F`` (`shares.open_forward`), sends
each pool its request, and combines the three answers after checking their ring sum exactly
(`shares.combine_forward`); a backward reuses the forward's ``E, F`` and opens only ``G``. When a
sum fails, each pool's answer is checked against what that pool was sent
(`shares.honest_answer_check`): the liar's relay is quarantined and its request sent again to
another member of the same pool.

How requests reach the pools is a transport's business:

- `LocalPools`: in this process, each pool a list of members (callables), for tests, audits and
  single-process runs; an observer sees exactly what each pool receives.
- `RelayPools`: through the off-loader to relay processes started with ``tempo relay --pool NAME
  --pool-key FILE``, every request and answer sealed under its pool's key
  (`tempo.protocol.sealed`), so the off-loader, which routes all three, reads none.

A pool's members hold the same key and compute the same function; pools must be in separate
trust domains (README: the shares mode).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tempo.core import shares
from tempo.enclave.private import EngineCounters
from tempo.core.verify import IntegrityError
from tempo.protocol import Binding

POOL_NAMES = ("p1", "p2", "p3")  # default names of the three pools (roles 1, 2, 3)


@dataclass
class SharesCounters:
    """Per run: the enclave's time by stage, and what travelled."""

    open_s: float = 0.0  # encoding, expanding seeds, E = A − U (forward and backward)
    seal_s: float = 0.0  # sealing requests and opening answers (RelayPools)
    combine_s: float = 0.0  # summing the answers, the exact check, decoding
    blame_s: float = 0.0  # per-pool checks after a failed sum
    wait_s: float = 0.0
    bytes_sent: int = 0  # request bytes handed to the pools (each pool's copy counted)
    bytes_received: int = 0
    failed_sums: int = 0
    blamed: dict = field(default_factory=dict)  # pool -> answers found wrong


class LocalPools:
    """Three pools in this process: ``members[role]`` is a list of callables, each computing its
    pool's answer (`shares.pool_answer` for an honest one). A member found lying is dropped and
    the next takes over. `observer(role, bind, what, header, tensors)` sees every request."""

    def __init__(self, members: dict[int, list] | None = None, observer=None) -> None:
        self.members = members or {role: [shares.pool_answer] for role in shares.ROLES}
        missing = [r for r in shares.ROLES if not self.members.get(r)]
        if missing:
            raise ValueError(f"the shares mode needs three pools; none for role(s) {missing}")
        self.observer = observer
        self.quarantined: list[tuple[int, str]] = []

    def check(self) -> None:
        """Nothing to wait for: the pools are here."""

    def send(self, bind: Binding, op: shares.Opened, backward: bool, counters: SharesCounters, prior=None) -> dict:
        handles = {}
        for role in shares.ROLES:
            forward = op.requests[role]
            request = op.grad_requests[role] if backward else None
            if self.observer is not None:
                self.observer(role, bind, "backward" if backward else "forward", *(request or forward))
            counters.bytes_sent += sum(t.numel() * 8 for t in (request or forward)[1])
            handles[role] = (role, forward, request)
        return handles

    def receive(self, handle, counters: SharesCounters) -> tuple[torch.Tensor, ...]:
        role, forward, backward = handle
        t0 = time.perf_counter()
        try:
            return self.members[role][0](forward, backward)
        finally:
            counters.wait_s += time.perf_counter() - t0  # the pools' own work, as a relay's would be

    def blame(self, handle, evidence: str, counters: SharesCounters):
        role = handle[0]
        self.quarantined.append((role, evidence))
        self.members[role].pop(0)
        if not self.members[role]:
            raise IntegrityError(f"pool {role}: no honest member left ({evidence})")
        return handle

    def forget(self, handles: dict) -> None:
        """Nothing is held for a product here."""

    def close(self) -> None:
        """Nothing to close."""


class RelayPools:
    """Three pools of relay processes behind the off-loader (`OffloadClient`). `pools` maps
    role → (pool name, key). Per product and direction the enclave seals one bulk blob of the
    opened tensors (``E, F`` or ``G``: the same for pools 1 and 2) under a fresh key, and for
    each pool a head (role, seeds, shapes, the bulk key) under the pool's key
    (`tempo.protocol.sealed`); all of it is written straight into the arena."""

    def __init__(self, client, pools: dict[int, tuple[str, bytes]], wait_s: float = 30.0) -> None:
        if sorted(pools) != list(shares.ROLES):
            raise ValueError("the shares mode needs three pools (roles 1, 2, 3)")
        names = [pools[r][0] for r in shares.ROLES]
        if len(set(names)) != 3:
            raise ValueError(f"the three pools need three different names, not {names}")
        self.client, self.pools, self.wait_s = client, pools, wait_s

    def check(self) -> None:
        """A clear error now unless each of the three pools has a relay (never a silent downgrade)."""
        self.client.wait_for_pools([self.pools[r][0] for r in shares.ROLES], self.wait_s)

    def _sealed_region(self, key: bytes, aad: bytes, parts, counters: SharesCounters):
        from tempo.protocol import sealed

        size = sealed.sealed_size(parts)
        desc, buf = self.client.alloc_blob(size)
        sealed.seal_into(key, aad, parts, buf)
        counters.bytes_sent += size
        return desc

    def send(self, bind: Binding, op: shares.Opened, backward: bool, counters: SharesCounters, prior=None) -> dict:
        """Seal and submit one product's three requests; a backward re-sends the forward's sealed
        blobs (`prior`: the forward's handles), so whichever member of a pool takes it needs no
        cached state."""
        from tempo.protocol import sealed

        t0 = time.perf_counter()
        what = "request-backward" if backward else "request-forward"
        requests = op.grad_requests if backward else op.requests
        bulk_tensors = [t.contiguous() for t in requests[1][1]]  # pools 1 and 2 get the same tensors
        bulk_key = sealed.new_key()
        bulk = self._sealed_region(bulk_key, sealed.associated("bulk", bind, what), bulk_tensors, counters)
        shapes = shares.answer_shapes(op, backward)
        handles = {}
        made = [bulk]  # regions sealed so far: freed if the arena fills before all three are sent
        try:
            self._send_heads(bind, requests, what, bulk, bulk_key, shapes, prior, handles, made, counters)
        except BaseException:
            if not handles:
                self.client.free_blob(*made)
            raise
        counters.seal_s += time.perf_counter() - t0
        return handles

    def _send_heads(self, bind, requests, what, bulk, bulk_key, shapes, prior, handles, made, counters) -> None:
        import msgpack

        from tempo.protocol import sealed

        for role in shares.ROLES:
            name, key = self.pools[role]
            header, tensors = requests[role]
            head = dict(header)
            if tensors:
                head.update(bulk=bulk_key, shapes=[list(t.shape) for t in tensors])
            head_desc = self._sealed_region(key, sealed.associated(name, bind, what), [msgpack.packb(head)], counters)
            made.append(head_desc)
            mine = [head_desc, bulk] if tensors else [head_desc]
            inputs = (prior[role]["inputs"] if prior is not None else []) + mine
            pending = self.client.submit_sealed(name, bind, inputs, sealed.answer_nbytes(shapes))
            handles[role] = {"role": role, "pending": pending, "shapes": shapes, "inputs": inputs, "own": mine,
                             "what": what.replace("request", "answer")}

    def receive(self, handle, counters: SharesCounters) -> tuple[torch.Tensor, ...]:
        from tempo.protocol import ProtocolError, sealed

        t0 = time.perf_counter()
        blob = self.client.finish_sealed(handle["pending"])
        t1 = time.perf_counter()
        counters.wait_s += t1 - t0
        counters.bytes_received += len(blob)
        name, key = self.pools[handle["role"]]
        try:
            return sealed.open_tensors(key, sealed.associated(name, handle["pending"].bind, handle["what"]), blob,
                                       handle["shapes"])
        except ProtocolError:
            return ()  # an answer that does not open is a wrong answer: blamed like one
        finally:
            counters.seal_s += time.perf_counter() - t1

    def blame(self, handle, evidence: str, counters: SharesCounters):
        handle = dict(handle)
        handle["pending"] = self.client.blame(handle["pending"], evidence)
        return handle

    def forget(self, handles: dict) -> None:
        """Free what a product's requests hold in the arena: heads, the shared bulk blob, answers."""
        regions = {}
        for h in handles.values():
            for d in [*h["own"], h["pending"].outputs[-1]]:
                regions[d.offset] = d
        self.client.free_blob(*regions.values())

    def close(self) -> None:
        self.client.close()


class SharesEngine:
    """Offload every product as three pool products (the engines' interface)."""

    def __init__(self, pools, rounds: int = 16, max_attempts: int = 4) -> None:
        self.pools, self.rounds, self.max_attempts = pools, rounds, max_attempts
        self.counters = EngineCounters()
        self.shares = SharesCounters()
        self._open: dict[Binding, tuple[shares.Opened, dict]] = {}
        pools.check()

    def _round(self, op: shares.Opened, bind: Binding, backward: bool, handles: dict) -> tuple:
        """Collect the three answers; combine them; on a failed sum find and replace the liar."""
        answers = {r: self.pools.receive(h, self.shares) for r, h in handles.items()}
        for _ in range(self.max_attempts):
            t0 = time.perf_counter()
            out = (shares.combine_backward(op, answers, self.rounds) if backward
                   else shares.combine_forward(op, answers, self.rounds))
            self.shares.combine_s += time.perf_counter() - t0
            if out is not None:
                return out
            self.shares.failed_sums += 1
            t0 = time.perf_counter()
            # blame with 64 vectors: a pool's own answer has no bound to refuse a 2^63 lie by, so
            # each vector catches it with probability 1/2; found rarely, it may as well be sure
            liars = [r for r in shares.ROLES if not shares.honest_answer_check(op, r, answers[r], backward, 64)]
            self.shares.blame_s += time.perf_counter() - t0
            if not liars:
                raise IntegrityError(f"{bind}: the pools' answers each check but their sum does not (a bug)")
            what = "backward" if backward else "forward"
            for r in liars:
                self.shares.blamed[r] = self.shares.blamed.get(r, 0) + 1
                handles[r] = self.pools.blame(handles[r], f"pool {r} {what} {bind.to_wire()}: its answer is not "
                                              "its share of the product (exact check over the ring)", self.shares)
                answers[r] = self.pools.receive(handles[r], self.shares)
        raise IntegrityError(f"{bind}: the pools' answers failed the exact check {self.max_attempts} times")

    def forward(self, a: torch.Tensor, b: torch.Tensor, bind: Binding, weight=None) -> torch.Tensor:
        return self._forward(a, b, bind, None)

    def conv_forward(self, x: torch.Tensor, w: torch.Tensor, conv, bind: Binding) -> torch.Tensor:
        """A convolution as ``patch_rows(x) · w`` (batch·positions × out), the pools unfolding
        their own shares of the images (`shares.open_forward`'s `conv`); its `backward` gives
        ``dL/dx`` in the images' shape."""
        return self._forward(x, w, bind, conv)

    def _forward(self, a: torch.Tensor, b: torch.Tensor, bind: Binding, conv) -> torch.Tensor:
        t0 = time.perf_counter()
        op = shares.open_forward(a, b, conv=conv)
        self.shares.open_s += time.perf_counter() - t0
        handles = self.pools.send(bind, op, False, self.shares)
        self.counters.forward_products += 1
        self.counters.forward_encryptions += 2
        # on an error the product's regions stay allocated: a part still in flight may yet write
        # its answer there, and the run stops on such errors (the arena goes with the client)
        c = self._round(op, bind, False, handles)
        self._open[bind] = (op, handles)
        return c

    def backward(self, grad_c: torch.Tensor, bind: Binding) -> tuple[torch.Tensor, torch.Tensor]:
        op, fwd_handles = self._open.pop(bind)
        try:
            t0 = time.perf_counter()
            shares.open_backward(op, grad_c)
            self.shares.open_s += time.perf_counter() - t0
        except BaseException:
            self.pools.forget(fwd_handles)  # nothing of this backward was sent: the forward's regions go
            raise
        handles = self.pools.send(bind, op, True, self.shares, prior=fwd_handles)
        self.counters.backward_products += 1
        self.counters.backward_encryptions += 1
        grads = self._round(op, bind, True, handles)  # on an error, regions stay (see forward)
        self.pools.forget(handles)
        self.pools.forget(fwd_handles)
        return grads

    def release(self, bind: Binding) -> None:
        entry = self._open.pop(bind, None)
        if entry is not None:
            self.pools.forget(entry[1])

    def end_step(self) -> None:
        """Nothing is prepared ahead."""

    def close(self) -> None:
        for bind in list(self._open):
            self.release(bind)
        self.pools.close()
