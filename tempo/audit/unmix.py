"""Attacks on block mixing (the ``mixed`` preset): what survives random orthogonal g×g blocks.

A mixing key masks an axis as ``S · Q · P`` (permutation P, block-diagonal orthogonal Q with
blocks of g consecutive masked positions, then a positive scale S per masked position;
`tempo.core.obfuscation._keyed_gather`). A relay holding ``M' = (S_r Q_r P_r) M (S_c Q_c P_c)ᵀ``
(the column side with reciprocal scales) knows where the blocks are (consecutive positions)
and that every block of ``M'`` is ``L_r M_rc R_c`` with invertible ``L_r``, ``R_c``.

What that keeps, exactly, whatever the keys:

- **The rank of every block, and of every union of blocks.** ``rank(M'_rc) = rank(M_rc)``, where
  ``M_rc`` is the plaintext under the secret grouping. Zeros make plaintext blocks singular: a
  conv1 channel silent on a block's 16 positions is a zero row of conv2's patch block. The
  CNN's conv2 ``B'`` holds one ``144 × 64`` patch matrix per sample, all under the same key and
  in the batch's own order, so each sample's ranks over the same 36 blocks form a profile
  in one coordinate system for the whole batch. The profile is read on the wire
  (`rank_profiles`), and samples with near profiles tend to share a label.
- **Dead units.** A unit silent on the whole batch is a zero column of ``A`` (MLP), so its column
  block of ``A'`` loses one rank: ``g − rank(A'[:, block])`` counts dead units per block, exactly
  (`dead_units`).
- **Sparse non-negative vectors of a span, when one side is unmixed.** With only one axis
  mixed, the span of a block strip is the span of the true (sparse, non-negative) rows or
  columns, and those are extreme rays of the span's non-negative cone (`cone_rays`, an LP per
  row). `one_sided_experiment` measures it on synthetic ReLU features with tempo's own keys.
  With both sides mixed, the span of a strip is taken through the other side's unknown blocks
  and no ray survives: the two-sided search is not built (docs/audit-attacks.md says what was
  tried).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from tempo.audit.attacks import _index, _np, operand_kind, spread_steps, train_steps
from tempo.audit.public import Public
from tempo.audit.view import RunView


def block_slices(n: int, g: int) -> list[slice]:
    """The mixing blocks of an axis of length `n`: runs of `g` positions (the last one shorter)."""
    g = max(int(g), 1)
    return [slice(i, min(i + g, n)) for i in range(0, n, g)]


def balance(b: np.ndarray, iters: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Row and column factors ``r``, ``c`` with ``diag(r) · b · diag(c)`` of about unit-norm rows
    and columns: the keys' scales span 1…256 on each side and would swamp a relative rank test."""
    r, c = np.ones(b.shape[0]), np.ones(b.shape[1])
    m = np.abs(b)
    for _ in range(iters):
        rn = np.sqrt((m ** 2).sum(1))
        rn[rn == 0] = 1.0
        m, r = m / rn[:, None], r / rn
        cn = np.sqrt((m ** 2).sum(0))
        cn[cn == 0] = 1.0
        m, c = m / cn[None, :], c / cn
    return r, c


def block_rank(b: np.ndarray, tol: float = 1e-5) -> int:
    """Numerical rank of a (float32-precision) block after balancing its rows and columns."""
    r, c = balance(b)
    sv = np.linalg.svd(r[:, None] * b * c[None, :], compute_uv=False)
    return int((sv > tol * sv[0]).sum()) if len(sv) and sv[0] > 0 else 0


def block_ranks(m: np.ndarray, g: int, tol: float = 1e-5) -> np.ndarray:
    """Ranks of the g×g blocks of the last two axes of `m`: (*leading, row blocks, col blocks)."""
    m = np.asarray(m, dtype=np.float64)
    lead = m.shape[:-2]
    flat = m.reshape(-1, *m.shape[-2:])
    rs, cs = block_slices(m.shape[-2], g), block_slices(m.shape[-1], g)
    out = np.array([[[block_rank(s[r, c], tol) for c in cs] for r in rs] for s in flat])
    return out.reshape(*lead, len(rs), len(cs))


