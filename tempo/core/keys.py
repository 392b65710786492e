"""Secret keys for MM-obfuscation (paper Algorithm 1, KGen).

A key for one matrix axis is a coefficient vector with no zero entry and a permutation
(`AxisKey`, the paper's ``(c, π)``). A key for one product ``A @ B`` with ``A: m×n`` and ``B: n×p``
is three axis keys ``sk = (k_m, k_n, k_p)`` (`MatmulKey`).

Every random draw comes from a CSPRNG (``os.urandom``) unless a caller passes its own byte source,
which only tests do, to make a key reproducible.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
import torch

RandomBytes = Callable[[int], bytes]
"""A source of uniformly random bytes: ``os.urandom`` in production."""

_U64 = np.dtype("<u8")


def _random_u64(count: int, random_bytes: RandomBytes) -> np.ndarray:
    if count == 0:
        return np.empty(0, dtype=_U64)
    raw = random_bytes(8 * count)
    if len(raw) != 8 * count:
        raise ValueError(f"random byte source returned {len(raw)} bytes, wanted {8 * count}")
    return np.frombuffer(raw, dtype=_U64).copy()


def uniform_below(bound: int, count: int, random_bytes: RandomBytes = os.urandom) -> np.ndarray:
    """`count` integers drawn uniformly from ``{0, …, bound-1}`` (rejection sampling, no bias)."""
    if not 1 <= bound <= 2**63:
        raise ValueError(f"bound must be in [1, 2**63], got {bound}")
    limit = (2**64 // bound) * bound  # draws at or above `limit` would bias the low residues
    out = _random_u64(count, random_bytes)
    bad = out >= np.uint64(limit % 2**64) if limit < 2**64 else np.zeros(count, dtype=bool)
    while bad.any():
        out[bad] = _random_u64(int(bad.sum()), random_bytes)
        bad = out >= np.uint64(limit)
    return (out % np.uint64(bound)).astype(np.int64)


def random_permutations(
    size: int, batch: int = 1, random_bytes: RandomBytes = os.urandom
) -> np.ndarray:
    """`batch` independent uniform permutations of ``range(size)``, shape ``(batch, size)``.

    Sorting 64-bit random tags gives a uniform permutation when the tags are distinct; a tie
    (probability about size²/2⁶⁵) is redrawn rather than ignored.
    """
    if size < 0 or batch < 0:
        raise ValueError("size and batch must be non-negative")
    while True:
        tags = _random_u64(size * batch, random_bytes).reshape(batch, size)
        order = np.argsort(tags, axis=-1, kind="stable")
        sorted_tags = np.take_along_axis(tags, order, axis=-1)
        if size < 2 or not (sorted_tags[:, 1:] == sorted_tags[:, :-1]).any():
            return order.astype(np.int64)


def gaussians(count: int, random_bytes: RandomBytes = os.urandom) -> np.ndarray:
    """`count` standard normal float64 values from the CSPRNG (Box-Muller on 53-bit uniforms)."""
    half = (count + 1) // 2
    u = (_random_u64(2 * half, random_bytes) >> np.uint64(11)).astype(np.float64) * (2.0**-53)
    u1, u2 = 1.0 - u[:half], u[half:]  # u1 in (0, 1]: log is finite
    r = np.sqrt(-2.0 * np.log(u1))
    return np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:count]


def random_orthogonal(count: int, size: int, random_bytes: RandomBytes = os.urandom) -> torch.Tensor:
    """`count` independent Haar-uniform orthogonal ``size × size`` matrices (float64): the QR of
    Gaussian matrices from the CSPRNG, with R's diagonal signs moved into Q (else not uniform)."""
    g = torch.from_numpy(gaussians(count * size * size, random_bytes)).reshape(count, size, size)
    q, r = torch.linalg.qr(g)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs[signs == 0] = 1.0
    return (q * signs.unsqueeze(-2)).contiguous()


