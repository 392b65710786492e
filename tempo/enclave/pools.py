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

from tempo.enclave import shares
from tempo.enclave.private import EngineCounters
from tempo.enclave.verify import IntegrityError
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

    def send(self, role: int, bind: Binding, forward: tuple, backward: tuple | None, counters: SharesCounters,
             prior=None):
        if self.observer is not None:
            self.observer(role, bind, "forward" if backward is None else "backward", *(backward or forward))
        counters.bytes_sent += sum(t.numel() * 8 for t in (backward or forward)[1])
        return (role, forward, backward)

    def receive(self, handle, counters: SharesCounters) -> tuple[torch.Tensor, ...]:
        role, forward, backward = handle
        return self.members[role][0](forward, backward)

    def blame(self, handle, evidence: str, counters: SharesCounters):
        role = handle[0]
        self.quarantined.append((role, evidence))
        self.members[role].pop(0)
        if not self.members[role]:
            raise IntegrityError(f"pool {role}: no honest member left ({evidence})")
        return handle

    def forget(self, handle) -> None:
        """Nothing is held for a product here."""

    def close(self) -> None:
        """Nothing to close."""


class RelayPools:
    """Three pools of relay processes behind the off-loader (`OffloadClient`), each request
    sealed under its pool's key. `pools` maps role → (pool name, key)."""

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

    def _blob(self, role: int, bind: Binding, what: str, request: tuple, counters: SharesCounters):
        from tempo.protocol import sealed

        name, key = self.pools[role]
        t0 = time.perf_counter()
        blob = sealed.seal_request(key, sealed.associated(name, bind, what), *request)
        counters.seal_s += time.perf_counter() - t0
        counters.bytes_sent += len(blob)
        return self.client.put_blob(blob)

    def send(self, role: int, bind: Binding, forward: tuple, backward: tuple | None, counters: SharesCounters,
             prior=None):
        """Seal and submit; a backward re-sends the forward's sealed blob (kept in the arena:
        `prior` is the forward's handle), so whichever member of the pool takes it needs no
        cached state."""
        from tempo.protocol import sealed

        name, _ = self.pools[role]
        fwd = prior["forward_desc"] if prior is not None else self._blob(role, bind, "request-forward", forward, counters)
        inputs = [fwd] if backward is None else [fwd, self._blob(role, bind, "request-backward", backward, counters)]
        shapes = _answer_shapes(forward, backward)
        pending = self.client.submit_sealed(name, bind, inputs, sealed.answer_nbytes(shapes))
        return {"role": role, "pending": pending, "shapes": shapes, "forward_desc": fwd,
                "what": "answer-backward" if backward is not None else "answer-forward"}

    def receive(self, handle, counters: SharesCounters) -> tuple[torch.Tensor, ...]:
        from tempo.protocol import ProtocolError, sealed

        t0 = time.perf_counter()
        blob = self.client.finish_sealed(handle["pending"])
        counters.wait_s += time.perf_counter() - t0
        counters.bytes_received += len(blob)
        name, key = self.pools[handle["role"]]
        t0 = time.perf_counter()
        try:
            return sealed.open_answer(key, sealed.associated(name, handle["pending"].bind, handle["what"]), blob,
                                      handle["shapes"])
        except ProtocolError:
            return ()  # an answer that does not open is a wrong answer: blamed like one
        finally:
            counters.seal_s += time.perf_counter() - t0

    def blame(self, handle, evidence: str, counters: SharesCounters):
        handle = dict(handle)
        handle["pending"] = self.client.blame(handle["pending"], evidence)
        return handle

    def forget(self, handle) -> None:
        """Free the request blobs a product's parts kept in the arena."""
        self.client.free_blob(*handle["pending"].outputs[:-1])

    def close(self) -> None:
        self.client.close()


def _answer_shapes(forward: tuple, backward: tuple | None) -> list[tuple]:
    header = forward[0]
    a, b = tuple(header["a"]), tuple(header["b"])
    if backward is None:
        batch = tuple(torch.broadcast_shapes(torch.Size(a[:-2]), torch.Size(b[:-2])))
        return [(*batch, a[-2], b[-1])]
    return [a, b]


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
            liars = [r for r in shares.ROLES if not shares.honest_answer_check(op, r, answers[r], backward, self.rounds)]
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
        t0 = time.perf_counter()
        op = shares.open_forward(a, b)
        self.shares.open_s += time.perf_counter() - t0
        handles = {r: self.pools.send(r, bind, op.requests[r], None, self.shares) for r in shares.ROLES}
        self.counters.forward_products += 1
        self.counters.forward_encryptions += 2
        c = self._round(op, bind, False, handles)
        self._open[bind] = (op, handles)
        return c

    def backward(self, grad_c: torch.Tensor, bind: Binding) -> tuple[torch.Tensor, torch.Tensor]:
        op, fwd_handles = self._open.pop(bind)
        t0 = time.perf_counter()
        shares.open_backward(op, grad_c)
        self.shares.open_s += time.perf_counter() - t0
        handles = {r: self.pools.send(r, bind, op.requests[r], op.grad_requests[r], self.shares, prior=fwd_handles[r])
                   for r in shares.ROLES}
        self.counters.backward_products += 1
        self.counters.backward_encryptions += 1
        try:
            return self._round(op, bind, True, handles)
        finally:
            for h in handles.values():
                self.pools.forget(h)

    def release(self, bind: Binding) -> None:
        entry = self._open.pop(bind, None)
        if entry is not None:
            for h in entry[1].values():
                self.pools.forget(h)

    def end_step(self) -> None:
        """Nothing is prepared ahead."""

    def close(self) -> None:
        for bind in list(self._open):
            self.release(bind)
        self.pools.close()