# ---------------------------------------------------------------------------------------------
# per-sample rank profiles (conv layers: one patch matrix per sample, one key for the batch)


@dataclass
class RankProfiles:
    """Per step and layer: each sample's block-rank profile and its nearest other sample, by the
    profile alone (`neighbours_profile`) and by all the rank statistics together (`neighbours`)."""

    profiles: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (batch, blocks)
    neighbours: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    neighbours_profile: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    deficient: dict[tuple[int, int], float] = field(default_factory=dict)  # singular blocks' share


def _nearest(sim: np.ndarray) -> np.ndarray:
    s = sim.copy()
    np.fill_diagonal(s, -np.inf)
    return s.argmax(1)


def profile_similarity(profiles: np.ndarray) -> np.ndarray:
    """Minus the squared Euclidean distance of centred rank profiles (batch × batch)."""
    f = profiles - profiles.mean(0, keepdims=True)
    return -((f[:, None, :] - f[None, :, :]) ** 2).sum(-1)


def rank_neighbours(profiles: np.ndarray) -> np.ndarray:
    """The nearest other sample of each sample by Euclidean distance of centred rank profiles."""
    return _nearest(profile_similarity(profiles))


def null_spaces(b: np.ndarray, tol: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal bases of a block's left (``yᵀ b = 0``) and right (``b v = 0``) null spaces."""
    r, c = balance(b)
    u, sv, vt = np.linalg.svd(r[:, None] * b * c[None, :])
    k = int((sv > tol * sv[0]).sum()) if len(sv) and sv[0] > 0 else 0
    left, right = u[:, k:] * r[:, None], vt[k:].T * c[:, None]
    left = np.linalg.qr(left)[0] if left.shape[1] else left
    right = np.linalg.qr(right)[0] if right.shape[1] else right
    return left, right


def null_space_similarity(m: np.ndarray, g: int, side: str = "left",
                          tol: float = 1e-5) -> np.ndarray:
    """For slices ``m[b] = L · M_b · R`` under one key: per pair of slices, the dimension of the
    intersection of their blocks' null spaces, summed over blocks, over the union's (Jaccard).
    A left null space of a block is spanned by the unmixing rows of the plaintext rows that are
    zero there (a conv1 channel silent on the block's positions), in the same coordinates for
    every slice: two samples share a dimension when they share a silent row."""
    m = np.asarray(m, dtype=np.float64)
    n = m.shape[0]
    inter, dims = np.zeros((n, n)), np.zeros(n)
    which = 0 if side == "left" else 1
    for rs in block_slices(m.shape[1], g):
        for cs in block_slices(m.shape[2], g):
            bases = [null_spaces(s[rs, cs], tol)[which] for s in m]
            k = np.array([x.shape[1] for x in bases])
            dims += k
            if k.max() == 0:
                continue
            stack = np.zeros((n, bases[0].shape[0], k.max()))
            for i, x in enumerate(bases):
                stack[i, :, :x.shape[1]] = x
            cos = np.linalg.svd(np.einsum("aik,bil->abkl", stack, stack), compute_uv=False)
            inter += (cos > 1 - tol).sum(-1)
    np.fill_diagonal(inter, 0.0)
    return inter / (dims[:, None] + dims[None, :] - inter + 1e-9)


def _z(sim: np.ndarray) -> np.ndarray:
    off = sim[~np.eye(len(sim), dtype=bool)]
    return (sim - off.mean()) / (off.std() + 1e-12)


def rank_profiles(view: RunView, public: Public, g: int | None = None, max_steps: int = 6,
                  null_spaces_too: bool = True) -> RankProfiles:
    """Attack ``unmix`` (i): on every product whose operands carry the batch as a leading axis in
    its own order under one key (a convolution: patches ``B'`` and ``D'ᵀ``, one slice per sample),
    each sample's block ranks (its profile), and with `null_spaces_too` the shared null-space
    dimensions of every pair of samples (`null_space_similarity`: left and right for ``B'``,
    left for ``D'ᵀ``). The similarities are standardised and summed; each sample's nearest
    other sample is its neighbour. `g`: the mixing block (public: the preset says it; default
    ``public.mix`` or 16)."""
    g = g or public.mix or 16
    out = RankProfiles()
    for s, layer, p in _spread_products(view, max_steps):
        if p.b.dim() != 3 or p.b.shape[0] < 2:
            continue
        b = _np(p.b)
        r = block_ranks(b, g)
        rows = np.array([sl.stop - sl.start for sl in block_slices(b.shape[-2], g)])
        cols = np.array([sl.stop - sl.start for sl in block_slices(b.shape[-1], g)])
        prof = r.reshape(r.shape[0], -1).astype(np.float64)
        out.profiles[(s, layer)] = prof
        full = np.minimum(rows[:, None], cols[None, :])[None]
        out.deficient[(s, layer)] = float((r < full).mean())
        sim_p = profile_similarity(prof)
        out.neighbours_profile[(s, layer)] = _nearest(sim_p)
        sims = [sim_p]
        if null_spaces_too:
            sims += [null_space_similarity(b, g, "left"), null_space_similarity(b, g, "right")]
            if p.e is not None and p.e.dim() == 3 and p.e.shape[0] == b.shape[0]:
                e = _np(p.e)
                prof_e = block_ranks(e, g).reshape(len(e), -1).astype(np.float64)
                sims += [profile_similarity(prof_e), null_space_similarity(e, g, "left")]
        out.neighbours[(s, layer)] = _nearest(sum(_z(x) for x in sims))
    return out


# ---------------------------------------------------------------------------------------------
# dead units (a linear layer's hidden input: samples × units)


@dataclass
class DeadUnits:
    """Per step and layer: dead units per column block of ``A'``, read from the strips' ranks."""

    per_block: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def total(self, key: tuple[int, int]) -> int:
        return int(self.per_block[key].sum())


def _spread_products(view: RunView, max_steps: int):
    """(step, layer, product) of every whole product of at most `max_steps` training steps."""
    idx = _index(view)
    for s in spread_steps(train_steps(view), max_steps):
        for layer in view.layers():
            if (s, layer) in idx:
                yield s, layer, idx[(s, layer)]


def dead_units(view: RunView, public: Public, g: int | None = None,
               max_steps: int = 8) -> DeadUnits:
    """Attack ``unmix`` (ii): for every hidden linear input ``A'`` (samples × units), ``width −
    rank`` of each column block strip: the number of units of that block silent on the whole
    batch (exact, whatever the mixing)."""
    g = g or public.mix or 16
    out = DeadUnits()
    for s, layer, p in _spread_products(view, max_steps):
        if p.a.dim() != 2:
            continue
        if operand_kind(public.model, layer, "a", public.nlayers(view)) != "hidden":
            continue
        a = _np(p.a)
        if a.shape[0] < g:
            continue
        out.per_block[(s, layer)] = np.array([sl.stop - sl.start - block_rank(a[:, sl])
                                              for sl in block_slices(a.shape[1], g)])
    return out


# ---------------------------------------------------------------------------------------------
# one side mixed: the sparse non-negative rays of a span


def cone_rays(y: np.ndarray, max_lps: int | None = None, seed: int = 0) -> np.ndarray:
    """Vectors ``w`` with ``y @ w`` non-negative and zero on at least ``g − 1`` rows, that is the
    extreme rays of the cone ``{y w ≥ 0}`` (`y`: N × g, a block strip whose other side is not
    mixed). One LP per row r, in random order, rows not yet covered first: minimise
    ``Σ y w`` subject to ``y w ≥ 0`` and ``(y w)_r = 1``; the solution is polished to exact zeros
    (the null vector of the rows where it vanished) and kept if it is a ray. Returns ``W``
    (g × k), columns scaled so that ``y @ W`` tops at 1."""
    from scipy.optimize import linprog

    y = np.asarray(y, dtype=np.float64)
    n, g = y.shape
    y = y / (np.abs(y).max() or 1.0)
    rng = np.random.default_rng(seed)
    live = [int(r) for r in rng.permutation(n) if np.abs(y[r]).max() > 0]
    found: list[np.ndarray] = []
    covered = np.zeros(n, bool)
    obj = y.sum(0)
    for _ in range(max_lps if max_lps is not None else 2 * n):
        if not live:
            break
        live.sort(key=lambda r: covered[r])
        r = live.pop(0)
        if covered[r] and len(found) >= g:
            break
        res = linprog(obj, A_ub=-y, b_ub=np.zeros(n), A_eq=y[r][None, :], b_eq=[1.0],
                      bounds=[(None, None)] * g, method="highs")
        if res.status != 0:
            continue
        v = y @ res.x
        zero = np.abs(v) < 1e-7 * np.abs(v).max()
        if zero.sum() < g - 1:
            continue
        _, sv, vt = np.linalg.svd(y[zero])
        if g > 1 and (len(sv) < g - 1 or sv[g - 2] < 1e-8 * sv[0]):
            continue  # the zeros do not pin a single direction: not a ray
        w = vt[-1]
        v = y @ w
        if v.sum() < 0:
            w, v = -w, -v
        if (v < -1e-6 * np.abs(v).max()).any():
            continue
        w = w / np.abs(v).max()
        covered |= v > 1e-6
        cos = [abs(w @ f) / (np.linalg.norm(w) * np.linalg.norm(f)) for f in found]
        if not any(abs(c - 1) < 1e-9 for c in cos):
            found.append(w)
    return np.stack(found, 1) if found else np.zeros((g, 0))


def relu_features(public: Public, n: int = 64, units: int = 128, seed: int = 0) -> np.ndarray:
    """Synthetic hidden activations an attacker can make: ReLU of the public images through a
    random layer (bias set for about half the entries to be zero), ``n × units``."""
    rng = np.random.default_rng(seed)
    x = public.x.reshape(len(public.x), -1)[rng.choice(len(public.x), n, replace=False)]
    w = rng.normal(size=(x.shape[1], units)) / np.sqrt(x.shape[1])
    z = x @ w
    return np.maximum(z - np.median(z, 0, keepdims=True), 0.0)


def one_sided_experiment(public: Public, g: int, side: str = "rows", seed: int = 0,
                         x: np.ndarray | None = None) -> dict:
    """`cone_rays` against one mixed axis, with tempo's own keys: `x` (default `relu_features`) is
    masked with a mixing key of block `g` on `side` (``rows``: samples mixed, ``cols``: units
    mixed) and a plain key on the other; returns the fraction of non-zero true rows (columns)
    found up to scale (cosine > 0.99; the plain side's key is undone for scoring only)."""
    import torch

    from tempo.core.keys import axis_keygen
    from tempo.core.obfuscation import mask

    x = relu_features(public, seed=seed) if x is None else np.asarray(x, dtype=np.float64)
    src = np.random.default_rng(seed + 1)

    def rbytes(k):
        return src.bytes(k)

    km = axis_keygen(x.shape[0], random_bytes=rbytes, mix=g if side == "rows" else 0)
    kn = axis_keygen(x.shape[1], random_bytes=rbytes, mix=g if side == "cols" else 0)
    masked = mask(torch.from_numpy(x), km, kn).numpy()
    t0 = time.perf_counter()
    if side == "rows":  # rows mixed: search each row block's row span (vectors over units)
        plain = x[:, kn.perm.numpy()] / kn.coef.numpy()[None, :]
        mixed_perm, slices = km.perm.numpy(), block_slices(x.shape[0], g)
        strips = [masked[sl].T for sl in slices]
    else:
        plain = (x[km.perm.numpy()] * km.coef.numpy()[:, None]).T
        mixed_perm, slices = kn.perm.numpy(), block_slices(x.shape[1], g)
        strips = [masked[:, sl] for sl in slices]
    unit = plain / (np.linalg.norm(plain, axis=1, keepdims=True) + 1e-300)
    live = np.linalg.norm(plain, axis=1) > 0
    hits = 0
    for sl, strip in zip(slices, strips):
        v = strip @ cone_rays(strip, seed=seed)
        if v.shape[1] == 0:
            continue
        v = v / np.linalg.norm(v, axis=0, keepdims=True)
        rows = mixed_perm[sl]
        hits += int(((np.abs(unit[rows] @ v).max(1) > 0.99) & live[rows]).sum())
    return {"g": g, "side": side, "recovered": hits / max(int(live.sum()), 1),
            "vectors": int(live.sum()),
            "seconds": round(time.perf_counter() - t0, 3), "chance": 0.0}