@dataclass(frozen=True)
class KeySpace:
    """The coefficient key space 𝕂.

    ``kind="int"`` (the paper's: positive integers ``{1, …, bound}``) or ``"continuous"`` (reals
    uniform in ``[1, bound]``); ``signed=True`` gives each coefficient a random sign as well.
    """

    kind: Literal["int", "continuous"] = "int"
    bound: int = 256
    signed: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("int", "continuous"):
            raise ValueError(f"key space kind must be 'int' or 'continuous', got {self.kind!r}")
        if not isinstance(self.bound, int) or self.bound < 1 or self.bound > 2**53:
            raise ValueError(f"key space bound must be an integer in [1, 2**53], got {self.bound!r}")
        if self.kind == "int" and self.bound == 1 and not self.signed:
            raise ValueError("key space {1} has a single coefficient: no secret in it")

    @classmethod
    def parse(cls, text: str) -> KeySpace:
        """Parse ``int:256``, ``signed-int:1024``, ``continuous:100`` or ``signed-continuous:8``."""
        kind, _, bound = text.partition(":")
        signed = kind.startswith("signed-")
        kind = kind.removeprefix("signed-")
        try:
            return cls(kind=kind, bound=int(bound or 256), signed=signed)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"bad key space {text!r}: {exc}") from None

    def sample(self, count: int, random_bytes: RandomBytes = os.urandom) -> np.ndarray:
        """`count` coefficients from this space, as float64 (never zero)."""
        if self.kind == "int":
            mags = uniform_below(self.bound, count, random_bytes).astype(np.float64) + 1.0
        else:
            # 53 random bits give a uniform double in [0, 1); map to [1, bound].
            unit = (_random_u64(count, random_bytes) >> np.uint64(11)).astype(np.float64)
            mags = 1.0 + unit * (2.0**-53) * (self.bound - 1)
        if self.signed:
            signs = uniform_below(2, count, random_bytes) * 2 - 1
            mags = mags * signs
        return mags

    def __str__(self) -> str:
        return f"{'signed-' if self.signed else ''}{self.kind}:{self.bound}"


DEFAULT_KEY_SPACE = KeySpace()


