"""`tempo bench obfuscation`: MM-obfuscation against plain copies of the same bytes, in one run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tempo.core.keys import keygen
from tempo.core.obfuscation import decrypt, default_backend, encrypt
from tempo.core.verify import freivalds_check


# Writing this many bytes evicts the operands from every cache level (L3 here: 32 MiB).
_FLUSH_BYTES = 64 << 20


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: first-touch page faults, lazily cached key vectors
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class ObfuscationFigures:
    m: int
    n: int
    p: int
    dtype: str
    backend: str
    threads: int
    repeat: int
    enc_s: float
    enc_copy_s: float
    dec_s: float
    dec_copy_s: float
    verify_s: float
    verify_rounds: int
    matmul_s: float
    enc_cold_s: float
    enc_copy_cold_s: float
    dec_cold_s: float
    dec_copy_cold_s: float

    @property
    def enc_ratio(self) -> float:
        """Encryption bandwidth as a fraction of a plain copy's (1.0 = copy speed)."""
        return self.enc_copy_s / self.enc_s

    @property
    def dec_ratio(self) -> float:
        return self.dec_copy_s / self.dec_s

    @property
    def enc_cold_ratio(self) -> float:
        return self.enc_copy_cold_s / self.enc_cold_s

    @property
    def dec_cold_ratio(self) -> float:
        return self.dec_copy_cold_s / self.dec_cold_s

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        for name in ("enc_ratio", "dec_ratio", "enc_cold_ratio", "dec_cold_ratio"):
            d[name] = round(getattr(self, name), 4)
        return d


