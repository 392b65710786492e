"""The AsymML protection mode's layers (`tempo.core.asymml` has the math).

`AsymmlConv2d` and `AsymmlLinear` split their input into a low-rank part, computed here, and a
clipped, noisy residual, whose product with the plaintext weights goes to a relay through the
same engine and products as the masking (forward ``C = A @ B``, backward ``E Bᵀ`` and ``Aᵀ E``),
unmasked: the products carry identity keys (`IdentityKeys`), the client marks every request
``mode="asymml"`` on the wire, and relays refuse to mix it with masked work. Results are still
verified (Freivalds) against the operands kept here: AsymML itself trusts the GPU's answers.

Autograd does the rest: the relay's branch takes ``x + (R̃ − x).detach()``, so ``dL/dx`` is the
plain layer's input gradient (the relay's ``E Bᵀ``, straight through the decomposition) and
``dL/dW`` the sum of the relay's residual part and the low-rank part computed here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tempo.core.asymml import AsymmlConfig, light_svd, lowrank_conv2d, noise_generator, perturb
from tempo.core.keys import AxisKey, MatmulKey
from tempo.enclave.private import PrivateConv2d, PrivateLinear


def _identity_axis(size: int) -> AxisKey:
    return AxisKey(torch.ones(size, dtype=torch.float64), torch.arange(size, dtype=torch.int64))


class IdentityKeys:
    """A key schedule whose every key is the identity (coefficients 1, no permutation, no mixing):
    AsymML's products go to relays as they are. Keys are cached per shape."""

    refresh = "step"
    mix = 0

    def __init__(self) -> None:
        self.generated = 0
        self._keys: dict[tuple[int, int, int], MatmulKey] = {}

    def key(self, layer: int, m: int, n: int, p: int, part: int = 0) -> MatmulKey:
        self.generated += 1
        shape = (m, n, p)
        if shape not in self._keys:
            self._keys[shape] = MatmulKey(*(_identity_axis(s) for s in shape))
        return self._keys[shape]

    def new_epoch(self) -> None:
        """Nothing to refresh."""


@dataclass
class AsymmlState:
    """A context's AsymML settings, its noise source, and what it sent: sample-residuals released
    (`releases`, one per sample per layer forward), each layer's residual size per sample
    (`entries`, what the DP accounting needs), and the ranks chosen."""

    config: AsymmlConfig = field(default_factory=AsymmlConfig)
    generator: torch.Generator = field(default_factory=noise_generator)
    releases: int = 0  # sample-residuals sent (a batch of n through one layer: n)
    layer_passes: int = 0  # layer forwards that sent a residual
    rank_sum: int = 0
    rank_max: int = 0
    entries: dict = field(default_factory=dict)  # id(layer) → entries of one sample's residual, in first-use order
    split_s: float = 0.0  # the enclave's time in the light SVD, clipping and noise
    lowrank_s: float = 0.0  # the enclave's time in the low-rank products (forward)

    def split(self, x: torch.Tensor, flat: torch.Tensor, layer: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(u, v, R̃)``: the low-rank factors of `flat` (`x` seen as batch × rows × cols for the
        light SVD) and the noisy residual the relay is sent, in `x`'s shape (samples first:
        each is clipped on its own); `layer` is the module it is for."""
        cfg = self.config
        t0 = time.perf_counter()
        # the SVD's own deflated residual: the low-rank part is never formed
        u, v, rest = light_svd(flat.detach(), cfg.energy, cfg.max_rank, cfg.iters, residual=True)
        residual = perturb(rest.reshape(x.shape), cfg, self.generator)
        rank = u.shape[-1]
        self.rank_sum += rank
        self.rank_max = max(self.rank_max, rank)
        self.layer_passes += 1
        self.releases += x.shape[0]
        self.entries[id(layer)] = x[0].numel()
        self.split_s += time.perf_counter() - t0
        return u, v, residual

    def low(self, product):
        """`product()` (a low-rank product), timed."""
        t0 = time.perf_counter()
        try:
            return product()
        finally:
            self.lowrank_s += time.perf_counter() - t0

    def layer_entries(self) -> list[int]:
        """Each AsymML layer's residual size per sample, for `tempo.core.asymml.dp_account`."""
        return list(self.entries.values())

    def stats(self) -> dict:
        return {"releases": self.releases, "layer_passes": self.layer_passes, "layer_entries": self.layer_entries(),
                "mean_rank": round(self.rank_sum / self.layer_passes, 3) if self.layer_passes else None,
                "max_rank": self.rank_max}


def _through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value`, with `x`'s gradient passing straight through it."""
    return x + (value - x).detach()


class AsymmlConv2d(PrivateConv2d):
    """Conv2d in the AsymML mode: each sample's input (channels × positions) split by the light
    SVD; ``conv(L, W)`` here as ``r`` one-channel convolutions, ``conv(R̃, W)`` offloaded (patch
    rows of the noisy residual times ``Wᵀ``, or the grouped product)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, unbatched = self._input(x)
        n, c, h, w = x.shape
        state = self.pctx.asymml
        u, v, residual = state.split(x, x.reshape(n, c, h * w), self)
        y = self._offload(_through(x, residual))  # (n, out, L)
        _, _, dh, dw, ph, pw, sh, sw = self._geometry(x)
        low = state.low(lambda: lowrank_conv2d(u, v.reshape(n, -1, h, w), self.weight, (sh, sw), (ph, pw), (dh, dw),
                                               self.groups))
        return self._output(y + low.reshape(n, low.shape[1], -1), x, unbatched)


class AsymmlLinear(PrivateLinear):
    """Linear in the AsymML mode: the batch's rows (samples) split by the light SVD into principal
    directions ``u v`` and a noisy residual; ``(u v) Wᵀ = u (v Wᵀ)`` here, ``R̃ Wᵀ`` offloaded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        state = self.pctx.asymml
        u, v, residual = state.split(rows, rows.unsqueeze(0), self)  # one slice: the whole batch
        y = super().forward(_through(rows, residual))
        low = state.low(lambda: u[0] @ (v[0] @ self.weight.t()))  # (batch × r)(r × out)
        return (y + low).reshape(*lead, -1)
