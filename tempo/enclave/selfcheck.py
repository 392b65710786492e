"""`tempo selfcheck`: the whole obfuscation round trip on random products, end to end in-process.

For each trial, through the one masked round trip every engine uses (`roundtrip.MaskedProduct`):
fresh keys, mask ``A`` and ``B``, compute exactly what a relay computes (`relay_forward`),
unmask, verify with Freivalds, compare with ``A @ B``; run the backward as relays do it
(``D'ᵀ`` out, `relay_backward` back), unmask and verify both gradients, compare with torch
autograd; tamper with the result and expect verification to reject it.
"""

from __future__ import annotations

import math
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tempo.core.keys import KeySpace, keygen
from tempo.core.roundtrip import MaskedProduct
from tempo.core.verify import rounding_bound
from tempo.core.products import relay_backward, relay_forward


@dataclass
class SelfCheckReport:
    trials: int = 0
    failures: list[str] = field(default_factory=list)
    tamper_detected: int = 0
    max_rel_error: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = float(want.abs().max()) if want.numel() else 0.0
    return float((got - want).abs().max()) / scale if scale > 0 else float((got - want).abs().max())


def run(
    trials: int = 200,
    max_dim: int = 256,
    rounds: int = 16,
    key_space: KeySpace | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SelfCheckReport:
    """Run `trials` random forward + backward + tamper checks; collect failures, never raise."""
    rng = random.Random(secrets.randbits(64))  # shapes only; keys come from os.urandom
    report = SelfCheckReport()
    start = time.perf_counter()
    for trial in range(trials):
        dtype = rng.choice([torch.float32, torch.float64])
        m, n, p = (max(1, int(math.exp(rng.uniform(0, math.log(max_dim))))) for _ in range(3))
        batch = rng.choice([(), (), (2,), (3, 2)])
        per_slice = bool(batch) and rng.random() < 0.5
        space = key_space or rng.choice(
            [KeySpace(), KeySpace("int", 1024, True), KeySpace("continuous", 64)]
        )
        label = f"trial {trial}: {batch}+({m},{n},{p}) {dtype} keys={space}"
        a = torch.randn(*batch, m, n, dtype=dtype, requires_grad=True)
        b = torch.randn(*batch, n, p, dtype=dtype, requires_grad=True)
        sk = keygen(m, n, p, batch_shape=batch if per_slice else (), key_space=space)
        product = MaskedProduct(sk, a.detach(), b.detach())
        with torch.no_grad():
            a_enc, b_enc = product.mask_a(), product.mask_b()
            c = product.unmask_c(relay_forward(a_enc, b_enc))  # the relay's work, then Dec
        want = a @ b
        verdict = product.verify_c(c, rounds, (a_enc, b_enc))
        if not verdict.ok:
            report.failures.append(f"{label}: honest result rejected ({verdict.reason})")
        report.max_rel_error = max(report.max_rel_error, _rel_error(c, want.detach()))

        grad_c = torch.randn_like(want)
        want.backward(grad_c)
        with torch.no_grad():
            e = product.mask_grad(grad_c)  # D'ᵀ
            da, db = product.unmask_grads(*relay_backward(a_enc, b_enc, e))
            grads_verdict = product.verify_grads(da, db, rounds, (a_enc, b_enc, e))
        if not grads_verdict.ok:
            report.failures.append(f"{label}: honest gradients rejected ({grads_verdict.reason})")
        for name, got, ref, x, y in (("dL/dA", da, a.grad, grad_c, b.mT), ("dL/dB", db, b.grad, a.mT, grad_c)):
            tol = rounding_bound(x, y, slack=4.0).unsqueeze(-1)
            if got.shape != ref.shape or bool(((got - ref).abs() > tol).any()):
                report.failures.append(f"{label}: {name} differs from autograd")

        tampered = c.clone()
        idx = tuple(rng.randrange(s) for s in tampered.shape)
        bound = rounding_bound(a.detach(), b.detach())
        row_bound = float(bound[idx[:-1]]) if bound.dim() else float(bound)
        tampered[idx] += 1e3 * row_bound + 1.0
        # A single changed entry escapes one round with probability 1/2: 2^-rounds overall.
        if product.verify_c(tampered, rounds, (a_enc, b_enc)).ok:
            report.failures.append(f"{label}: tampered result accepted")
        else:
            report.tamper_detected += 1
        report.trials += 1
        if progress:
            progress(trial + 1, trials)
    report.seconds = time.perf_counter() - start
    return report