def run(
    m: int,
    n: int,
    p: int,
    dtype: torch.dtype = torch.float32,
    repeat: int = 15,
    rounds: int = 20,
    backend: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ObfuscationFigures:
    """Measure encrypt (A and B), decrypt (C), verify and the plain matmul, with medians.

    Encrypt and decrypt write into preallocated buffers, as they will into the shared-memory
    arena; the copies they are compared with copy the same bytes between the same buffers.
    Each repetition times every operation twice: warm and cold. Warm: an operation and its copy
    first run once each, untimed, then each is timed right after the other, on the same buffers
    (as in a tight loop); so each is timed after the same work, and neither after a foreign
    136 MiB pass that the other is spared. Cold: each is timed after a write of 64 MiB has
    flushed the caches. The headline figures are the warm ones; both are reported.
    """
    say = progress or (lambda _msg: None)
    backend = backend or default_backend()
    a = torch.randn(m, n, dtype=dtype)
    b = torch.randn(n, p, dtype=dtype)
    sk = keygen(m, n, p)
    out_a, out_b = torch.empty_like(a), torch.empty_like(b)
    a_enc, b_enc = encrypt(sk, a, b, out_a=out_a, out_b=out_b, backend=backend)
    c_enc = a_enc @ b_enc
    out_c = torch.empty_like(c_enc)
    c = decrypt(sk, c_enc, out=out_c, backend=backend)
    verdict = freivalds_check(a, b, c, rounds)
    if not verdict.ok:
        raise RuntimeError(f"honest product failed verification in the benchmark: {verdict.reason}")

    def enc() -> None:
        encrypt(sk, a, b, out_a=out_a, out_b=out_b, backend=backend)

    def enc_copy() -> None:
        out_a.copy_(a)
        out_b.copy_(b)

    def dec() -> None:
        decrypt(sk, c_enc, out=out_c, backend=backend)

    def dec_copy() -> None:
        out_c.copy_(c_enc)

    pairs = {"enc": (enc, "enc_copy", enc_copy), "dec": (dec, "dec_copy", dec_copy)}
    flush_buf = torch.empty(_FLUSH_BYTES // 4, dtype=torch.float32)
    warm: dict[str, list[float]] = {k: [] for p in pairs.items() for k in (p[0], p[1][1])}
    cold: dict[str, list[float]] = {k: [] for k in warm}
    for i in range(repeat):
        for name, (fn, copy_name, copy_fn) in pairs.items():
            # warm: both ran just before, on the same buffers; then each is timed right after
            # the other, so each follows the same work
            fn()
            copy_fn()
            warm[name].append(_timed(fn))
            warm[copy_name].append(_timed(copy_fn))
            # cold: caches flushed first, as for operands that arrive from the network
            for label, f in ((name, fn), (copy_name, copy_fn)):
                flush_buf.fill_(float(i))
                cold[label].append(_timed(f))
        say(f"repetition {i + 1}/{repeat}")
    heavy = max(3, repeat // 3)  # matmul and verify cost O(mnp) and O(k(mn + np)): fewer runs
    say("timing verify and matmul")
    verify_s = _median_time(lambda: freivalds_check(a, b, c, rounds), heavy)
    matmul_s = _median_time(lambda: torch.matmul(a, b, out=out_c), heavy)
    return ObfuscationFigures(
        m=m,
        n=n,
        p=p,
        dtype=str(dtype).removeprefix("torch."),
        backend=backend,
        threads=torch.get_num_threads(),
        repeat=repeat,
        enc_s=statistics.median(warm["enc"]),
        enc_copy_s=statistics.median(warm["enc_copy"]),
        dec_s=statistics.median(warm["dec"]),
        dec_copy_s=statistics.median(warm["dec_copy"]),
        enc_cold_s=statistics.median(cold["enc"]),
        enc_copy_cold_s=statistics.median(cold["enc_copy"]),
        dec_cold_s=statistics.median(cold["dec"]),
        dec_copy_cold_s=statistics.median(cold["dec_copy"]),
        verify_s=verify_s,
        verify_rounds=rounds,
        matmul_s=matmul_s,
    )


def table(f: ObfuscationFigures) -> str:
    """A human-readable table of the figures."""
    gb = 1e9
    size = torch.tensor([], dtype=getattr(torch, f.dtype)).element_size()
    enc_bytes = 2 * size * (f.m * f.n + f.n * f.p)  # read + write
    dec_bytes = 2 * size * f.m * f.p
    rows = [
        ("encrypt A, B (warm)", f.enc_s, enc_bytes / f.enc_s / gb),
        ("  copy of the same bytes (warm)", f.enc_copy_s, enc_bytes / f.enc_copy_s / gb),
        ("encrypt A, B (cold)", f.enc_cold_s, enc_bytes / f.enc_cold_s / gb),
        ("  copy of the same bytes (cold)", f.enc_copy_cold_s, enc_bytes / f.enc_copy_cold_s / gb),
        ("decrypt C (warm)", f.dec_s, dec_bytes / f.dec_s / gb),
        ("  copy of the same bytes (warm)", f.dec_copy_s, dec_bytes / f.dec_copy_s / gb),
        ("decrypt C (cold)", f.dec_cold_s, dec_bytes / f.dec_cold_s / gb),
        ("  copy of the same bytes (cold)", f.dec_copy_cold_s, dec_bytes / f.dec_copy_cold_s / gb),
        (f"verify ({f.verify_rounds} Freivalds rounds)", f.verify_s, None),
        ("plain matmul A @ B", f.matmul_s, None),
    ]
    lines = [
        f"MM-obfuscation  m={f.m} n={f.n} p={f.p} {f.dtype}  backend={f.backend} "
        f"threads={f.threads}  median of {f.repeat}",
        f"{'operation':<34}{'seconds':>12}{'GB/s (r+w)':>12}",
    ]
    for name, secs, bw in rows:
        lines.append(f"{name:<34}{secs:>12.6f}{(f'{bw:.2f}' if bw else ''):>12}")
    lines.append(
        f"of plain-copy bandwidth: encrypt {f.enc_ratio:.2f} warm, {f.enc_cold_ratio:.2f} cold; "
        f"decrypt {f.dec_ratio:.2f} warm, {f.dec_cold_ratio:.2f} cold; "
        f"verify costs {f.verify_s / f.matmul_s:.3f} of the matmul"
    )
    return "\n".join(lines)
