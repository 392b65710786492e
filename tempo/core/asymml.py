"""AsymML's math (3LegRace, PETS 2022): a layer's input split into a low-rank part the enclave
computes on and a noisy residual a relay computes on, with plaintext weights, and the
differential-privacy accounting of what the relays receive.

For a convolution, each sample's input ``X`` (channels × positions) is split by a light SVD
(`light_svd`: rank-1 terms by alternating least squares and deflation, as the authors' code
does) into ``L = Σ_k u_k v_kᵀ`` and ``R = X − L``. The enclave computes ``conv(L, W)`` as ``r``
one-channel convolutions (`lowrank_conv2d`: ``r/c`` of the layer's work); a relay is sent
``R̃ = clip(R) + N(0, σ²)`` and ``W`` and computes ``conv(R̃, W)``; the enclave adds the two.
A sample's residual of ``d`` entries is clipped to the L2 norm ``clip · √d`` (a root mean square
of at most ``clip`` per entry, so one setting fits layers of every size), and the noise is set
as the authors' code sets it, relative to the signal (their noise-to-signal ratio
``nsr = 0.1``): ``σ = z · clip`` per entry, a noise of norm about ``z`` times the largest
residual's.
Without clipping and noise the sum is the plain convolution exactly, at any rank (linearity).
For a fully connected layer the rows of the batch are split the same way (principal directions
of the batch).

Gradients follow the authors' code: ``dL/dx`` is the plain convolution's input gradient
(computed by the relay from ``dL/dy`` and ``W``: the gradient passes straight through the
decomposition), ``dL/dW`` is the sum of the enclave's low-rank part and the relay's residual
part.

Privacy accounting (`dp_account`): each release of one sample's ``d``-entry residual is the
Gaussian mechanism on a vector of L2 norm at most ``clip·√d`` (replace-one adjacency:
sensitivity ``Δ = 2·clip·√d``) with ``σ = z · clip``: it is ``ρ = Δ²/(2σ²) = 2d/z²``-zCDP
(`zcdp_per_release`). A sample's releases compose by adding their ρ (one per AsymML layer per
pass over the data), and ρ-zCDP gives ``ε = ρ + 2·√(ρ·ln(1/δ))`` (Bun & Steinke 2016, Prop. 1.3
and Lemma 2.3). With the code's ratio the ε is in the tens of thousands: the noise protects
against a casual look, not in the DP sense; `dp_account` reports it as it is, and what it does
not cover (`DP_DOES_NOT_COVER`).

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
    - `clip`: each sample's residual of ``d`` entries is scaled down to L2 norm at most
      ``clip · √d`` (a root mean square of at most `clip` per entry: the sensitivity's bound;
      the code has none, a DP statement needs one). 0.25: ours, from sweeps on the digits CNN
      and a CIFAR-10-shaped run (docs/BENCHMARKS.md).
    - `noise`: the noise-to-signal ratio ``z`` (the code's ``nsr = 0.1``): Gaussian noise of
      standard deviation ``z · clip`` on every residual entry, a noise of norm about ``z`` times
      the clipping norm.
    - `delta`: the δ the run's ε is reported at.
    """

    energy: float = 0.9
    max_rank: int | None = None
    iters: int = 2
    clip: float = 0.25
    noise: float = 0.1
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
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise ValueError(f"asymml noise must be a number at least 0, not {self.noise!r}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"asymml delta must lie in (0, 1), not {self.delta!r}")
        return self

    @property
    def sigma(self) -> float:
        """The noise's standard deviation per residual entry."""
        return self.noise * self.clip

    def clip_norm(self, entries: int) -> float:
        """The L2 norm a sample's residual of `entries` entries is clipped to."""
        return self.clip * math.sqrt(entries)

    def describe(self) -> dict:
        return {"protection": "asymml", **asdict(self)}


def light_svd(x: torch.Tensor, energy: float = 0.9, max_rank: int | None = None, iters: int = 2,
              eps: float = 1e-12, residual: bool = False) -> tuple[torch.Tensor, ...]:
    """Low-rank factors of every slice of `x` (batch × rows × cols): ``u`` (batch × rows × r)
    and ``v`` (batch × r × cols) with ``u @ v`` the low-rank part.

    Rank-1 terms are found one at a time, each by `iters` rounds of alternating least squares
    from the slice's mean row, and subtracted (deflation); one rank ``r`` for the whole batch,
    the smallest at which the residual keeps at most ``1 − energy`` of the batch's energy, at
    most `max_rank` and the rows. Each term's last step sets ``v = Xᵀu/|u|²``, so ``u vᵀ``
    projects the slice onto ``u``: the residual loses a dimension per term and is zero (up to
    rounding) at full rank, and its energy falls by ``|u|²|v|²`` (Pythagoras), so it is never
    summed again. With `residual`, the deflated residual ``x − u @ v`` comes back too (third)."""
    if x.dim() != 3:
        raise ValueError(f"light_svd takes batch × rows × cols, not {tuple(x.shape)}")
    b, rows, cols = x.shape
    cap = rows if max_rank is None else min(max_rank, rows)
    rest = x.clone()
    total = float(torch.sum(x * x))
    us, vs = [], []
    left = total
    while len(us) < cap and left > (1.0 - energy) * total and left > 0.0:
        v = rest.mean(dim=1, keepdim=True).mT  # (b, cols, 1)
        u = None
        for _ in range(iters):
            u = rest @ v / ((v.mT @ v) + eps)  # (b, rows, 1)
            v = rest.mT @ u / ((u.mT @ u) + eps)  # (b, cols, 1)
        rest -= u @ v.mT
        us.append(u)
        vs.append(v.mT)
        left -= float(torch.sum((u * u).sum(dim=1) * (v * v).sum(dim=1)))  # the term's energy, per slice
    if not us:
        u, v = x.new_zeros(b, rows, 0), x.new_zeros(b, 0, cols)
    else:
        u, v = torch.cat(us, dim=2), torch.cat(vs, dim=1)
    return (u, v, rest) if residual else (u, v)


def clip_rows(r: torch.Tensor, clip: float) -> torch.Tensor:
    """Each sample's residual (the first axis) scaled down to L2 norm at most `clip`."""
    norms = r.reshape(r.shape[0], -1).norm(dim=1)
    scale = torch.clamp(clip / torch.clamp(norms, min=1e-30), max=1.0)
    return r * scale.view(-1, *([1] * (r.dim() - 1))).to(r.dtype)


def noisy_residual(x: torch.Tensor, low: torch.Tensor, config: AsymmlConfig,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """What a relay is sent: ``clip(x − low) + N(0, σ²)`` (`perturb` of the residual)."""
    return perturb(x - low, config, generator)


def perturb(residual: torch.Tensor, config: AsymmlConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """``clip(R) + N(0, σ²)`` per sample (the first axis): each sample's residual clipped to
    ``config.clip_norm(d)`` for its ``d`` entries, ``σ = config.sigma``."""
    r = clip_rows(residual, config.clip_norm(residual[0].numel()))
    if config.noise > 0:
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
                 "sensitivity 2·clip·√d for d entries, σ = noise·clip), added over a sample's releases, "
                 "converted to (ε, δ)")
DP_DOES_NOT_COVER = (
    "the gradients dL/dy sent to relays in the clear in the backward (as in the authors' code: they carry the "
    "labels through the last layer); the weights (in the clear by design); the choice of the rank (data-dependent, "
    "from the batch's energy); for fully connected layers, a sample's effect on the batch's principal directions "
    "and so on other samples' residuals")


def zcdp_per_release(noise: float, entries: int) -> float:
    """ρ of one release of a residual of `entries` entries: the Gaussian mechanism with
    sensitivity ``Δ = 2·clip·√d`` and ``σ = z·clip`` is ``Δ²/(2σ²) = 2d/z²``-zCDP (infinite
    without noise)."""
    return math.inf if noise == 0 else 2.0 * entries / (noise * noise)


def zcdp_epsilon(rho: float, delta: float) -> float:
    """(ε, δ) from ρ-zCDP: ``ε = ρ + 2·√(ρ·ln(1/δ))``."""
    if math.isinf(rho):
        return math.inf
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def dp_account(layer_entries: list[int], passes: int, config: AsymmlConfig) -> dict:
    """The (ε, δ) of a run in which every sample went `passes` times (epochs) through AsymML
    layers whose residuals have `layer_entries` entries per sample: one release per layer per
    pass, their ρ added. ε is None where it is infinite (no noise: JSON has no infinity)."""
    rhos = [zcdp_per_release(config.noise, d) for d in layer_entries]
    per_pass = sum(rhos)
    total = per_pass * passes if passes else 0.0
    finite = lambda e: None if math.isinf(e) else round(e, 6)
    return {
        "accountant": DP_ACCOUNTANT,
        "noise": config.noise, "clip": config.clip, "delta": config.delta,
        "layer_entries": list(layer_entries), "passes": passes, "releases_per_sample": passes * len(layer_entries),
        "rho_per_layer": [finite(r) for r in rhos], "rho": finite(total),
        "epsilon_one_pass": finite(zcdp_epsilon(per_pass, config.delta)) if layer_entries else 0.0,
        "epsilon": finite(zcdp_epsilon(total, config.delta)) if total else 0.0,
        "does_not_cover": DP_DOES_NOT_COVER,
    }


def noise_generator() -> torch.Generator:
    """The enclave's noise source: torch's generator seeded from the OS's CSPRNG (the relays never
    see the seed; the generator itself is not a CSPRNG, as in Opacus's default mode)."""
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return g
