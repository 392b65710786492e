"""`tempo bench transport`: masked operands through real processes vs a plain copy of the bytes."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from tempo.arena import list_segments
from tempo.cluster import LocalCluster
from tempo.enclave.client import OffloadClient
from tempo.protocol import Binding

INNER = 1024  # A' is (rows × 1024), B' is (1024 × 1): the relay's matmul is a cheap matvec


@dataclass
class TransportFigures:
    relays: int
    mb: float
    rounds: int
    round_trip_s: float
    gbps: float
    copy_s: float
    copy_gbps: float

    @property
    def ratio(self) -> float:
        return self.gbps / self.copy_gbps

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": round(self.ratio, 4)}


def run(relays: int = 2, mb: float = 16.0, rounds: int = 20,
        progress: Callable[[str], None] | None = None, input_digest: bool = True) -> TransportFigures:
    """Each round sends one part of about `mb` MiB to every relay and waits for all results.

    The operands are written into the arena once (their content does not matter to the
    transport), so the timing covers what happens after encryption: descriptors to the
    off-loader, frames to the relays, the relays' matvec, results back into the arena.
    """
    say = progress or (lambda _m: None)
    rows = max(1, int(mb * (1 << 20) / 4 / INNER))
    before = {p.name for p in list_segments()}
    cluster = LocalCluster(relays=relays, offloader_args=[] if input_digest else ["--no-input-digest"]).start()
    client = None
    try:
        part_bytes = 4 * (rows * INNER + INNER + rows)
        client = OffloadClient(cluster.enclave_endpoint, f"bench{int(time.time())}",
                               arena_bytes=relays * part_bytes + (8 << 20), timeout_s=120)
        client.wait_for_relays(relays)
        parts = []
        for r in range(relays):
            a_desc, a = client.arena.alloc_tensor((rows, INNER), torch.float32)
            b_desc, b = client.arena.alloc_tensor((INNER, 1), torch.float32)
            c_desc, _ = client.arena.alloc_tensor((rows, 1), torch.float32)
            a.normal_()
            b.normal_()
            parts.append((a_desc, b_desc, c_desc))

        def one_round(step: int) -> None:
            pending = []
            for r, (a_desc, b_desc, c_desc) in enumerate(parts):
                bind = Binding(client.job, step, 0, r)
                pending.append((bind, client.submit_masked(bind, [a_desc, b_desc], [c_desc])))
            for bind, p in pending:
                client.wait(p)
                client.release(bind)

        one_round(0)  # warm-up: connections, first-touch pages on the relays
        times = []
        for i in range(rounds):
            start = time.perf_counter()
            one_round(i + 1)
            times.append(time.perf_counter() - start)
            say(f"round {i + 1}/{rounds}")
        moved = relays * part_bytes
        src = torch.empty(moved // 4, dtype=torch.float32).normal_()
        dst = torch.empty_like(src)
        copies = []
        for _ in range(max(5, rounds)):
            start = time.perf_counter()
            dst.copy_(src)
            copies.append(time.perf_counter() - start)
        rt, cp = statistics.median(times), statistics.median(copies)
        return TransportFigures(relays, round(moved / (1 << 20), 2), rounds, rt, moved / rt / 1e9, cp, moved / cp / 1e9)
    finally:
        if client is not None:
            client.close()
        cluster.stop()
        left = {p.name for p in list_segments()} - before
        if left or any(p.alive() for p in cluster.processes()):
            raise RuntimeError(f"bench transport left something behind: {sorted(left)}")


def table(f: TransportFigures) -> str:
    return "\n".join([
        f"transport  relays={f.relays}  {f.mb} MiB per round  median of {f.rounds} rounds",
        f"{'':<36}{'seconds':>12}{'GB/s':>10}",
        f"{'round trip through the processes':<36}{f.round_trip_s:>12.6f}{f.gbps:>10.2f}",
        f"{'plain copy of the same bytes':<36}{f.copy_s:>12.6f}{f.copy_gbps:>10.2f}",
        f"transport at {f.ratio:.3f} of plain-copy bandwidth",
    ])