@dataclass(frozen=True, eq=False)
class AxisKey:
    """The key of one matrix axis: coefficients ``c`` and a permutation ``π``, the paper's ``(c, π)``.

    Both have shape ``(*batch, size)``: an empty batch shape means one key shared by every
    leading slice of the matrices it masks; otherwise each slice has its own.
    """

    coef: torch.Tensor  # float64, no zero entry
    perm: torch.Tensor  # int64, each row a permutation of range(size)
    # Optional mixing: orthogonal blocks over consecutive masked positions, (k, g, g), and the
    # last r < g positions' own (r, r) block. The masked axis is then Q · (c, π)-gathered.
    mix: torch.Tensor | None = None
    mix_tail: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)  # per role and dtype

    def __post_init__(self) -> None:
        coef, perm = self.coef, self.perm
        if coef.dtype != torch.float64 or perm.dtype != torch.int64:
            raise TypeError("AxisKey wants float64 coefficients and an int64 permutation")
        if coef.shape != perm.shape or coef.dim() < 1:
            raise ValueError(f"coef {tuple(coef.shape)} and perm {tuple(perm.shape)} must match")
        if not (coef.is_contiguous() and perm.is_contiguous()):
            raise ValueError("AxisKey tensors must be contiguous")
        if not torch.isfinite(coef).all() or (coef == 0).any():
            raise ValueError("key coefficients must be finite and non-zero")
        size = coef.shape[-1]
        if size and not torch.equal(
            torch.sort(perm, dim=-1).values,
            torch.arange(size).expand_as(perm),
        ):
            raise ValueError("key permutation is not a permutation")
        if self.mix is not None or self.mix_tail is not None:
            if coef.dim() != 1:
                raise ValueError("mixing blocks go with keys shared by every slice")
            blocks = [] if self.mix is None else list(self.mix)
            tail = [] if self.mix_tail is None else [self.mix_tail]
            covered = sum(b.shape[-1] for b in blocks + tail)
            if covered != size:
                raise ValueError(f"mixing blocks cover {covered} positions of an axis of {size}")
            for b in blocks + tail:
                if b.dtype != torch.float64 or b.dim() != 2 or b.shape[0] != b.shape[1]:
                    raise ValueError("mixing blocks must be square float64 matrices")
                if not torch.allclose(b @ b.mT, torch.eye(b.shape[0], dtype=torch.float64), atol=1e-9):
                    raise ValueError("mixing blocks must be orthogonal")

    # cached: read on every mask and unmask (the key's tensors are never replaced)
    @cached_property
    def size(self) -> int:
        return self.coef.shape[-1]

    @cached_property
    def batch_shape(self) -> torch.Size:
        return self.coef.shape[:-1]

    @cached_property
    def identity(self) -> bool:
        """Whether masking with this key changes nothing (coefficients 1, no permutation, no
        mixing): the AsymML mode's keys, whose operands go out as they are."""
        return (self.mix is None and self.mix_tail is None and bool((self.coef == 1).all())
                and torch.equal(self.perm, torch.arange(self.size).expand_as(self.perm)))

    @cached_property
    def inverse_perm(self) -> torch.Tensor:
        """``π⁻¹`` with ``π⁻¹[π[i]] = i``."""
        inv = torch.empty_like(self.perm)
        inv.scatter_(-1, self.perm, torch.arange(self.size).expand_as(self.perm).contiguous())
        return inv

    def indices(self, role: str, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """The gather indices of a role: ``π`` to ``mask``, ``π⁻¹`` to ``unmask`` (int64 or int32)."""
        cache_key = (role, dtype)
        if cache_key not in self._cache:
            if role == "mask":
                idx = self.perm
            elif role == "unmask":
                idx = self.inverse_perm
            else:
                raise ValueError(f"unknown index role {role!r}")
            self._cache[cache_key] = idx.to(dtype).contiguous()
        return self._cache[cache_key]

    def scales(self, role: str, dtype: torch.dtype) -> torch.Tensor:
        """The scale vector this key contributes in one role, cast once per dtype and cached.

        Roles: ``mask-row`` c, ``mask-col`` 1/c, ``unmask-row`` 1/c[π⁻¹], ``unmask-col`` c[π⁻¹].
        """
        cache_key = (role, dtype)
        if cache_key not in self._cache:
            c = self.coef
            if role == "mask-row":
                s = c
            elif role == "mask-col":
                s = 1.0 / c
            elif role == "unmask-row":
                s = 1.0 / torch.gather(c, -1, self.inverse_perm)
            elif role == "unmask-col":
                s = torch.gather(c, -1, self.inverse_perm)
            else:
                raise ValueError(f"unknown scale role {role!r}")
            self._cache[cache_key] = s.to(dtype).contiguous()
        return self._cache[cache_key]

    @cached_property
    def block(self) -> int:
        """The mixing block size g (0: no mixing)."""
        if self.mix is not None:
            return self.mix.shape[-1]
        return self.mix_tail.shape[-1] if self.mix_tail is not None else 0

    def mix_blocks(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The mixing blocks and tail block in `dtype`, cast once and cached."""
        cache_key = ("mix", dtype)
        if cache_key not in self._cache:
            self._cache[cache_key] = tuple(None if b is None else b.to(dtype) for b in (self.mix, self.mix_tail))
        return self._cache[cache_key]

    def fingerprint(self) -> bytes:
        """Bytes identifying this key, to compare keys (tests, never logged or sent)."""
        mixing = b"".join(b.numpy().tobytes() for b in (self.mix, self.mix_tail) if b is not None)
        return self.coef.numpy().tobytes() + self.perm.numpy().tobytes() + mixing


def axis_keygen(
    size: int,
    batch_shape: Sequence[int] = (),
    key_space: KeySpace = DEFAULT_KEY_SPACE,
    random_bytes: RandomBytes = os.urandom,
    mix: int = 0,
) -> AxisKey:
    """A fresh key for one axis of length `size`, per slice of `batch_shape` (``()``: shared).

    `mix` ≥ 2 adds random orthogonal mixing over blocks of `mix` consecutive masked positions
    (the last block shorter when `mix` does not divide `size`)."""
    if size < 1:
        raise ValueError(f"axis size must be positive, got {size}")
    batch_shape = tuple(int(b) for b in batch_shape)
    if any(b < 1 for b in batch_shape):
        raise ValueError(f"batch shape must have positive sizes, got {batch_shape}")
    batch = math.prod(batch_shape)
    coef = key_space.sample(batch * size, random_bytes).reshape(*batch_shape, size)
    perm = random_permutations(size, batch, random_bytes).reshape(*batch_shape, size)
    blocks = tail = None
    if mix >= 2 and size >= 2:
        if batch_shape:
            raise ValueError("mixing goes with keys shared by every slice (batch_shape ())")
        g = min(mix, size)
        k, r = divmod(size, g)
        blocks = random_orthogonal(k, g, random_bytes)
        tail = random_orthogonal(1, r, random_bytes)[0] if r else None
    return AxisKey(torch.from_numpy(coef), torch.from_numpy(perm), blocks, tail)


@dataclass(frozen=True)
class MatmulKey:
    """``sk = (k_m, k_n, k_p)`` for ``C = A @ B`` with ``A: m×n``, ``B: n×p`` (Algorithm 1)."""

    m: AxisKey
    n: AxisKey
    p: AxisKey

    @property
    def parts(self) -> tuple[AxisKey, AxisKey, AxisKey]:
        return (self.m, self.n, self.p)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.m.size, self.n.size, self.p.size)

    def shifted(self, phi: int) -> MatmulKey:
        """The paper's left circular key shift ``⟦sk⟧_φ``: component i becomes ``sk[(i-φ) mod 3]``."""
        parts = self.parts
        return MatmulKey(*(parts[(i - phi) % 3] for i in range(3)))


def keygen(
    m: int,
    n: int,
    p: int,
    *,
    batch_shape: Sequence[int] = (),
    key_space: KeySpace = DEFAULT_KEY_SPACE,
    random_bytes: RandomBytes = os.urandom,
    mix: int | tuple[int, int, int] = 0,
) -> MatmulKey:
    """KGen(m, n, p): a fresh secret key for one offloaded product (Algorithm 1).

    `batch_shape` gives every leading slice of batched operands its own key; ``()`` shares one.
    `mix` adds orthogonal mixing blocks of that size on every axis, or per axis (m, n, p).
    """
    mixes = (mix, mix, mix) if isinstance(mix, int) else tuple(mix)
    return MatmulKey(*(axis_keygen(size, batch_shape, key_space, random_bytes, g)
                       for size, g in zip((m, n, p), mixes)))


_WORKER: ThreadPoolExecutor | None = None


def _key_worker() -> ThreadPoolExecutor:
    """The one thread that draws keys ahead (`KeySchedule(ahead=True)`), started on first use."""
    global _WORKER
    if _WORKER is None:
        _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tempo-keys")
    return _WORKER


class KeySchedule:
    """Which key a product gets: fresh for every product (``refresh="step"``, the default), or
    the paper's choice, one key per layer reused for a whole epoch (``refresh="epoch"``).

    Reusing keys across steps links ciphertexts of different steps (README: what it does not
    protect); it saves one KGen per product, which costs O(m + n + p).
    """

    def __init__(self, refresh: str = "step", key_space: KeySpace = DEFAULT_KEY_SPACE,
                 random_bytes: RandomBytes = os.urandom, mix: int = 0, ahead: bool = False) -> None:
        if refresh not in ("step", "epoch"):
            raise ValueError(f"key refresh must be 'step' or 'epoch', not {refresh!r}")
        if mix < 0 or mix == 1:
            raise ValueError(f"mixing blocks are 0 (none) or at least 2 wide, not {mix}")
        self.refresh = refresh
        self.key_space = key_space
        self.random_bytes = random_bytes
        self.mix = mix  # orthogonal mixing blocks of this size on every axis (0: the paper's keys)
        self._epoch_keys: dict[tuple[int, int, int, int, int], MatmulKey] = {}
        self.generated = 0
        # `ahead`: after handing out a key of a shape, draw the next one of that shape on a worker
        # thread (keys depend on nothing but the CSPRNG, and the next step asks for the same
        # shapes), so mixing keys' orthogonal blocks are drawn while the enclave waits on relays
        self.ahead = ahead
        self._next: dict[tuple[int, int, int], Future] = {}

    def key(self, layer: int, m: int, n: int, p: int, part: int = 0) -> MatmulKey:
        """The key of one part of one layer's product (every part of a product has its own)."""
        if self.refresh == "epoch":
            slot = (layer, part, m, n, p)
            if slot not in self._epoch_keys:
                self._epoch_keys[slot] = self._new(m, n, p)
            return self._epoch_keys[slot]
        return self._new(m, n, p)

    def _new(self, m: int, n: int, p: int) -> MatmulKey:
        self.generated += 1
        if not self.ahead:
            return self._draw(m, n, p)
        shape = (m, n, p)
        pending = self._next.pop(shape, None)
        key = pending.result() if pending is not None else self._draw(m, n, p)
        self._next[shape] = _key_worker().submit(self._draw, m, n, p)  # never handed out twice
        return key

    def _draw(self, m: int, n: int, p: int) -> MatmulKey:
        return keygen(m, n, p, key_space=self.key_space, random_bytes=self.random_bytes, mix=self.mix)

    def new_epoch(self) -> None:
        self._epoch_keys.clear()
