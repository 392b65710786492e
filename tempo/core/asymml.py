"""AsymML's math (3LegRace, PETS 2022): a layer's input split into a low-rank part the enclave
computes on and a noisy residual a relay computes on, with plaintext weights, and the
differential-privacy accounting of what the relays receive.

For a convolution, each sample's input ``X`` (channels × positions) is split by a light SVD
(`light_svd`: rank-1 terms by alternating least squares and deflation, as the authors' code
does) into ``L = Σ_k u_k v_kᵀ`` and ``R = X − L``. The enclave computes ``conv(L, W)`` as ``r``
one-channel convolutions (`lowrank_conv2d`: ``r/c`` of the layer's work); a relay is sent
``R̃ = clip(R) + N(0, σ²)`` and ``W`` and computes ``conv(R̃, W)``; the enclave adds the two.
Without clipping and noise the sum is the plain convolution exactly, at any rank (linearity).
For a fully connected layer the rows of the batch are split the same way (principal directions
of the batch).

Gradients follow the authors' code: ``dL/dx`` is the plain convolution's input gradient
(computed by the relay from ``dL/dy`` and ``W``: the gradient passes straight through the
decomposition), ``dL/dW`` is the sum of the enclave's low-rank part and the relay's residual
part.

Privacy accounting (`dp_account`): each release of one sample's residual is the Gaussian
mechanism on a vector of L2 norm at most ``clip`` (replace-one adjacency: sensitivity
``2·clip``), with noise ``σ = noise_multiplier · clip`` per entry; it is ``ρ = 2/z²``-zCDP, and
``k`` releases of a sample compose to ``kρ``, which gives ``ε = kρ + 2·√(kρ·ln(1/δ))``
(Bun & Steinke 2016, Prop. 1.3 and Lemma 2.3). What the accounting does not cover is stated
with it (`DP_DOES_NOT_COVER`).

Part of the trusted core: torch and the standard library only.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AsymmlConfig:
    """AsymML's knobs, with the authors' code's defaults where it has them.

    - `energy`: the low-rank part keeps at least this share of the batch's energy (squared
      norm); the rank grows one term at a time until the residual holds at most ``1 − energy``
      (the code's ``maxinfo = 0.1``).
    - `max_rank`: at most this many rank-1 terms (None: up to the channels).
    - `iters`: alternating-least-squares iterations per term (the code's 2).
    - `clip`: each sample's residual is scaled down to L2 norm at most this (the sensitivity's
      bound; the code has none: we need one for a DP statement).
    - `noise_multiplier`: Gaussian noise of standard deviation ``noise_multiplier · clip`` on
      every residual entry (0.1 with clip 1: the code's noise-to-signal ratio ``nsr = 0.1``).
    - `delta`: the δ the run's ε is reported at.
    """

    energy: float = 0.9
    max_rank: int | None = None
    iters: int = 2
    clip: float = 1.0
    noise_multiplier: float = 0.1
    delta: float = 1e-5

    def validate(self) -> AsymmlConfig:
        if not 0.0 <= self.energy <= 1.0:
            raise ValueError(f"asymml energy must lie in [0, 1], not {self.energy!r}")
        if self.max_rank is not None and self.max_rank < 0:
            raise ValueError(f"asymml max_rank must be at least 0, not {self.max_rank!r}")
        if self.iters < 1:
            raise ValueError(f"asymml iters must be at least 1, not {self.iters!r}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"asymml clip must be a positive number, not {self.clip!r}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"asymml noise_multiplier must be at least 0, not {self.noise_multiplier!r}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"asymml delta must lie in (0, 1), not {self.delta!r}")
        return self

    @property
    def sigma(self) -> float:
        """The noise's standard deviation per residual entry."""
        return self.noise_multiplier * self.clip

    def describe(self) -> dict:
        return {"protection": "asymml", **asdict(self), "sigma": self.sigma}


def light_svd(x: torch.Tensor, energy: float = 0.9, max_rank: int | None = None, iters: int = 2,
              eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank factors of every slice of `x` (batch × rows × cols): ``u`` (batch × rows × r)
    and ``v`` (batch × r × cols) with ``u @ v`` the low-rank part.

    Rank-1 terms are found one at a time, each by `iters` rounds of alternating least squares
    from the slice's mean row, and subtracted (deflation); one rank ``r`` for the whole batch,
    the smallest at which the residual keeps at most ``1 − energy`` of the batch's energy, at
    most `max_rank` and the rows. Each term's last step sets ``v = Xᵀu/|u|²``, so ``u vᵀ``
    projects the slice onto ``u``: the residual loses a dimension per term and is zero (up to
    rounding) at full rank."""
    if x.dim() != 3:
        raise ValueError(f"light_svd takes batch × rows × cols, not {tuple(x.shape)}")
    b, rows, cols = x.shape
    cap = rows if max_rank is None else min(max_rank, rows)
    residual = x.clone()
    total = float(torch.sum(x * x))
    us, vs = [], []
    left = total
    while len(us) < cap and left > (1.0 - energy) * total and left > 0.0:
        v = residual.mean(dim=1, keepdim=True).mT  # (b, cols, 1)
        u = None
        for _ in range(iters):
            u = residual @ v / ((v.mT @ v) + eps)  # (b, rows, 1)
            v = residual.mT @ u / ((u.mT @ u) + eps)  # (b, cols, 1)
        residual -= u @ v.mT
        us.append(u)
        vs.append(v.mT)
        left = float(torch.sum(residual * residual))
    if not us:
        return x.new_zeros(b, rows, 0), x.new_zeros(b, 0, cols)
    return torch.cat(us, dim=2), torch.cat(vs, dim=1)


def clip_rows(r: torch.Tensor, clip: float) -> torch.Tensor:
    """Each sample's residual (the first axis) scaled down to L2 norm at most `clip`."""
    norms = r.reshape(r.shape[0], -1).norm(dim=1)
    scale = torch.clamp(clip / torch.clamp(norms, min=1e-30), max=1.0)
    return r * scale.view(-1, *([1] * (r.dim() - 1))).to(r.dtype)


def noisy_residual(x: torch.Tensor, low: torch.Tensor, config: AsymmlConfig,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """What a relay is sent: ``clip(x − low) + N(0, σ²)``, per sample (the first axis)."""
    r = clip_rows(x - low, config.clip)
    if config.sigma > 0:
        r = r + torch.randn(r.shape, generator=generator, dtype=r.dtype, device=r.device) * config.sigma
    return r


def lowrank_conv2d(u: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, stride=1, padding=0, dilation=1,
                   groups: int = 1) -> torch.Tensor:
    """``conv2d(L, W)`` for ``L[n, c] = Σ_k u[n, c, k] · v[n, k]`` (u: n × c × r, v: n × r × h × w),
    without forming ``L``: per sample, ``r`` one-channel maps convolved with ``W`` collapsed over
    the channels by ``u`` (one grouped convolution over the batch). Differentiable in `weight`
    (and `u`, `v`); padding must be zeros (pad first otherwise: padding commutes with ``u ⊗ v``)."""
    n, c, r = u.shape
    out_ch, cin_g, kh, kw = weight.shape
    if r == 0:
        h, w = v.shape[-2:]
        probe = F.conv2d(v.new_zeros(1, c, h, w), weight, None, stride, padding, dilation, groups)
        return probe.new_zeros(n, out_ch, *probe.shape[-2:])
    g = groups
    # W̃[n, O, k] = Σ_c' W[O, c'] · u[n, group(O)·cin_g + c', k]
    wg = weight.reshape(g, out_ch // g, cin_g, kh, kw)
    ug = u.reshape(n, g, cin_g, r)
    collapsed = torch.einsum("gocij,ngck->ngokij", wg, ug).reshape(n * out_ch, r, kh, kw)
    y = F.conv2d(v.reshape(1, n * r, *v.shape[-2:]), collapsed, None, stride, padding, dilation, n)
    return y.reshape(n, out_ch, *y.shape[-2:])


# -- the privacy accounting --

DP_ACCOUNTANT = ("zCDP of the Gaussian mechanism on each sample's clipped residual (replace-one adjacency, "
                 "sensitivity 2·clip), composed over the releases of a sample, converted to (ε, δ)")
DP_DOES_NOT_COVER = (
    "the gradients dL/dy sent to relays in the clear in the backward (as in the authors' code: they carry the "
    "labels through the last layer); the weights (in the clear by design); the choice of the rank (data-dependent, "
    "from the batch's energy); for fully connected layers, a sample's effect on the batch's principal directions "
    "and so on other samples' residuals")


def zcdp_per_release(noise_multiplier: float) -> float:
    """ρ of one release: the Gaussian mechanism with sensitivity ``Δ = 2·clip`` and ``σ = z·clip``
    is ``Δ²/(2σ²) = 2/z²``-zCDP (infinite without noise)."""
    return math.inf if noise_multiplier == 0 else 2.0 / (noise_multiplier * noise_multiplier)


def zcdp_epsilon(rho: float, delta: float) -> float:
    """(ε, δ) from ρ-zCDP: ``ε = ρ + 2·√(ρ·ln(1/δ))``."""
    if math.isinf(rho):
        return math.inf
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def dp_account(releases_per_sample: int, config: AsymmlConfig) -> dict:
    """The (ε, δ) of a run in which every sample's residual went to the relays
    `releases_per_sample` times (epochs × AsymML layers), and of one release."""
    rho = zcdp_per_release(config.noise_multiplier)
    total = rho * releases_per_sample
    finite = lambda e: None if math.isinf(e) else round(e, 6)  # JSON has no infinity
    return {
        "accountant": DP_ACCOUNTANT,
        "noise_multiplier": config.noise_multiplier, "clip": config.clip, "sigma": config.sigma,
        "delta": config.delta, "releases_per_sample": releases_per_sample,
        "rho_per_release": finite(rho), "epsilon_per_release": finite(zcdp_epsilon(rho, config.delta)),
        "epsilon": finite(zcdp_epsilon(total, config.delta)) if releases_per_sample else 0.0,
        "does_not_cover": DP_DOES_NOT_COVER,
    }


def noise_generator() -> torch.Generator:
    """The enclave's noise source: torch's generator seeded from the OS's CSPRNG (the relays never
    see the seed; the generator itself is not a CSPRNG, as in Opacus's default mode)."""
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return g
