"""Attacks on what relays receive (`RunView`), with public knowledge (`Public`) only.

Every attack here is a pure function of a `RunView` and a `Public`: never a key, never the
enclave's truth (`tempo.audit.score` scores the outputs against `RunTruth`). The masking under
attack is ``mask(M; r, s)[i, j] = c_r[i] / c_s[j] · M[π_r[i], π_s[j]]`` (monomial: a permutation
and a scale per axis), fresh keys per product unless the run reuses them.

What every attack builds on (see docs/audit-attacks.md):

- zeros and (with positive keys) signs survive; ratios of two entries in one row (or column) are
  the plaintext ratio times a ratio of two keys, so a ratio that repeats over many rows (two
  pixels equal in many images) *is* the key ratio: relative scales of all rows and columns come
  out (`factor_grid`), and grey-level images fall back onto their grid;
- double-centred log magnitudes ``log|M| - row mean - column mean + mean`` are a function of
  the plaintext alone (up to the permutations): weights at two steps under fresh keys can be
  matched row to row and column to column (`link_matrices`), which links every step's keys;
- ``C' ⊙ D'ᵀ = C ⊙ Δ`` entrywise (up to the permutations): the keys cancel;
- the zero pattern of a layer's ``Δ`` (ReLU inactive) equals the zero pattern of the next
  layer's masked input: units and samples are matched across layers exactly (`match_zero_patterns`);
- a convolution's im2col patches share their keys over the batch: entries of the same pixel are
  proportional over the batch, and overlapping patches form a jigsaw (`_conv_jigsaw`).

`run_all(view, public, truth=None)` runs the whole battery and, given the truth, scores it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from tempo.audit.public import Public
from tempo.audit.view import ProductView, RunView

# ---------------------------------------------------------------------------------------------
# small tools


def lap(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A minimum-cost assignment (scipy's linear_sum_assignment): rows, columns."""
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(np.nan_to_num(np.asarray(cost, dtype=np.float64), nan=1e18, posinf=1e18))


def _np(t) -> np.ndarray:
    if t is None:
        return None
    if hasattr(t, "detach"):
        t = t.detach().cpu().numpy()
    return np.asarray(t, dtype=np.float64)


def _index(view: RunView) -> dict[tuple[int, int], ProductView]:
    """(step, layer) -> the product, for whole (unpartitioned) products."""
    out: dict[tuple[int, int], list] = {}
    for p in view.products:
        out.setdefault((p.step, p.layer), []).append(p)
    return {k: v[0] for k, v in out.items() if len(v) == 1}


def train_steps(view: RunView, last_layer: int | None = None) -> list[int]:
    """Steps whose last layer got a backward: training steps (evaluation batches are forward only)."""
    idx = _index(view)
    layers = view.layers()
    last = layers[-1] if last_layer is None else last_layer
    return sorted(s for (s, l), p in idx.items() if l == last and p.e is not None)


def spread_steps(steps: list[int], most: int) -> list[int]:
    """At most `most` of `steps`, evenly spread from the first to the last."""
    if len(steps) <= most:
        return steps
    return [steps[int(i)] for i in np.linspace(0, len(steps) - 1, most)]


def double_centred(m: np.ndarray, floor: float = 1e-30) -> np.ndarray:
    """``log|M| - row mean - column mean + mean``: invariant to row and column scaling (and
    equivariant to their permutations). Zeros are floored (`floor`)."""
    lg = np.log(np.abs(m) + floor)
    return lg - lg.mean(0, keepdims=True) - lg.mean(1, keepdims=True) + lg.mean()


def pair_modes(lg: np.ndarray, nz: np.ndarray, tol: float = 2e-6) -> tuple[np.ndarray, np.ndarray]:
    """For every pair of columns (j, k): the most repeated value of ``lg[:, j] - lg[:, k]`` over
    the rows where both are non-zero, and how often it repeats.

    On a masked matrix ``c_r[i]/c_s[j] · M[i, j]`` the difference of logs is the key ratio plus
    the plaintext log ratio; rows where the two plaintext entries are equal all give exactly the
    key ratio, so its count is large when equal values are common (grey levels, saturated pixels).
    """
    d = lg[:, :, None] - lg[:, None, :]
    both = nz[:, :, None] & nz[:, None, :]
    d = np.sort(np.where(both, d, np.nan), axis=0)  # NaN last
    eq = np.abs(np.diff(d, axis=0)) < tol
    run = np.zeros(eq.shape[1:], np.int32)
    best = np.zeros(eq.shape[1:], np.int32)
    pos = np.zeros(eq.shape[1:], np.int64)
    for r in range(eq.shape[0]):
        run = np.where(eq[r], run + 1, 0)
        better = run > best
        best = np.where(better, run, best)
        pos = np.where(better, r, pos)
    val = np.take_along_axis(d, pos[None], 0)[0]
    return val, best + both.any(0)


def spanning_scales(val: np.ndarray, cnt: np.ndarray, min_count: int = 2) -> np.ndarray:
    """Log scales ``s`` with ``s[j] - s[k] = -val[j, k]`` along a maximum spanning tree of the
    counts (Prim). Nodes without an edge of `min_count` are NaN."""
    n = val.shape[0]
    w = np.where((cnt >= min_count) & np.isfinite(val), cnt, 0).astype(np.float64)
    np.fill_diagonal(w, 0)
    s = np.full(n, np.nan)
    done = np.zeros(n, bool)
    for root in np.argsort(-w.sum(1)):
        if done[root] or w[root].sum() == 0:
            continue
        s[root] = 0.0
        done[root] = True
        best = np.where(done, -1.0, w[root])
        parent = np.full(n, root)
        while True:
            k = int(np.argmax(best))
            if best[k] <= 0:
                break
            j = parent[k]
            s[k] = s[j] - val[j, k]  # lg[:, j] - lg[:, k] = s_j - s_k at the mode
            done[k] = True
            best[k] = -1.0
            upd = (~done) & (w[k] > best)
            best = np.where(upd, w[k], best)
            parent = np.where(upd, k, parent)
    return s


def grid_candidates(u: np.ndarray, levels: int = 16, tol: float = 1e-4) -> np.ndarray:
    """The scales ``b`` that put most of the positive values ``u`` on the grid ``b·{1..levels}``
    (all of them tied for the most, largest values first: smallest ``b`` first)."""
    u = u[u > 0]
    if len(u) == 0:
        return np.empty(0)
    cands = (u[:, None] / np.arange(1, levels + 1)[None, :]).ravel()
    q = u[None, :] / cands[:, None]
    rq = np.round(q)
    ok = (np.abs(q - rq) < tol * q) & (rq <= levels) & (rq >= 1)
    cnt = ok.sum(1)
    c = np.sort(cands[cnt == cnt.max()])
    keep = [c[0]]
    for x in c[1:]:
        if x > keep[-1] * (1 + 1e-3):
            keep.append(x)
    return np.array(keep)


@dataclass
class GridFactor:
    """``|M| = diag(a) · K · diag(b)`` with ``K`` on the grid {0..levels}: per column, the
    candidate value vectors (one when the column's scale is determined, several when the column's
    values share a factor and only a prior can tell)."""

    row_scale: np.ndarray
    values: list  # per column: list of int arrays (rows,)

    def first(self) -> np.ndarray:
        return np.stack([v[0] for v in self.values], 1)

    def determined(self) -> np.ndarray:
        return np.array([len(v) == 1 for v in self.values])


def factor_grid(m: np.ndarray, levels: int = 16, rounds: int = 3) -> GridFactor:
    """Put a masked matrix of grid values back on its grid: ``|M'| = a_i · k_ij · b_j``.

    Row scales come from row-pair modes (two images share many equal pixels, saturated ones
    above all); then, alternately, each column's scale is the one that puts its values on the
    grid, and each row's the one that puts it on the grid with the largest values (images reach
    the top level). Works for any key space: it uses equal plaintext values, not the keys.
    """
    a_ = np.abs(np.asarray(m, dtype=np.float64))
    nz = a_ > 0
    lg = np.where(nz, np.log(np.where(nz, a_, 1.0)), 0.0)
    val, cnt = pair_modes(lg.T, nz.T)
    alpha = spanning_scales(val, cnt)
    a = np.exp(np.nan_to_num(alpha))
    for _ in range(rounds):
        u = a_ / a[:, None]
        bc = [grid_candidates(u[:, j], levels) for j in range(a_.shape[1])]
        uniq = np.array([len(c) == 1 for c in bc])
        if not uniq.any():
            break
        b = np.array([c[0] if len(c) else 1.0 for c in bc])
        w = np.where(nz[:, uniq], a_[:, uniq] / b[uniq][None, :], 0.0)
        for i in range(a_.shape[0]):
            cs = grid_candidates(w[i], levels)
            if len(cs):
                a[i] = cs[0]
    u = a_ / a[:, None]
    values = []
    for j in range(a_.shape[1]):
        cs = grid_candidates(u[:, j], levels)
        if len(cs) == 0:
            values.append([np.zeros(a_.shape[0], np.int64)])
        else:
            values.append([np.clip(np.round(u[:, j] / c), 0, levels).astype(np.int64) for c in cs])
    return GridFactor(a, values)


def link_matrices(b1: np.ndarray, b2: np.ndarray, rounds: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Match rows and columns of two maskings of (nearly) the same matrix under independent
    keys: ``row[i]`` is the row of `b2` that is row `i` of `b1`, ``col[j]`` likewise.

    Double-centred log magnitudes are the same function of the plaintext in both. Start from the
    columns matched by their sorted values (free of the row permutation), and separately from
    the rows matched by theirs; then alternate rows and columns by their values; keep the start
    that ends closer. Weights change little from one step to the next, so a layer's weights at
    consecutive steps link the keys of the two steps.
    """
    d1, d2 = double_centred(b1), double_centred(b2)

    def sqdist(x, y):  # rows of x against rows of y
        return (x ** 2).sum(1)[:, None] - 2 * x @ y.T + (y ** 2).sum(1)[None, :]

    starts = []
    f1, f2 = np.sort(d1, 0), np.sort(d2, 0)
    _, col = lap(sqdist(f1.T, f2.T))
    _, row = lap(sqdist(d1, d2[:, col]))
    starts.append((row, col))
    f1, f2 = np.sort(d1, 1), np.sort(d2, 1)
    _, row = lap(sqdist(f1, f2))
    _, col = lap(sqdist(d1.T, d2[row].T))
    starts.append((row, col))
    best = None
    for row, col in starts:
        for _ in range(rounds):
            _, col2 = lap(sqdist(d1.T, d2[row].T))
            _, row2 = lap(sqdist(d1, d2[:, col2]))
            done = (col2 == col).all() and (row2 == row).all()
            row, col = row2, col2
            if done:
                break
        cost = ((d1 - d2[row][:, col]) ** 2).sum()
        if best is None or cost < best[0]:
            best = (cost, row, col)
    return best[1], best[2]


def chain_frames(mats: list[np.ndarray], axis: str) -> list[np.ndarray]:
    """For a sequence of maskings of slowly changing matrices, map each one's rows (``axis="row"``)
    or columns to a common frame (the first one's order): ``frames[t][i]`` is the frame index
    of row i of ``mats[t]``."""
    n = mats[0].shape[0 if axis == "row" else 1]
    frames = [np.arange(n)]
    for m1, m2 in pairwise(mats):
        row, col = link_matrices(m1, m2)
        mp = row if axis == "row" else col
        f = np.empty(n, np.int64)
        f[mp] = frames[-1]
        frames.append(f)
    return frames


def gaussian_swap_search(gram: np.ndarray, sums: np.ndarray, count: int, mean: np.ndarray, prec: np.ndarray,
                         sigma: np.ndarray, max_passes: int = 200) -> np.ndarray:
    """Improve an assignment ``sigma`` (frame column j -> position sigma[j]) of data with Gram
    matrix `gram` and column `sums` (over `count` samples) to the positions of a Gaussian
    (`mean`, precision `prec`) by best swaps of two columns, until none lowers the negative
    log-likelihood ``Σ_n (y_n - mean)ᵀ prec (y_n - mean)``. O(n³) per pass, vectorised."""
    sigma = sigma.copy()
    g = gram
    pm = prec @ mean
    n = len(sigma)
    idx = np.arange(n)
    for _ in range(max_passes):
        q = prec[np.ix_(sigma, sigma)]
        h = pm[sigma]
        r = (q * g).sum(1)
        qg = q @ g
        full = qg.T + qg - r[None, :] - r[:, None]  # Σ_k (Q[j2,k]-Q[j1,k])(G[j1,k]-G[j2,k]) at [j1, j2]
        dq = np.diag(q)
        dg = np.diag(g)
        k1 = (q.T - dq[:, None]) * (dg[:, None] - g)  # k = j1 term: (Q[j2,j1]-Q[j1,j1])(G[j1,j1]-G[j2,j1])
        k2 = (dq[None, :] - q) * (g - dg[None, :])  # k = j2 term: (Q[j2,j2]-Q[j1,j2])(G[j1,j2]-G[j2,j2])
        quad = 2 * (full - k1 - k2) + (dq[None, :] - dq[:, None]) * (dg[:, None] - dg[None, :])
        lin = -2 * (h[None, :] - h[:, None]) * (sums[:, None] - sums[None, :])
        delta = quad + lin
        delta[idx, idx] = 0
        j1, j2 = np.unravel_index(np.argmin(delta), delta.shape)
        if delta[j1, j2] >= -1e-9 * max(1.0, abs(count)):
            break
        sigma[j1], sigma[j2] = sigma[j2], sigma[j1]
    return sigma


def proportional_groups(vecs: np.ndarray, tol: float = 1e-4, window: int = 8, min_support: int = 1) -> np.ndarray:
    """Label rows of `vecs` (non-negative) that are proportional to each other (max-normalised,
    equal within `tol`); rows with fewer than `min_support` non-zeros get -1 (any two rows
    non-zero in one column only are proportional). Rows are sorted by a random projection and
    compared with their neighbours in that order (proportional rows land next to each other)."""
    n = len(vecs)
    mx = vecs.max(1)
    labels = np.full(n, -1)
    live = np.nonzero((mx > 0) & ((vecs > 0).sum(1) >= min_support))[0]
    if len(live) == 0:
        return labels
    u = vecs[live] / mx[live, None]
    proj = u @ np.random.default_rng(1).random(u.shape[1])
    order = np.argsort(proj)
    parent = np.arange(len(live))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for w in range(1, window + 1):
        a, b = order[:-w], order[w:]
        close = np.abs(u[a] - u[b]).max(1) < tol
        for x, y in zip(a[close], b[close]):
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
    roots = np.array([find(a) for a in range(len(live))])
    labels[live] = np.unique(roots, return_inverse=True)[1]
    return labels


# the eight symmetries of the square, as 2×2 integer matrices acting on (row, col) offsets
_D4 = [np.array(m) for m in (
    [[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]],
    [[-1, 0], [0, 1]], [[1, 0], [0, -1]], [[0, 1], [1, 0]], [[0, -1], [-1, 0]],
)]


@dataclass
class Jigsaw:
    """A convolution's im2col operand put back together (one input channel).

    ``offset[j]``: the (row, col) offset of masked patch element j (up to a symmetry of the
    square, fixed afterwards by the caller); ``coord[k]``: the (row, col) of masked position k
    (``-1`` where unknown); ``scale[j, k]``: the key scale of entry (j, k) up to one global factor.
    """

    offset: np.ndarray
    coord: np.ndarray
    scale: np.ndarray
    groups: np.ndarray  # entry (j, k) -> pixel group (-1 for zeros)
    center: int


def _relations(groups: np.ndarray, center: int, ne: int, npos: int) -> np.ndarray:
    """``t[j, k]`` = the position k' with pixel(k') == pixel(k) + offset(j), via the center
    element (-1 where unknown)."""
    g = groups.reshape(ne, npos)
    where = {}
    for k in range(npos):
        if g[center, k] >= 0:
            where.setdefault(g[center, k], []).append(k)
    t = -np.ones((ne, npos), np.int64)
    for j in range(ne):
        for k in range(npos):
            ks = where.get(g[j, k]) if g[j, k] >= 0 else None
            if ks is not None and len(ks) == 1:
                t[j, k] = ks[0]
    return t


def _compose_score(ta: np.ndarray, tb: np.ndarray, tc: np.ndarray) -> tuple[int, int]:
    """How often ``tb∘ta`` agrees / disagrees with ``tc`` where all are defined."""
    ab = np.where(ta >= 0, tb[np.clip(ta, 0, None)], -1)
    ab = np.where(ta >= 0, ab, -1)
    both = (ab >= 0) & (tc >= 0)
    return int((ab[both] == tc[both]).sum()), int((ab[both] != tc[both]).sum())


def conv_jigsaw(patches: np.ndarray, kernel: tuple[int, int] = (3, 3)) -> Jigsaw | None:
    """Solve the jigsaw of one input channel's masked im2col patches ``(batch, kh·kw, positions)``
    (keys shared over the batch). Entries of the same pixel are proportional over the batch;
    the center element reaches every pixel; the other elements are translations of it, whose
    compositions tell the axis offsets from the diagonals. Returns None when it cannot."""
    bsz, ne, npos = patches.shape
    if tuple(kernel) != (3, 3):
        return None
    vec = np.abs(patches).transpose(1, 2, 0).reshape(ne * npos, bsz)
    groups = proportional_groups(vec)
    if groups.max() < 0:
        return None
    geo = _jigsaw_geometry(groups, ne, npos)
    if geo is None:
        return None
    offset, coord, center = geo
    scale = _key_scales(vec, groups, ne, npos)
    if scale is None:
        return None
    return Jigsaw(offset, coord, scale, groups, center)


def _jigsaw_geometry(groups: np.ndarray, ne: int, npos: int):
    """(offset per element, coordinate per position, center) from the pixel groups of the
    entries (element j, position k) of one channel's 3×3 patches; None if it does not solve."""
    # the center element: the one from which the others are translations in inverse pairs
    # (pixel(j, k) = pixel(k) + offset(j), and offsets come in pairs ±o only around the center)
    ident = np.arange(npos)
    best = None
    for cand in range(ne):
        t_c = _relations(groups, cand, ne, npos)
        others_c = [j for j in range(ne) if j != cand]
        inv = {}
        for a in others_c:
            for b in others_c:
                if a < b:
                    ok1, bad1 = _compose_score(t_c[a], t_c[b], ident)
                    ok2, bad2 = _compose_score(t_c[b], t_c[a], ident)
                    inv[(a, b)] = ok1 + ok2 - 5 * (bad1 + bad2)
        pairs_c, used = [], set()
        for (a, b) in sorted(inv, key=lambda ab: -inv[ab]):
            if a not in used and b not in used and inv[(a, b)] > 0:
                pairs_c.append((a, b))
                used |= {a, b}
        score = sum(inv[pq] for pq in pairs_c[:4])
        if best is None or (len(pairs_c), score) > best[0]:
            best = ((len(pairs_c), score), cand, t_c, pairs_c[:4])
    _, center, t, pairs = best
    others = [j for j in range(ne) if j != center]
    if len(pairs) != 4:
        return None

    def cross(p, q):  # how well compositions of members of p and q are other elements
        s = 0
        for a in p:
            for b in q:
                best = max((_compose_score(t[a], t[b], t[c]) for c in others if c not in (a, b)),
                           key=lambda x: x[0] - 5 * x[1])
                s += best[0] - 5 * best[1]
        return s

    best, axes = None, None
    for i in range(4):
        for j in range(i + 1, 4):
            sc = cross(pairs[i], pairs[j])
            if best is None or sc > best:
                best, axes = sc, (pairs[i], pairs[j])
    offset = np.zeros((ne, 2), np.int64)
    (xp, xm), (yp, ym) = axes
    offset[xp], offset[xm], offset[yp], offset[ym] = (0, 1), (0, -1), (1, 0), (-1, 0)
    for c in others:
        if c in (xp, xm, yp, ym):
            continue
        cands = [(a, b) for a in (xp, xm) for b in (yp, ym)]
        def fit(ab, c=c):
            ok, bad = _compose_score(t[ab[0]], t[ab[1]], t[c])
            return ok - 5 * bad

        a, b = max(cands, key=fit)
        offset[c] = offset[a] + offset[b]
    # coordinates of positions: BFS over the relations, largest component first
    coord = np.full((npos, 2), np.iinfo(np.int64).min)
    comp = -np.ones(npos, np.int64)
    ncomp = 0
    for start in np.argsort(-(t >= 0).sum(0)):
        if comp[start] >= 0 or not (t[:, start] >= 0).any() and not (t >= 0)[:, :].any():
            continue
        if comp[start] >= 0:
            continue
        comp[start] = ncomp
        coord[start] = (0, 0)
        stack = [start]
        while stack:
            k = stack.pop()
            for j in others:
                k2 = t[j, k]
                if k2 >= 0 and comp[k2] < 0:
                    comp[k2] = ncomp
                    coord[k2] = coord[k] + offset[j]
                    stack.append(k2)
            for j in others:  # reverse relations
                for k0 in np.nonzero(t[j] == k)[0]:
                    if comp[k0] < 0:
                        comp[k0] = ncomp
                        coord[k0] = coord[k] - offset[j]
                        stack.append(k0)
        ncomp += 1
    sizes = np.bincount(comp[comp >= 0], minlength=max(ncomp, 1))
    main = int(np.argmax(sizes))
    coord = np.where((comp == main)[:, None], coord, -(10**9))
    return offset, coord, center


def _key_scales(vec: np.ndarray, groups: np.ndarray, ne: int, npos: int) -> np.ndarray | None:
    """Key scales ``exp(alpha_j - beta_k)`` of entries (j, k) by least squares on the log ratios
    of proportional entries (same pixel); up to one global factor and a geometric ramp over
    the pixels (which only the values' grid can fix: `fix_ramp`)."""
    rows, rhs = [], []
    lv = np.log(np.where(vec > 0, vec, 1.0))
    live = np.nonzero(groups >= 0)[0]
    order = live[np.argsort(groups[live], kind="stable")]
    bounds = np.nonzero(np.diff(groups[order]))[0] + 1
    for mem in np.split(order, bounds):
        if len(mem) < 2:
            continue
        ref = mem[0]
        nzr = vec[ref] > 0
        jr, kr = divmod(ref, npos)
        for m in mem[1:]:
            jm, km = divmod(m, npos)
            row = np.zeros(ne + npos)
            row[jm] += 1
            row[ne + km] -= 1
            row[jr] -= 1
            row[ne + kr] += 1
            rows.append(row)
            rhs.append(np.mean(lv[m, nzr] - lv[ref, nzr]))
    if not rows:
        return None
    a_mat = np.array(rows)
    sol = np.linalg.lstsq(np.vstack([a_mat, 1e-6 * np.eye(ne + npos)]),
                          np.concatenate([rhs, np.zeros(ne + npos)]), rcond=None)[0]
    return np.exp(sol[:ne, None] - sol[None, ne:])


def jigsaw_images(patches: np.ndarray, jig: Jigsaw, hw: tuple[int, int], levels: int = 16) -> list[np.ndarray]:
    """Candidate grey-level images (batch, H, W), one per symmetry of the square and placement
    that fits the grid (positions and non-zero pixels inside it), from the patches and their
    solved jigsaw; values put on the grid once (`fix_ramp`), in the jigsaw's own frame."""
    bsz, ne, _ = patches.shape
    h, w = hw
    vec = np.abs(patches) / jig.scale[None]
    known = jig.coord[:, 0] > -(10**8)
    nz = np.abs(patches[:, :, known]).max(0) > 0  # (ne, known)
    if not nz.any():
        return []
    crd = jig.coord[known]
    pix = crd[None, :, :] + jig.offset[:, None, :]  # (ne, known, 2)
    lo = pix[nz].min(0)
    hi = pix[nz].max(0)
    if (hi - lo >= (max(h, w),) * 2).any():
        return []
    canvas = np.zeros((bsz, *(hi - lo + 1)))
    cnt = np.zeros(hi - lo + 1)
    vals = vec[:, :, known]
    for j in range(ne):
        sel = nz[j]
        rr, cc = pix[j, sel, 0] - lo[0], pix[j, sel, 1] - lo[1]
        np.add.at(canvas, (slice(None), rr, cc), vals[:, j, sel])
        np.add.at(cnt, (rr, cc), 1)
    grid = fix_ramp(canvas / np.maximum(cnt, 1), levels)
    pts = np.argwhere(cnt > 0)  # canvas pixels with a value
    pv = grid[:, pts[:, 0], pts[:, 1]]
    pts = pts + lo
    out = []
    for rot in _D4:
        p2 = pts @ rot.T
        c2 = crd @ rot.T
        lo2 = np.minimum(p2.min(0), c2.min(0))
        hi2 = np.maximum(p2.max(0), c2.max(0))
        span = hi2 - lo2
        if span[0] >= h or span[1] >= w:
            continue
        for dr in range(h - span[0]):
            for dc in range(w - span[1]):
                q = p2 - lo2 + (dr, dc)
                img = np.zeros((bsz, h, w), np.int64)
                img[:, q[:, 0], q[:, 1]] = pv
                out.append(img)
    return out


def fix_ramp(imgs: np.ndarray, levels: int = 16) -> np.ndarray:
    """Grid values from images known up to ``G·exp(u·(row, col))`` (a global scale and a
    geometric ramp: what the jigsaw's equalities cannot see). Each pixel's own scale is the one
    that puts its values over the batch on the grid; a plane through the log scales of the
    pixels whose scale is determined gives the ramp; every pixel is divided by the plane."""
    _, h, w = imgs.shape
    rows, logs = [], []
    for r in range(h):
        for c in range(w):
            cs = grid_candidates(imgs[:, r, c], levels)
            if len(cs) == 1:
                rows.append((1.0, r, c))
                logs.append(np.log(cs[0]))
    if len(rows) < 3:
        top = imgs.max()
        return np.clip(np.round(imgs / (top / levels)), 0, levels).astype(np.int64) if top > 0 else np.zeros(imgs.shape, np.int64)
    a = np.array(rows)
    y = np.array(logs)
    keep = np.ones(len(y), bool)
    for _ in range(4):
        coef = np.linalg.lstsq(a[keep], y[keep], rcond=None)[0]
        res = np.abs(a @ coef - y)
        new = res < max(0.01, np.median(res[keep]) * 3)
        if new.sum() < 3 or (new == keep).all():
            break
        keep = new
    rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    f = np.exp(coef[0] + coef[1] * rr + coef[2] * cc)
    return np.clip(np.round(imgs / f[None]), 0, levels).astype(np.int64)


def match_zero_patterns(z1: np.ndarray, z2: np.ndarray, rounds: int = 8, refine: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Match rows and columns of two binary matrices that are (nearly) the same up to row and
    column permutations: ``row[i]`` is the row of `z2` matching row i of `z1`, ``col[j]`` likewise.

    Colour refinement (Weisfeiler-Lehman) on the two bipartite graphs at once: a row's colour is
    hashed from its colour and the multiset of its columns' colours, and vice versa; equal
    colours pair up. Then a few rounds of assignment on Hamming distances settle ties and noise.
    """
    z1 = np.asarray(z1, bool)
    z2 = np.asarray(z2, bool)
    r1, c1 = z1.shape
    rng = np.random.default_rng(12345)
    rc = np.concatenate([z1.sum(1), z2.sum(1)])
    cc = np.concatenate([z1.sum(0), z2.sum(0)])
    zz1, zz2 = z1.astype(np.uint64), z2.astype(np.uint64)

    def relabel(x):
        return np.unique(x, return_inverse=True)[1]

    rc, cc = relabel(rc), relabel(cc)
    for _ in range(rounds):
        hr = rng.integers(1, 2**62, size=cc.max() + 1, dtype=np.uint64)
        hc = rng.integers(1, 2**62, size=rc.max() + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            nr = np.concatenate([zz1 @ hr[cc[:c1]], zz2 @ hr[cc[c1:]]])
            nc = np.concatenate([zz1.T @ hc[rc[:r1]], zz2.T @ hc[rc[r1:]]])
        nr = relabel(np.stack([rc, relabel(nr)], 1) @ np.array([1, rc.max() + 1]))
        nc = relabel(np.stack([cc, relabel(nc)], 1) @ np.array([1, cc.max() + 1]))
        stable = nr.max() == rc.max() and nc.max() == cc.max()
        rc, cc = nr, nc
        if stable:
            break
    # assignment on colours (equal colour: cost 0), then on Hamming distances
    rcost = (rc[:r1, None] != rc[None, r1:]).astype(np.float64)
    ccost = (cc[:c1, None] != cc[None, c1:]).astype(np.float64)
    _, row = lap(rcost + 1e-3 * np.abs(z1.sum(1)[:, None] - z2.sum(1)[None, :]))
    _, col = lap(ccost + 1e-3 * np.abs(z1.sum(0)[:, None] - z2.sum(0)[None, :]))
    f1, f2 = z1.astype(np.float64), z2.astype(np.float64)
    for _ in range(refine):
        a = f2[row]  # rows aligned
        _, col2 = lap(-(f1.T @ a) - ((1 - f1).T @ (1 - a)) + 0.5 * ccost)
        b = f2[:, col2]
        _, row2 = lap(-(f1 @ b.T) - ((1 - f1) @ (1 - b).T) + 0.5 * rcost)
        if (row2 == row).all() and (col2 == col).all():
            break
        row, col = row2, col2
    return row, col


def _sign_factors(m: np.ndarray, rounds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Row and column signs (σ, τ) with ``sign(m) = σ τᵀ`` on the non-zeros, as near as can be
    (exact for a non-negative plaintext under signed keys)."""
    s = np.sign(m)
    sig = np.ones(m.shape[0])
    tau = np.ones(m.shape[1])
    for _ in range(rounds):
        tau = np.where((sig[:, None] * s).sum(0) >= 0, 1.0, -1.0)
        new = np.where((s * tau[None, :]).sum(1) >= 0, 1.0, -1.0)
        if (new == sig).all():
            break
        sig = new
    return sig, tau


# ---------------------------------------------------------------------------------------------
# 4. input reconstruction


@dataclass
class ImageRecovery:
    """Recovered images per step, grey levels 0..levels, ``(batch, H, W)``: rows in the order
    the relay saw them (MLP: the rows of layer 0's masked ``A'``, permuted by its key; CNN: the
    batch order, which convolution keys do not permute)."""

    images: dict[int, np.ndarray]
    levels: int
    model: str
    pixel_frame: np.ndarray | None = None  # MLP: frame column -> pixel position
    frames: dict[int, np.ndarray] = field(default_factory=dict)  # MLP: step -> (masked column -> frame column)
    factors: dict[int, GridFactor] = field(default_factory=dict)  # MLP: the grid factor of each step's A'
    seconds: float = 0.0


def _mlp_images(view: RunView, public: Public) -> ImageRecovery:
    idx = _index(view)
    steps = sorted(s for (s, l) in idx if l == 0)
    npx = public.pixels
    frames = dict(zip(steps, chain_frames([_np(idx[(s, 0)].b) for s in steps], "row")))
    fac = {s: factor_grid(_np(idx[(s, 0)].a), public.levels) for s in steps}
    log_h = np.log(public.histograms())
    pool, known = [], []
    for s in steps:
        k = fac[s].first()
        kf = np.zeros_like(k)
        kf[:, frames[s]] = k
        mf = np.zeros(k.shape, bool)
        mf[:, frames[s]] = fac[s].determined()[None, :]
        pool.append(kf)
        known.append(mf)
    pool = np.concatenate(pool)
    known = np.concatenate(known)
    cost = np.stack([-log_h[:, pool[known[:, j], j]].sum(1) / max(int(known[:, j].sum()), 1) for j in range(npx)])
    _, sigma = lap(cost)  # frame column -> pixel, by each pixel's grey-level histogram
    g = public.grid().astype(np.float64)
    cov = np.cov(g.T) + 0.3 * np.eye(npx)
    xp = pool.astype(np.float64)
    # then by the pixels' joint statistics (a Gaussian fitted to the public sample)
    sigma = gaussian_swap_search(xp.T @ xp, xp.sum(0), len(xp), g.mean(0), np.linalg.inv(cov), sigma)
    images = {}
    for s in steps:
        f = fac[s]
        img = np.zeros((len(f.row_scale), npx), np.int64)
        for j in range(npx):
            q = sigma[frames[s][j]]
            img[:, q] = min(f.values[j], key=lambda kk: -log_h[q, kk].sum())  # MAP among the scales that fit
        images[s] = img.reshape(len(img), *public.image_shape[-2:])
    return ImageRecovery(images, public.levels, "mlp", sigma, frames, fac)


def _cnn_images(view: RunView, public: Public) -> ImageRecovery:
    idx = _index(view)
    steps = sorted(s for (s, l) in idx if l == 0)
    g = public.grid().astype(np.float64)
    hw = public.image_shape[-2:]
    images = {}
    for s in steps:
        op = idx[(s, 0)]
        if public.patch_rows and op.a.dim() == 2:  # patches @ Wᵀ: rows are (image, position) in order
            rows, positions = _np(op.a), int(np.prod(hw))
            if rows.shape[0] % positions:
                continue
            patches = rows.reshape(rows.shape[0] // positions, positions, -1).transpose(0, 2, 1)
        else:
            patches = _np(op.b)
        jig = conv_jigsaw(patches)
        cands = jigsaw_images(patches, jig, hw, public.levels) if jig is not None else []
        if not cands:
            continue
        # the symmetry of the square (and placement) under which the batch looks most like the public sample
        best = min(cands, key=lambda c: _knn_distance(c.reshape(len(c), -1).astype(np.float64), g).mean())
        images[s] = best
    return ImageRecovery(images, public.levels, "cnn")


def _knn_distance(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    d = (x ** 2).sum(1)[:, None] - 2 * x @ ref.T + (ref ** 2).sum(1)[None, :]
    return d.min(1)


def recover_images(view: RunView, public: Public) -> ImageRecovery:
    """Rebuild the input images of every step from the first layer's masked data operand.

    MLP (``A' = mask(x; m, n)``): `factor_grid` puts every step's ``A'`` back on the grey-level
    grid (up to its row and column permutations); layer 0's weights ``B'`` (rows keyed like the
    pixels) link the pixel permutations of all steps (`chain_frames`), so the images of the
    whole run are pooled in one column order; the public sample's per-pixel grey-level
    histograms and a Gaussian of its pixels then place the columns. CNN (im2col patches with
    keys shared over the batch): `conv_jigsaw` and `jigsaw_images`, the symmetry of the square
    chosen by the nearest public images.
    """
    t0 = time.perf_counter()
    rec = _mlp_images(view, public) if public.model == "mlp" else _cnn_images(view, public)
    rec.seconds = time.perf_counter() - t0
    return rec


def classify_images(images: np.ndarray, public: Public, k: int = 5) -> np.ndarray:
    """Labels of grey-level images by their k nearest public images (a public classifier)."""
    x = images.reshape(len(images), -1).astype(np.float64)
    g = public.grid().astype(np.float64)
    d = (x ** 2).sum(1)[:, None] - 2 * x @ g.T + (g ** 2).sum(1)[None, :]
    nn = np.argsort(d, 1)[:, :k]
    votes = np.zeros((len(x), public.classes))
    for r in range(k):
        np.add.at(votes, (np.arange(len(x)), public.y[nn[:, r]]), 1.0 / (1 + r))
    return votes.argmax(1)


# ---------------------------------------------------------------------------------------------
# 3. labels from the last layer's Δ


def label_columns(e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From the last layer's masked ``D'ᵀ`` (batch × classes, ``Δ = softmax − onehot`` scaled
    ``c_p[k] / c_m[i]``): each row's label column, and the class keys' reciprocals ``w`` (up to
    one factor). Every row of ``Δ`` sums to zero, so ``D'ᵀ w = 0`` with ``w = 1/c_p``: ``w`` is
    the null vector of ``D'ᵀ``; ``D'ᵀ diag(w)`` is ``Δ`` up to a (signed) scale per row, whose
    one entry of the other sign (or zero) is the label's. Any key space."""
    e = np.asarray(e, dtype=np.float64)
    _, _, vt = np.linalg.svd(e, full_matrices=True)
    w = vt[-1]
    if (w < 0).sum() > (w > 0).sum():
        w = -w
    d = e * w[None, :]
    cols = np.empty(len(d), np.int64)
    for i, row in enumerate(d):
        maj = 1.0 if (row > 0).sum() >= (row < 0).sum() else -1.0
        cols[i] = int(np.argmin(maj * row))  # the entry of the other sign (or the zero)
    return cols, w


def chain_links(mats: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Row and column frames (the first matrix's order) for a sequence of maskings of slowly
    changing weights, each linked to the one before (`link_matrices`)."""
    nr, nc = mats[0].shape
    rows, cols = [np.arange(nr)], [np.arange(nc)]
    for m1, m2 in pairwise(mats):
        r, c = link_matrices(m1, m2)
        fr = np.empty(nr, np.int64)
        fr[r] = rows[-1]
        fc = np.empty(nc, np.int64)
        fc[c] = cols[-1]
        rows.append(fr)
        cols.append(fc)
    return rows, cols


# ---------------------------------------------------------------------------------------------
# 5. MLP structure: units matched across layers and steps


@dataclass
class MLPStructure:
    """How the keys of an MLP's products relate, recovered from the relay's view.

    ``in_frames[l][s]`` / ``out_frames[l][s]``: frame of each masked row / column of layer l's
    weight operand ``B'`` at step s (input units / output units; frames are a fixed labelling
    of the units over the run). ``unit_map[l][f]``: the input frame of layer l+1 that is output
    frame f of layer l. ``row_maps[l][s][i]``: the masked row (sample) of product l+1 that is
    masked row i of product l at step s."""

    steps: list[int]
    layers: list[int]
    in_frames: dict[int, dict[int, np.ndarray]]
    out_frames: dict[int, dict[int, np.ndarray]]
    unit_map: dict[int, np.ndarray]
    row_maps: dict[int, dict[int, np.ndarray]]
    unit_votes: dict[int, np.ndarray]

    step_cols: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)

    def unit_cols(self, l: int, s: int) -> np.ndarray:
        """At step s: for each masked output column of layer l, the masked input row of layer
        l+1's ``B'`` (= masked column of its ``A'``) that is the same unit: the step's own match
        for the units active on its batch, the run's (frames) for the others."""
        framed = np.argsort(self.in_frames[l + 1][s])[self.unit_map[l][self.out_frames[l][s]]]
        if s not in self.step_cols.get(l, {}):
            return framed
        col, dead = self.step_cols[l][s]
        out = np.where(dead, -1, col)
        free = [j for j in framed[dead] if j not in set(col[~dead])]
        rest = [j for j in range(len(col)) if j not in set(out[out >= 0]) and j not in free]
        fill = iter(free + rest)
        return np.array([c if c >= 0 else next(fill) for c in out])


def mlp_structure(view: RunView, steps: list[int] | None = None) -> MLPStructure:
    """Link every product of an MLP run: weights across steps (`chain_links`: frames for every
    layer's input and output units, the last layer's class columns included), and each layer's
    outputs to the next layer's inputs within a step (`match_units`: zero patterns of ``D'ᵀ``
    and the next ``A'``, then the gradient chain), voted over all steps in frame terms (a unit
    dead in one batch is told apart in others)."""
    idx = _index(view)
    layers = view.layers()
    steps = steps or train_steps(view)
    in_frames, out_frames = {}, {}
    for l in layers:
        r, c = chain_links([_np(idx[(s, l)].b) for s in steps])
        in_frames[l] = dict(zip(steps, r))
        out_frames[l] = dict(zip(steps, c))
    unit_map, row_maps, votes_out, step_cols = {}, {}, {}, {}
    for l in layers[:-1]:
        nxt = l + 1
        n_out = idx[(steps[0], l)].b.shape[1]
        votes = np.zeros((n_out, n_out))
        row_maps[l], step_cols[l] = {}, {}
        for s in steps:
            p, q = idx[(s, l)], idx[(s, nxt)]
            row, col, dead = match_units(_np(p.e), _np(q.a), _np(q.e), _np(q.b))
            row_maps[l][s] = row
            step_cols[l][s] = (col, dead)
            np.add.at(votes, (out_frames[l][s][~dead], in_frames[nxt][s][col[~dead]]), 1.0)
        _, unit_map[l] = lap(-votes)
        votes_out[l] = votes
    return MLPStructure(steps, layers, in_frames, out_frames, unit_map, row_maps, votes_out, step_cols)


def match_units(e: np.ndarray, a_next: np.ndarray, e_next: np.ndarray | None = None,
                b_next: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match layer l's output units and samples to layer l+1's inputs within one step.

    Zeros: ``D'ᵀ_l`` is zero exactly where the ReLU was inactive, as is ``A'_{l+1}``
    (`match_zero_patterns`). Values settle units whose pattern others share (always active):
    ``(D'ᵀ_{l+1} B'_{l+1}ᵀ)[i', j] / D'ᵀ_l[i, k] = (c_n[j]/c_p[k]) · (c_m[i]/c_m'[i'])`` on the
    active entries of a matched pair (both are the gradient w.r.t. the same activation): its log
    is a row effect plus a unit effect, exactly, only for the right pair.
    Returns (row, col, dead): ``row[i]``/``col[k]`` the sample/unit of the next product, and the
    units inactive on the whole batch (matched arbitrarily here)."""
    z1 = e == 0
    z2 = a_next == 0
    row, col = match_zero_patterns(z1, z2)
    dead = z1.all(0)
    if e_next is None or b_next is None:
        return row, col, dead
    g = e_next @ b_next.T  # masked dL/d(next input): rows keyed like A'_{l+1}, columns like its inputs
    with np.errstate(divide="ignore", invalid="ignore"):
        l1 = np.log(np.abs(e))
        l2 = np.log(np.abs(g[row]))  # rows aligned to e's
    act = ~z1
    _, inv, cnt = np.unique(z1.T, axis=0, return_inverse=True, return_counts=True)
    uniq = (cnt[inv.ravel()] == 1) & ~dead
    if uniq.sum() < 2:
        return row, col, dead
    r = np.where(act[:, uniq], l2[:, col[uniq]] - l1[:, uniq], np.nan)  # = u_k + v_i on active entries
    u = np.zeros(uniq.sum())
    v = np.zeros(len(e))
    for _ in range(4):
        v = np.nan_to_num(np.nanmedian(r - u[None, :], 1))
        u = np.nan_to_num(np.nanmedian(r - v[:, None], 0))
    # spread of (l2[:, j] - l1[:, k] - v) over k's active rows, for every pair (k, j)
    live = ~dead
    k_idx = np.nonzero(live)[0]
    a = act[:, k_idx].astype(np.float64)
    n = np.maximum(a.sum(0), 1)
    x = np.where(act[:, k_idx], -l1[:, k_idx] - v[:, None], 0.0)  # (rows, K)
    y = np.nan_to_num(l2, neginf=-1e3, posinf=1e3)  # (rows, J)
    s1 = (a.T @ y + (x.T @ np.ones_like(y)) * 0)  # Σ_i a_ik y_ij
    sx = x.sum(0)
    mean = (s1 + sx[:, None]) / n[:, None]
    s2 = a.T @ (y ** 2) + 2 * (x.T @ y) + (x ** 2).sum(0)[:, None]
    var = np.maximum(s2 / n[:, None] - mean ** 2, 0.0)
    f1 = z1.astype(np.float64)
    f2 = z2[row].astype(np.float64)  # rows aligned
    hamming = f1.T @ (1 - f2) + (1 - f1).T @ f2
    cost = np.full((len(e[0]), len(e[0])), 1e6)
    cost[k_idx] = np.minimum(np.sqrt(var), 10.0) + 100.0 * hamming[k_idx]
    cost[dead] = 1e3 + (z2.all(0)[None, :] == 0) * 1.0  # dead units to dead columns when possible
    _, col2 = lap(cost)
    return row, col2, dead


# ---------------------------------------------------------------------------------------------
# 5b. model stealing (MLP)


@dataclass
class StolenMLP:
    """A ReLU MLP assembled from one step's masked weights: ``weights[l]`` (in × out, input
    rows in pixel order for the first layer), ``biases[l]``; outputs are the masked class
    columns of that step, ``classes[c]`` the label of column c (-1 unknown)."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    classes: np.ndarray
    step: int

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = x.reshape(len(x), -1).astype(np.float64)
        for l, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = h @ w + b
            if l < len(self.weights) - 1:
                h = np.maximum(h, 0.0)
        return h

    def predict(self, x: np.ndarray) -> np.ndarray:
        cols = self.logits(x).argmax(1)
        return self.classes[cols]


def _fit_units(h: np.ndarray, z: np.ndarray, iters: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``h[i, k] = ρ_i · τ_k · (z[i, k] + β_k)`` where ``h`` is non-zero (the next layer's masked
    input against this layer's stolen pre-activation): alternating least squares.
    Returns (τ, β, ρ); units with no active sample get τ = 0."""
    act = h != 0
    n, k = h.shape
    rho = np.ones(n)
    tau = np.zeros(k)
    beta = np.zeros(k)
    cnt = act.sum(0)
    for _ in range(iters):
        y = h / rho[:, None]
        for j in range(k):
            a = act[:, j]
            if cnt[j] == 0:
                tau[j], beta[j] = 0.0, 0.0
            elif cnt[j] < 3:
                zz = z[a, j]
                tau[j] = (y[a, j] @ zz) / max(zz @ zz, 1e-300)
                beta[j] = 0.0
            else:
                x = np.stack([z[a, j], np.ones(cnt[j])], 1)
                sol = np.linalg.lstsq(x, y[a, j], rcond=None)[0]
                tau[j] = sol[0]
                beta[j] = sol[1] / sol[0] if sol[0] != 0 else 0.0
        pred = tau[None, :] * (z + beta[None, :])
        num = np.where(act, h * pred, 0).sum(1)
        den = np.where(act, pred * pred, 0).sum(1)
        rho = np.where(den > 0, num / np.maximum(den, 1e-300), rho)
        rho /= np.median(np.abs(rho[rho != 0])) if (rho != 0).any() else 1.0
    return tau, beta, rho


def steal_mlp(view: RunView, public: Public, images: ImageRecovery, structure: MLPStructure,
              column_labels: np.ndarray | None = None, step: int | None = None) -> StolenMLP:
    """Assemble the MLP from one training step (the last by default): first layer's rows put in
    pixel order and scaled back by the grid factor's column scales; each hidden layer's units
    matched to the next layer's inputs (`MLPStructure`); per unit, the scale and bias that map
    the stolen pre-activation of the recovered images onto the next layer's masked input
    (`_fit_units`: ReLU nets are invariant to a positive scale per unit); the classifier's
    columns rescaled by ``1/w`` (`label_columns`) and its biases fitted to ``log Δ`` (the
    softmax's non-label entries are the probabilities). Nothing but the relay's view."""
    idx = _index(view)
    layers = structure.layers
    t = step if step is not None else structure.steps[-1]
    p0 = idx[(t, layers[0])]
    a0 = _np(p0.a)
    fac = images.factors[t]
    x_img = images.images[t].reshape(len(a0), -1).astype(np.float64)
    frames = images.frames[t]
    pix = images.pixel_frame[frames]  # masked column j of A'_0 -> pixel
    sig, _ = _sign_factors(a0)
    a_signed = fac.row_scale * sig
    kk = x_img[:, pix]
    b = np.full(a0.shape[1], np.nan)
    for j in range(a0.shape[1]):
        nzj = (kk[:, j] > 0) & (a0[:, j] != 0)
        if nzj.any():
            b[j] = np.median(a0[nzj, j] / (a_signed[nzj] * kk[nzj, j]))
    b0 = _np(p0.b)
    norms = np.linalg.norm(b0, axis=1)
    ok = np.isfinite(b)
    typical = np.median(np.abs(b[ok]) * norms[ok]) if ok.any() else 1.0
    b = np.where(ok, b, typical / np.maximum(norms, 1e-300))
    w0 = np.zeros((public.pixels, b0.shape[1]))
    w0[pix] = b[:, None] * b0
    weights, biases = [w0], [np.zeros(b0.shape[1])]
    x = x_img / public.levels
    z = x @ w0  # stolen pre-activation on the batch, rows as layer 0's A'
    rows = np.arange(len(a0))
    for l in layers[:-1]:
        nxt = l + 1
        rows = structure.row_maps[l][t][rows]
        col = structure.unit_cols(l, t)
        q = idx[(t, nxt)]
        h = _np(q.a)[rows][:, col]
        tau, beta, _ = _fit_units(h, z)
        act = h != 0
        s = np.ones(len(tau))
        for j in range(len(tau)):
            if act[:, j].any():
                s[j] = 1.0 if np.median(z[act[:, j], j] + beta[j]) >= 0 else -1.0
        weights[-1] = weights[-1] * s[None, :]
        biases[-1] = s * beta
        dead = tau == 0
        biases[-1][dead] = -1e30
        w_next = (tau * s)[:, None] * _np(q.b)[col]
        w_next[dead] = 0.0
        weights.append(w_next)
        biases.append(np.zeros(w_next.shape[1]))
        hid = np.maximum(z * s[None, :] + biases[-2][None, :], 0.0)
        z = hid @ w_next
    # the classifier: undo the class keys (null vector of D'ᵀ), then its biases from log Δ
    last = layers[-1]
    e = _np(idx[(t, last)].e)
    lab, w = label_columns(e)
    e_rows = e[rows]
    lab_rows = lab[rows]
    zc = z / w[None, :]
    d = e_rows * w[None, :]
    # the sign of the class keys' common factor: labels get the largest logit most often
    if (zc.argmax(1) == lab_rows).mean() < (zc.argmin(1) == lab_rows).mean():
        zc = -zc
        weights[-1] = -weights[-1]
    weights[-1] = weights[-1] / w[None, :]
    n, c = d.shape
    eqs, rhs = [], []
    for i in range(n):
        for m in range(c):
            if m == lab_rows[i] or d[i, m] == 0:
                continue
            row = np.zeros(1 + c + n)
            row[0] = zc[i, m]
            row[1 + m] = 1.0
            row[1 + c + i] = 1.0
            eqs.append(row)
            rhs.append(np.log(abs(d[i, m])))
    sol = np.linalg.lstsq(np.array(eqs), np.array(rhs), rcond=None)[0]
    inv_kappa = sol[0] if sol[0] > 0 else 1.0
    bias = sol[1:1 + c]
    weights[-1] = weights[-1] * inv_kappa
    biases[-1] = bias - bias.mean()
    classes = np.asarray(column_labels) if column_labels is not None else -np.ones(c, np.int64)
    return StolenMLP(weights, biases, classes, t)


@dataclass
class LabelRecovery:
    """Per training step, for each masked row of the last layer: its label column (the partition
    of the batch by label), the column's class frame (one labelling of the class columns over
    the run), and labels where they could be named: given known labels (``labels_known``), or
    from the recovered images (``labels_images``, MLP)."""

    columns: dict[int, np.ndarray]
    class_frames: dict[int, np.ndarray]
    frame_labels_known: np.ndarray | None = None  # frame -> label (-1 unknown)
    frame_labels_images: np.ndarray | None = None

    def labels(self, step: int, which: str = "known") -> np.ndarray | None:
        fl = self.frame_labels_known if which == "known" else self.frame_labels_images
        if fl is None or step not in self.columns:
            return None
        return fl[self.class_frames[step][self.columns[step]]]


def recover_labels(view: RunView, public: Public, known: list[tuple[int, int, int]] | None = None,
                   structure: MLPStructure | None = None, images: ImageRecovery | None = None) -> LabelRecovery:
    """Labels of every training sample from the last layer's ``D'ᵀ`` (`label_columns`), linked
    over steps by the class columns of the last layer's weights (`chain_links`; for the MLP the
    frames of `structure`). `known`: (step, masked row of the last layer, label) for a few
    samples, e.g. one per class. With the MLP's `structure` and recovered `images`, rows of the
    last layer are traced back to the recovered images, which a public classifier labels; votes
    over the run name every class frame, with no known label at all."""
    idx = _index(view)
    last = view.layers()[-1]
    steps = train_steps(view, last)
    columns = {s: label_columns(_np(idx[(s, last)].e))[0] for s in steps}
    if structure is not None:
        frames = {s: structure.out_frames[last][s] for s in steps}
    else:
        _, cf = chain_links([_np(idx[(s, last)].b) for s in steps])
        frames = dict(zip(steps, cf))
    nc = idx[(steps[0], last)].b.shape[1]
    rec = LabelRecovery(columns, frames)
    if known:
        votes = np.zeros((nc, public.classes))
        for s, row, lab in known:
            if s in columns:
                votes[frames[s][columns[s][row]], lab] += 1
        fl = -np.ones(nc, np.int64)
        r, c = lap(-votes)
        for f, lab in zip(r, c):
            if votes[f, lab] > 0:
                fl[f] = lab
        rec.frame_labels_known = fl
    if structure is not None and images is not None and public.model == "mlp":
        votes = np.zeros((nc, public.classes))
        layers = structure.layers
        for s in steps:
            if s not in images.images:
                continue
            pred = classify_images(images.images[s], public)  # per layer-0 masked row
            rows = np.arange(len(pred))
            for l in layers[:-1]:
                rows = structure.row_maps[l][s][rows]
            np.add.at(votes, (frames[s][columns[s][rows]], pred), 1.0)
        _, c = lap(-votes)
        rec.frame_labels_images = c
    return rec


# ---------------------------------------------------------------------------------------------
# 8. hidden activation maps from a later convolution's patches


@dataclass
class HiddenMaps:
    """One step's hidden activation maps rebuilt from the next convolution's masked patches:
    ``maps[b, c]`` (H × W) for the channels found (in the order of ``channel_rows``: the masked
    patch rows of each channel), up to one scale per channel; ``coord[k]`` the (row, col) of
    masked output position k (shared by all channels: the position key)."""

    step: int
    maps: np.ndarray  # (batch, channels, H, W)
    channel_rows: list[np.ndarray]
    coord: np.ndarray
    symmetry: int = 0  # the index in _D4 chosen


def _align_coords(ref: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The symmetry R and translation t with ``other @ R.T + t == ref`` on most known positions."""
    known = (ref[:, 0] > -(10**8)) & (other[:, 0] > -(10**8))
    if known.sum() < 3:
        return None
    best = None
    for rot in _D4:
        o = other[known] @ rot.T
        diff = ref[known] - o
        vals, cnt = np.unique(diff, axis=0, return_counts=True)
        k = int(np.argmax(cnt))
        if best is None or cnt[k] > best[0]:
            best = (cnt[k], rot, vals[k])
    return best[1], best[2]


def hidden_maps(patches: np.ndarray, step: int = -1, hw: tuple[int, int] = (8, 8)) -> HiddenMaps | None:
    """Rebuild the input maps of a 3×3, padding-1 convolution from its masked im2col patches
    ``(batch, channels·9, positions)`` (keys shared over the batch).

    Entries of one (channel, pixel) are proportional over the batch (`proportional_groups`);
    rows sharing groups are one channel's nine patch elements; each channel's jigsaw is solved
    (`_jigsaw_geometry`) and all are put in one frame by the shared position key; the key
    scales come from one least squares over all channels (`_key_scales`), leaving one scale per
    channel and one geometric ramp, removed by assuming the batch's mean map has no linear trend
    in log scale (digits are centred)."""
    bsz, nrow, npos = patches.shape
    vec = np.abs(patches).transpose(1, 2, 0).reshape(nrow * npos, bsz)
    groups = proportional_groups(vec, min_support=2)
    if groups.max() < 0:
        return None
    g = groups.reshape(nrow, npos)
    # rows that share a pixel group belong to one channel
    parent = np.arange(nrow)

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    first = {}
    for j in range(nrow):
        for grp in np.unique(g[j][g[j] >= 0]):
            if grp in first:
                ra, rb = find(first[grp]), find(j)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            else:
                first[grp] = j
    roots = np.array([find(j) for j in range(nrow)])
    channels = [np.nonzero(roots == r)[0] for r in np.unique(roots)]
    channels = [c for c in channels if len(c) == 9 and (g[c] >= 0).any()]
    geos = []
    for rows in channels:
        sub = g[rows]
        lab = np.unique(sub[sub >= 0], return_inverse=True)[1]
        sub2 = -np.ones_like(sub)
        sub2[sub >= 0] = lab
        geo = _jigsaw_geometry(sub2.ravel(), 9, npos)
        geos.append(geo)
    ok = [i for i, geo in enumerate(geos) if geo is not None]
    if not ok:
        return None
    ref = max(ok, key=lambda i: (geos[i][1][:, 0] > -(10**8)).sum())
    coord = geos[ref][1].copy()
    offsets = np.zeros((nrow, 2), np.int64)
    keep = []
    for i in ok:
        al = _align_coords(coord, geos[i][1])
        if al is None:
            continue
        rot, t = al
        offsets[channels[i]] = geos[i][0] @ rot.T
        c2 = geos[i][1] @ rot.T + t
        fill = (coord[:, 0] <= -(10**8)) & (geos[i][1][:, 0] > -(10**8))
        coord[fill] = c2[fill]
        keep.append(i)
    channels = [channels[i] for i in keep]
    scale = _key_scales(vec, groups, nrow, npos)
    if scale is None:
        return None
    known = coord[:, 0] > -(10**8)
    lo = coord[known].min(0)
    h, w = hw
    maps = np.zeros((bsz, len(channels), h, w))
    cnt = np.zeros((len(channels), h, w))
    val = np.abs(patches) / scale[None]
    for ci, rows in enumerate(channels):
        for j in rows:
            pix = coord[known] - lo + offsets[j]
            inside = (pix[:, 0] >= 0) & (pix[:, 0] < h) & (pix[:, 1] >= 0) & (pix[:, 1] < w)
            nz = np.abs(patches[:, j, known]).max(0) > 0
            sel = inside & nz
            kk = np.nonzero(known)[0][sel]
            np.add.at(maps, (slice(None), ci, pix[sel, 0], pix[sel, 1]), val[:, j, kk])
            np.add.at(cnt, (ci, pix[sel, 0], pix[sel, 1]), 1)
    maps = maps / np.maximum(cnt, 1)[None]
    # one scale per channel (its largest value), then remove the ramp
    mx = maps.reshape(bsz, len(channels), -1).max((0, 2))
    maps = maps / np.where(mx > 0, mx, 1)[None, :, None, None]
    mean = maps.mean((0, 1))
    rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    live = mean > 1e-6
    if live.sum() >= 3:
        a = np.stack([np.ones(live.sum()), rr[live] - (h - 1) / 2, cc[live] - (w - 1) / 2], 1)
        coef = np.linalg.lstsq(a, np.log(mean[live]), rcond=None)[0]
        maps = maps * np.exp(-(coef[1] * (rr - (h - 1) / 2) + coef[2] * (cc - (w - 1) / 2)))[None, None]
        mx = maps.reshape(bsz, len(channels), -1).max((0, 2))
        maps = maps / np.where(mx > 0, mx, 1)[None, :, None, None]
    return HiddenMaps(step, maps, channels, coord)


_OFFSETS3 = [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)]


def _shift_stack(x: np.ndarray) -> np.ndarray:
    """(B, H, W) -> (B, 9, H, W): x at q + o for the nine 3×3 offsets o (zero outside)."""
    h, w = x.shape[1:]
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    return np.stack([p[:, 1 + di:1 + di + h, 1 + dj:1 + dj + w] for di, dj in _OFFSETS3], 1)


def deconvolve_maps(maps: np.ndarray, iters: int = 10) -> np.ndarray:
    """Blind deconvolution: images ``x`` and a 3×3 filter and bias per channel with
    ``maps[b, c] ≈ w_c * x_b + β_c`` where the maps are active (alternating least squares from
    the channels' mean map). The maps of a ReLU convolution are its input convolved wherever
    they are non-zero: with a dozen channels, that pins the input down (up to an affine map and
    the frame's symmetry). Returns (B, H, W), each image scaled to max |x| = 1."""
    b, c, h, w = maps.shape
    act = maps > 0
    x = maps.mean(1)
    npx = h * w
    # operator indices: pixel q and offset e -> source pixel
    src = -np.ones((9, npx), np.int64)
    for e, (di, dj) in enumerate(_OFFSETS3):
        for r in range(h):
            for cc in range(w):
                if 0 <= r + di < h and 0 <= cc + dj < w:
                    src[e, r * w + cc] = (r + di) * w + cc + dj
    hf = maps.reshape(b, c * npx)
    af = act.reshape(b, c * npx)
    for _ in range(iters):
        sx = _shift_stack(x).transpose(0, 2, 3, 1)  # (B, H, W, 9)
        filt = np.zeros((c, 10))
        for ch in range(c):
            a = act[:, ch]
            if a.sum() < 10:
                continue
            design = np.concatenate([sx[a], np.ones((a.sum(), 1))], 1)
            filt[ch] = np.linalg.lstsq(design, maps[:, ch][a], rcond=None)[0]
        op = np.zeros((c, npx, npx))
        for e in range(9):
            q = np.nonzero(src[e] >= 0)[0]
            op[:, q, src[e, q]] += filt[:, e][:, None]
        op = op.reshape(c * npx, npx)
        bias = np.repeat(filt[:, 9], npx)
        for i in range(b):
            a = af[i]
            if a.sum() >= 3:
                x[i] = np.linalg.lstsq(op[a], hf[i, a] - bias[a], rcond=None)[0].reshape(h, w)
        x = x / (np.abs(x).max((1, 2), keepdims=True) + 1e-12)
    return x


def _d4_image(x: np.ndarray, k: int) -> np.ndarray:
    """The k-th symmetry of the square applied to (…, H, W) arrays (k in 0..7)."""
    y = np.rot90(x, k % 4, axes=(-2, -1))
    return np.flip(y, -1) if k >= 4 else y


def _corr_features(x: np.ndarray) -> np.ndarray:
    f = x.reshape(len(x), -1).astype(np.float64)
    f = f - f.mean(1, keepdims=True)
    return f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-12)


def classify_like_public(x: np.ndarray, public: Public, k: int = 5) -> tuple[np.ndarray, int, np.ndarray]:
    """Label images known up to an affine map of their values and a symmetry of the square by
    correlation with the public images (k nearest, the symmetry under which they are nearest).
    Returns (labels, symmetry index, the images in that symmetry)."""
    ref = _corr_features(public.x.reshape(len(public.x), *public.image_shape[-2:]))
    best = None
    for r in range(8):
        xr = _d4_image(x, r)
        sim = _corr_features(xr) @ ref.T
        score = np.sort(sim, 1)[:, -k:].mean()
        if best is None or score > best[0]:
            best = (score, r, sim, xr)
    _, r, sim, xr = best
    nn = np.argsort(-sim, 1)[:, :k]
    votes = np.zeros((len(x), public.classes))
    for i in range(k):
        np.add.at(votes, (np.arange(len(x)), public.y[nn[:, i]]), 1.0 / (1 + i))
    return votes.argmax(1), r, xr


@dataclass
class HiddenRecovery:
    """Per step: conv1's activation maps rebuilt from conv2's patches (`HiddenMaps`), the input
    images deconvolved from them (batch order, frame symmetry chosen by the public sample), and
    their labels by a public classifier."""

    maps: dict[int, HiddenMaps]
    images: dict[int, np.ndarray]
    labels: dict[int, np.ndarray]


def recover_hidden(view: RunView, public: Public, layer: int = 1, max_steps: int = 8) -> HiddenRecovery:
    """Attack 8 (CNN): from the second convolution's masked input alone (what a relay sees if the
    first layer stays in the enclave), rebuild the first layer's activation maps (`hidden_maps`),
    deconvolve the input images from them (`deconvolve_maps`) and classify them with the public
    sample (`classify_like_public`). `max_steps` training steps, evenly spread."""
    idx = _index(view)
    steps = train_steps(view)
    steps = spread_steps(steps, max_steps)
    out = HiddenRecovery({}, {}, {})
    for s in steps:
        p = idx.get((s, layer))
        if p is None or p.b.dim() != 3:
            continue
        hm = hidden_maps(_np(p.b), s, public.image_shape[-2:])
        if hm is None or not hm.channel_rows:
            continue
        x = deconvolve_maps(hm.maps)
        labels, sym, xr = classify_like_public(x, public)
        hm.symmetry = sym
        out.maps[s] = hm
        out.images[s] = xr
        out.labels[s] = labels
    return out


# ---------------------------------------------------------------------------------------------
# 1. zeros and signs


def operand_kind(model: str, layer: int, side: str, nlayers: int, patch_rows: bool = False) -> str:
    """What an operand holds: "input", "hidden" (activations), "weights" or "delta" (dL/dC).
    `patch_rows`: convolutions offloaded as ``patches @ Wᵀ`` (masking `mixed`)."""
    if side == "e":
        return "delta"
    if model == "cnn" and layer < nlayers - 1 and not patch_rows:  # convolutions: A = weights, B = patches
        data = "b"
    else:  # linear layers: A = x, B = Wᵀ
        data = "a"
    if side != data:
        return "weights"
    return "input" if layer == 0 else "hidden"


def _row_col_counts(m: np.ndarray, pred) -> tuple[np.ndarray, np.ndarray]:
    """Sorted per-row and per-column counts of `pred` (rows: the second-to-last axis, counted
    over every other axis; columns: the last)."""
    x = pred(m)
    rows = np.sort(np.moveaxis(x, -2, 0).reshape(x.shape[-2], -1).sum(1))
    cols = np.sort(np.moveaxis(x, -1, 0).reshape(x.shape[-1], -1).sum(1))
    return rows, cols


def _normalise_signs(m: np.ndarray) -> np.ndarray:
    """Flip rows and columns (keys' signs) to make the sign pattern as positive as it gets."""
    x = np.moveaxis(m, -2, 0).reshape(m.shape[-2], -1)
    sig, tau = _sign_factors(x)
    return np.moveaxis((x * sig[:, None] * tau[None, :]).reshape(np.moveaxis(m, -2, 0).shape), 0, -2)


@dataclass
class ZeroSignRecord:
    step: int
    layer: int
    side: str
    kind: str
    zero_fraction: float
    negative_fraction: float
    row_zeros: np.ndarray
    col_zeros: np.ndarray
    row_neg: np.ndarray
    col_neg: np.ndarray


def zeros_and_signs(view: RunView, public: Public, max_steps: int = 4) -> list[ZeroSignRecord]:
    """Attack 1: what the masked operands show of the plaintext's zeros and signs. Zeros stay
    zeros under any monomial key: per operand, the zero counts of its rows and columns (as
    multisets: the rows' order is the key's) are the plaintext's. Signs: with positive keys the
    pattern is the plaintext's; with signed keys it is flipped by a sign per row and column,
    which the attacker undoes as far as it can (`_sign_factors`: exactly, for non-negative data)."""
    from tempo.core.keys import KeySpace

    signed = KeySpace.parse(public.key_space).signed
    steps = train_steps(view)
    steps = spread_steps(steps, max_steps)
    nl = public.nlayers(view)
    out = []
    for p in view.products:
        if p.step not in steps:
            continue
        for side in ("a", "b", "e"):
            t = getattr(p, side)
            if t is None:
                continue
            m = _np(t)
            if signed:
                m = _normalise_signs(m)
            rz, cz = _row_col_counts(m, lambda x: x == 0)
            rn, cn = _row_col_counts(m, lambda x: x < 0)
            out.append(ZeroSignRecord(p.step, p.layer, side, operand_kind(public.model, p.layer, side, nl, public.patch_rows),
                                      float((m == 0).mean()), float((m < 0).mean()), rz, cz, rn, cn))
    return out


# ---------------------------------------------------------------------------------------------
# 2. scale-invariant structure


def invariant_similarity(m: np.ndarray) -> np.ndarray:
    """Similarity of the rows (samples) of a masked matrix from statistics that no row or
    column scaling or permutation changes: log magnitudes double-centred over the non-zeros
    (row and column effects removed: the keys' scales are such effects), zeros kept as zeros of
    their own (a value below every non-zero of the column), then the rows' correlation."""
    m = np.abs(np.asarray(m, dtype=np.float64))
    nz = m > 0
    lg = np.where(nz, np.log(np.where(nz, m, 1.0)), 0.0)
    r = np.zeros(m.shape[0])
    c = np.zeros(m.shape[1])
    for _ in range(10):
        c = np.where(nz.any(0), ((lg - r[:, None]) * nz).sum(0) / np.maximum(nz.sum(0), 1), 0.0)
        r = np.where(nz.any(1), ((lg - c[None, :]) * nz).sum(1) / np.maximum(nz.sum(1), 1), 0.0)
    d = np.where(nz, lg - r[:, None] - c[None, :], np.nan)
    floor = np.nanmin(d) - 1.0 if np.isfinite(np.nanmin(d)) else -1.0
    d = np.where(nz, d, floor)
    d = d - d.mean(1, keepdims=True)
    d = d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-12)
    return d @ d.T


@dataclass
class InvariantNeighbours:
    """Per step and operand: each masked row's most similar other row (`invariant_similarity`)."""

    neighbours: dict[tuple[int, int], np.ndarray]  # (step, layer) -> nearest row per row


def scale_invariant(view: RunView, public: Public, max_steps: int = 12) -> InvariantNeighbours:
    """Attack 2: which samples of a batch are alike, from scale-invariant statistics alone, on the
    operands whose rows are samples (the linear layers' ``A'``: the MLP's input and every
    classifier input)."""
    idx = _index(view)
    layers = view.layers()
    steps = train_steps(view)
    steps = spread_steps(steps, max_steps)
    out = {}
    for s in steps:
        for l in layers:
            conv_rows = public.model == "cnn" and l < public.nlayers(view) - 1  # rows: patches, not samples
            if not conv_rows and operand_kind(public.model, l, "a", public.nlayers(view)) in ("input", "hidden"):
                sim = invariant_similarity(_np(idx[(s, l)].a))
                np.fill_diagonal(sim, -np.inf)
                out[(s, l)] = sim.argmax(1)
    return InvariantNeighbours(out)


# ---------------------------------------------------------------------------------------------
# 6. the distinguishing game


def _row_signatures(k: np.ndarray) -> np.ndarray:
    """Per row, its sorted values (free of the column permutation)."""
    return np.sort(k, 1)


def distinguish(a_masked: np.ndarray, cand0: np.ndarray, cand1: np.ndarray, levels: int = 16) -> int:
    """Which candidate batch (grey levels, rows × pixels) was masked into `a_masked`: put it back
    on the grid (`factor_grid`; one row: only its zero count survives) and compare each row's
    sorted values with the candidates' (a minimum-cost matching of rows)."""
    a = np.asarray(a_masked, dtype=np.float64)
    if a.shape[0] == 1:
        z = (a == 0).sum()
        d0, d1 = abs(z - (cand0 == 0).sum()), abs(z - (cand1 == 0).sum())
        return 0 if d0 < d1 else 1 if d1 < d0 else int(np.random.default_rng().integers(2))
    k = factor_grid(a, levels).first()
    rk = _row_signatures(k)
    costs = []
    for cand in (cand0, cand1):
        rc = _row_signatures(cand)
        cost = np.abs(rk[:, None, :] - rc[None, :, :]).sum(-1)
        r, c = lap(cost)
        costs.append(cost[r, c].sum())
    return 0 if costs[0] < costs[1] else 1 if costs[1] < costs[0] else int(np.random.default_rng().integers(2))


def distinguishing_game(public: Public, variant: str = "batch", trials: int = 100, batch: int | None = None,
                        key_space: str | None = None, seed: int = 0) -> dict:
    """Attack 6: the enclave masks one of two candidate batches of public images as the first
    layer's ``A'`` (tempo's own `keygen` and `mask`, fresh keys each trial); the attacker, who
    knows both candidates, guesses which. Variants: "batch" (two random batches), "one-image"
    (the candidates differ in one image), "single" (one image each). Returns the advantage
    ``2·accuracy − 1`` (chance: 0)."""
    import torch

    from tempo.core.keys import KeySpace, keygen
    from tempo.core.obfuscation import mask

    ks = KeySpace.parse(key_space or public.key_space)
    rng = np.random.default_rng(seed)
    g = public.grid()
    n = 1 if variant == "single" else (batch or public.batch_size)
    wins = 0
    for _ in range(trials):
        i0 = rng.choice(len(g), n, replace=False)
        if variant == "batch":
            i1 = rng.choice(len(g), n, replace=False)
        else:
            i1 = i0.copy()
            i1[rng.integers(n)] = rng.choice(np.setdiff1d(np.arange(len(g)), i0))
        c0, c1 = g[i0], g[i1]
        bit = int(rng.integers(2))
        x = torch.from_numpy((c1 if bit else c0) / public.levels).float()
        key = keygen(n, x.shape[1], 8, key_space=ks)
        a = mask(x, key.m, key.n).numpy()
        wins += distinguish(a, c0, c1, public.levels) == bit
    acc = wins / trials
    return {"variant": variant, "trials": trials, "accuracy": acc, "advantage": 2 * acc - 1, "chance": 0.0}


# ---------------------------------------------------------------------------------------------
# 7. against mixing: sparse, grid-valued vectors in a span


def sparse_in_span(y: np.ndarray, levels: int = 16, nonneg: bool = True, max_lps: int | None = None,
                   tol: float = 1e-6, seed: int = 0, grid_search_max: int = 3) -> np.ndarray:
    """Vectors in the column span of `y` (N × g) that are sparse and on a grey-level grid: what a
    block-mixing hardening (``Y = X Q`` for sparse, grid-valued columns X) must hide.

    Candidates: the sparsest vector of the span with entry 1 at row r, for rows r in random
    order (ℓ1 minimisation, an LP; with `nonneg`, over the cone ``y c ≥ 0``, whose extreme rays
    are the true columns when each has a row to itself), then LPs with random positive weights
    (other vertices); for g ≤ 3 also the null vectors of every (g-1)-row subset. Each is polished
    to exact zeros (the null vector of the rows where it vanished) and kept if, scaled to the
    grid's top level, it sits on the grid. Returns the accepted vectors as columns (N × k), each
    scaled to the largest top level that puts it on the grid; at most g, sparsest first.
    """
    from itertools import combinations

    from scipy.optimize import linprog

    y = np.asarray(y, dtype=np.float64)
    n, g = y.shape
    y = y / (np.abs(y).max() or 1.0)
    rng = np.random.default_rng(seed)
    live = np.nonzero(np.abs(y).max(1) > tol)[0]
    found: dict[bytes, np.ndarray] = {}

    def accept(v):
        if not np.isfinite(v).all() or np.abs(v).max() == 0:
            return
        zero = np.abs(v) < 1e-7 * np.abs(v).max()
        if g - 1 <= zero.sum() < n:
            _, _, vt = np.linalg.svd(y[zero])
            v2 = y @ vt[-1]
            if np.abs(v2[zero]).max() < 1e-6 * np.abs(v2).max():
                v = v2
        if v.sum() < 0:
            v = -v
        if nonneg and (v < -1e-6 * np.abs(v).max()).any():
            return
        for top in range(levels, 0, -1):  # the largest top level that puts it on the grid
            q = v / np.abs(v).max() * top
            if np.abs(q - np.round(q)).max() <= 1e-3:
                q = np.round(q)
                found.setdefault(q.tobytes(), q)
                return

    if g <= 3:
        for rows in combinations(live, g - 1):
            if g == 1:
                break
            _, _, vt = np.linalg.svd(y[list(rows)], full_matrices=True)
            accept(y @ vt[-1])
    if g <= grid_search_max and len(live) >= g:
        # every grid vector of the span: its values at g independent rows are grid levels
        rows = [live[0]]
        for r in live[1:]:
            if len(rows) == g:
                break
            if np.linalg.matrix_rank(y[rows + [r]], tol=1e-9) == len(rows) + 1:
                rows.append(r)
        if len(rows) == g:
            basis = y @ np.linalg.inv(y[rows])  # v = basis @ (v at those rows)
            grid = np.stack(np.meshgrid(*[np.arange(levels + 1)] * g, indexing="ij"), -1).reshape(-1, g)[1:]
            for chunk in range(0, len(grid), 20000):
                vals = basis @ grid[chunk:chunk + 20000].T.astype(np.float64)  # (N, chunk)
                ok = (np.abs(vals - np.round(vals)) < 1e-6).all(0) & (vals > -1e-6).all(0) & (vals < levels + 1e-6).all(0)
                for v in vals[:, ok].T:
                    q = np.round(v)
                    found.setdefault(q.tobytes(), q)
    budget = max_lps if max_lps is not None else 2 * len(live) + 4 * g
    order = list(rng.permutation(live))
    covered = np.zeros(n, bool)
    for it in range(budget):
        if it < len(order) * 2 and order:
            order.sort(key=lambda r: covered[r])
            r = order.pop(0)
            a_eq, b_eq = y[r][None, :], [1.0]
            obj = y.sum(0) if nonneg else None
        else:
            w = rng.random(n)
            a_eq, b_eq = y.sum(0)[None, :], [1.0]
            obj = w @ y
            r = None
        if nonneg:
            res = linprog(obj, A_ub=-y, b_ub=np.zeros(n), A_eq=a_eq, b_eq=b_eq,
                          bounds=[(None, None)] * g, method="highs")
            if res.status == 0:
                accept(y @ res.x)
        else:
            cobj = np.concatenate([np.zeros(g), np.ones(n)])
            a_ub = np.block([[y, -np.eye(n)], [-y, -np.eye(n)]])
            res = linprog(cobj, A_ub=a_ub, b_ub=np.zeros(2 * n),
                          A_eq=np.concatenate([a_eq[0], np.zeros(n)])[None, :], b_eq=b_eq,
                          bounds=[(None, None)] * g + [(0, None)] * n, method="highs")
            if res.status == 0:
                accept(y @ res.x[:g])
        for q in found.values():
            covered |= q > 0
        if not order and r is not None:
            break
    if not found:
        return np.zeros((n, 0))
    # a basis: the sparsest vectors first, each independent of those kept (at most g)
    vs = sorted(found.values(), key=lambda q: (-(q == 0).sum(), -q.sum()))
    keep: list[np.ndarray] = []
    for q in vs:
        if len(keep) == g:
            break
        if np.linalg.matrix_rank(np.stack(keep + [q], 1), tol=1e-6) == len(keep) + 1:
            keep.append(q)
    return np.stack(keep, 1)


def mixing_experiment(public: Public, g: int, n_images: int = 64, seed: int = 0, max_lps: int | None = None) -> dict:
    """Attack 7 on synthetic mixing: a batch of public images (rows) has its pixel columns mixed
    in blocks of `g` by random orthogonal g×g matrices (what a block-mixing key would do to one
    side); `sparse_in_span` searches every block. Returns the fraction of non-zero pixel columns
    recovered exactly (and of all columns, zero columns counting as found)."""
    rng = np.random.default_rng(seed)
    x = public.grid()[rng.choice(len(public.x), n_images, replace=False)].astype(np.float64)
    perm = rng.permutation(x.shape[1])
    hits = nonzero = 0
    t0 = time.perf_counter()
    for b0 in range(0, x.shape[1], g):
        cols = perm[b0:b0 + g]
        xb = x[:, cols]
        q, _ = np.linalg.qr(rng.normal(size=(len(cols), len(cols))))
        found = sparse_in_span(xb @ q, public.levels, max_lps=max_lps, seed=seed)
        for j in range(len(cols)):
            col = xb[:, j]
            if col.max() == 0:
                continue
            nonzero += 1
            if found.shape[1] and (np.abs(found / found.max(0) - (col / col.max())[:, None]).max(0) < 1e-6).any():
                hits += 1  # the column up to its scale (which the grid and the prior settle as without mixing)
    zero_cols = int((x.max(0) == 0).sum())
    return {"g": g, "recovered": hits / max(nonzero, 1), "recovered_all": (hits + zero_cols) / x.shape[1],
            "nonzero_columns": nonzero, "seconds": time.perf_counter() - t0, "chance": 0.0}


# ---------------------------------------------------------------------------------------------
# 5c. CNN structure: channels across layers, samples to the classifier


@dataclass
class CNNLinks:
    """One CNN training step's links: conv1 output channel (masked row of its ``A'``) -> the
    masked patch rows of that channel in conv2's ``B'`` (`channel_rows`); and the classifier's
    masked rows (samples) <- batch index (``sample_rows[b]``), its masked input columns <-
    (conv2 output channel, pooling window)."""

    step: int
    channel_match: tuple[np.ndarray, list]  # (conv1 masked channel per recovered channel, rows of that channel)
    sample_rows: np.ndarray | None
    feature_cols: np.ndarray | None


def cnn_links(view: RunView, public: Public, step: int, maps: HiddenMaps | None = None) -> CNNLinks | None:
    """Link a small CNN's products at one training step (conv, ReLU, conv, ReLU, 2×2 average
    pool, linear), by zero patterns only:

    - conv1 channels to conv2's input channels: per image, the number of inactive positions of a
      channel, counted in conv1's ``D'ᵀ`` (zero where the ReLU was off) and in conv2's rebuilt
      input maps (`hidden_maps`), is the same vector over the batch for the same channel;
    - the classifier's samples and inputs: conv2's ``D'ᵀ`` is zero where its ReLU was off, a
      pooled feature is zero when its four positions are (their coordinates come from the
      jigsaw of conv2's patches, whose position key ``D'ᵀ`` shares), and the classifier's ``A'``
      shows those zeros under its own permutations (`match_zero_patterns`)."""
    idx = _index(view)
    p0, p1, p2 = idx.get((step, 0)), idx.get((step, 1)), idx.get((step, 2))
    if p0 is None or p1 is None or p2 is None or p0.e is None or p1.e is None:
        return None
    if maps is None:
        maps = hidden_maps(_np(p1.b), step, public.image_shape[-2:])
    if maps is None:
        return None
    e0 = _np(p0.e)  # (batch, ch, pos)
    z0 = (e0 == 0).sum(2).T  # (ch, batch)
    zm = (maps.maps == 0).reshape(maps.maps.shape[0], maps.maps.shape[1], -1).sum(2).T  # (recovered ch, batch)
    cost = np.abs(zm[:, None, :] - z0[None, :, :]).sum(-1)
    r, c = lap(cost)
    channel_match = (c, [maps.channel_rows[i] for i in r])
    # the classifier: pooled zero pattern from conv2's D'ᵀ and the positions' coordinates
    e1 = _np(p1.e)  # (batch, ch2, pos)
    coord = maps.coord
    known = coord[:, 0] > -(10**8)
    if not known.all():
        return CNNLinks(step, channel_match, None, None)
    lo = coord.min(0)
    win = ((coord[:, 0] - lo[0]) // 2) * ((coord[:, 1].max() - lo[1]) // 2 + 1) + (coord[:, 1] - lo[1]) // 2
    nwin = int(win.max()) + 1
    inactive = e1 == 0
    pooled = np.ones((e1.shape[0], e1.shape[1], nwin), bool)
    for wdx in range(nwin):
        pooled[:, :, wdx] = inactive[:, :, win == wdx].all(2)
    zp = pooled.reshape(e1.shape[0], -1)
    za = _np(p2.a) == 0
    if za.shape != zp.shape:
        return CNNLinks(step, channel_match, None, None)
    rows, cols = match_zero_patterns(zp, za)
    return CNNLinks(step, channel_match, rows, cols)


def cnn_image_labels(view: RunView, public: Public, images: ImageRecovery, labels: LabelRecovery,
                     max_steps: int = 12) -> np.ndarray:
    """Name the class frames of a CNN run with no known label: each step's recovered images
    (batch order) are labelled by a public classifier and carried to the classifier's rows by
    `cnn_links`; votes over the steps, then one label per frame."""
    steps = [s for s in labels.columns if s in images.images]
    steps = spread_steps(steps, max_steps)
    nc = len(next(iter(labels.class_frames.values())))
    votes = np.zeros((nc, public.classes))
    for s in steps:
        links = cnn_links(view, public, s)
        if links is None or links.sample_rows is None:
            continue
        pred = classify_images(images.images[s], public)
        rows = links.sample_rows
        np.add.at(votes, (labels.class_frames[s][labels.columns[s][rows]], pred), 1.0)
    _, c = lap(-votes)
    labels.frame_labels_images = c
    return c


# ---------------------------------------------------------------------------------------------
# the battery


ATTACKS = ("zeros_signs", "scale_invariant", "labels", "images", "structure", "steal", "distinguishing",
           "mixing", "batch_mixing", "hidden", "hidden_distinguishing", "steal_offloaded", "unmix")


def run_all(view: RunView, public: Public, truth=None, attacks: tuple[str, ...] | None = None,
            known: list[tuple[int, int, int]] | None = None, trials: int = 60, mixing: tuple[int, ...] = (2, 4, 8, 16),
            hidden_steps: int = 6, game_rounds: int = 40) -> dict:
    """Run the battery on one run's relay view: ``{attack: {numbers..., "seconds": ..., "chance": ...}}``.

    Without `truth` the numbers are what the attacker can report about itself (how much it
    recovered); with it (`RunTruth`), every attack is scored (`tempo.audit.score`). `known`:
    the (step, masked row, label) triples the label attack is given; with `truth` and no
    `known`, one sample per class is drawn (`score.known_labels`). The distinguishing game and
    the mixing search run on the public sample with tempo's own keys (they need no run)."""
    from tempo.audit import score as sc

    todo = attacks or ATTACKS
    out: dict[str, dict] = {}
    cache: dict[str, object] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        res = fn()
        res["seconds"] = round(time.perf_counter() - t0, 3)
        out[name] = res

    if "zeros_signs" in todo:
        def zs():
            recs = zeros_and_signs(view, public)
            if truth is not None:
                return sc.score_zeros_signs(recs, truth, public)
            kinds: dict[str, list] = {}
            for r in recs:
                kinds.setdefault(r.kind, []).append((r.zero_fraction, r.negative_fraction))
            return {k: {"zero_fraction": float(np.mean([a for a, _ in v])),
                        "negative_fraction": float(np.mean([b for _, b in v]))} for k, v in kinds.items()}
        timed("zeros_signs", zs)
    if "scale_invariant" in todo:
        def si():
            nb = scale_invariant(view, public)
            return sc.score_invariant(nb, view, truth) if truth is not None else {"operands": len(nb.neighbours)}
        timed("scale_invariant", si)
    need_images = {"images", "labels", "steal", "structure"} & set(todo)
    if need_images:
        t0 = time.perf_counter()
        cache["images"] = recover_images(view, public)
        img_s = time.perf_counter() - t0
        if "images" in todo:
            res = sc.score_images(cache["images"], truth, public) if truth is not None else \
                {"steps": len(cache["images"].images)}
            res["seconds"] = round(img_s, 3)
            out["images"] = res
    if public.model == "mlp" and {"structure", "labels", "steal"} & set(todo):
        t0 = time.perf_counter()
        cache["structure"] = mlp_structure(view)
        st_s = time.perf_counter() - t0
        if "structure" in todo:
            res = sc.score_structure(cache["structure"], view, truth) if truth is not None else \
                {"steps": len(cache["structure"].steps)}
            res["seconds"] = round(st_s, 3)
            out["structure"] = res
    if "labels" in todo or "steal" in todo:
        def lab():
            kn = known if known is not None else (sc.known_labels(view, truth, public) if truth is not None else None)
            if public.model == "mlp":
                lr = recover_labels(view, public, known=kn, structure=cache["structure"], images=cache["images"])
            else:
                lr = recover_labels(view, public, known=kn)
                cnn_image_labels(view, public, cache["images"], lr)
            cache["labels"] = lr
            if truth is not None:
                return sc.score_labels(lr, view, truth, public)
            return {"steps": len(lr.columns), "groups_per_step": float(np.mean([len(set(c)) for c in lr.columns.values()]))}
        timed("labels", lab)
    if "structure" in todo and public.model == "cnn":
        def cst():
            steps = train_steps(view)
            steps = spread_steps(steps, 4)
            links = {s: cnn_links(view, public, s) for s in steps}
            links = {s: l for s, l in links.items() if l is not None}
            if truth is None:
                return {"steps": len(links)}
            res = sc.score_cnn_channels({s: l.channel_match for s, l in links.items()}, view, truth)
            ok = [(sc.truth_rows(view, truth, s, view.layers()[-1])[l.sample_rows] == np.arange(len(l.sample_rows))).mean()
                  for s, l in links.items() if l.sample_rows is not None]
            res["classifier_samples"] = float(np.mean(ok)) if ok else None
            return res
        timed("structure", cst)
    if "steal" in todo and public.model == "mlp":
        def stl():
            st, lr = cache["structure"], cache["labels"]
            t = st.steps[-1]
            fl = lr.frame_labels_images if lr.frame_labels_images is not None else lr.frame_labels_known
            cols = fl[lr.class_frames[t]] if fl is not None else None
            stolen = steal_mlp(view, public, cache["images"], st, column_labels=cols)
            cache["stolen"] = stolen
            if truth is not None:
                return sc.score_steal(stolen, truth, public)
            return {"public_accuracy": float((stolen.predict(public.x) == public.y).mean()), "step": stolen.step}
        timed("steal", stl)
    if "distinguishing" in todo:
        def dg():
            res = {v: distinguishing_game(public, v, trials=trials) for v in ("batch", "one-image", "single")}
            return {v: {"advantage": r["advantage"], "trials": r["trials"]} for v, r in res.items()} | {"chance": 0.0}
        timed("distinguishing", dg)
    if "mixing" in todo:
        def mx():
            res = {f"g{g}": mixing_experiment(public, g) for g in mixing}
            return {k: {"recovered": r["recovered"], "recovered_all": r["recovered_all"]} for k, r in res.items()} | {"chance": 0.0}
        timed("mixing", mx)
    if "batch_mixing" in todo:
        def bm():
            res = {f"k{k}": batch_mixing_experiment(public, k, batches=6) for k in (2, 4, 8)}
            return {k: {"recovered": r["recovered"]} for k, r in res.items()} | {"chance": 0.0}
        timed("batch_mixing", bm)
    if "hidden" in todo and public.model == "cnn":
        def hd():
            hr = recover_hidden(view, public, max_steps=hidden_steps)
            cache["hidden"] = hr
            return sc.score_hidden(hr, truth) if truth is not None else {"steps": len(hr.maps)}
        timed("hidden", hd)
    if "hidden_distinguishing" in todo and truth is not None:  # the challenger needs the truth
        def hg():
            from tempo.audit import game

            res = game.play(view, public, truth, rounds=game_rounds, hidden=cache.get("hidden"))
            return res | {"chance": 0.0}
        timed("hidden_distinguishing", hg)
    if "steal_offloaded" in todo:
        def so():
            from tempo.audit import theft

            res = {}
            for name, per_class in (("all", None), ("few", 5)):  # the whole public sample; 5 images per class
                th = theft.steal_offloaded(view, public, per_class=per_class)
                cache[f"steal_offloaded_{name}"] = th
                res[name] = sc.score_theft(th, truth, public) if truth is not None else \
                    {"own_held_out": th.own, "frozen_layers": th.frozen, "public_images": len(th.train)}
            return res
        timed("steal_offloaded", so)
    if "unmix" in todo:
        def um():
            from tempo.audit import unmix as um_

            prof = um_.rank_profiles(view, public)
            dead = um_.dead_units(view, public)
            cache["unmix"] = (prof, dead)
            if truth is not None:
                return sc.score_unmix(prof, dead, view, truth)
            return {"profiled_operands": len(prof.profiles), "dead_unit_operands": len(dead.per_block)}
        timed("unmix", um)
    out["_cache"] = cache  # the attacks' outputs (for pictures), not numbers
    return out


def batch_mixing_experiment(public: Public, k: int, batches: int = 16, noise_rows: int = 1, seed: int = 0) -> dict:
    """Attack 7 against DarKnight-style batch mixing: `k` images and `noise_rows` dense Gaussian
    rows are mixed by a random invertible matrix over the batch (what a relay would receive
    as the first layer's input rows, here without any further masking); `sparse_in_span`
    searches the mixed rows' span for grid-valued images. Returns the fraction of images
    recovered exactly (up to scale), over `batches` mixed batches."""
    rng = np.random.default_rng(seed)
    g = public.grid().astype(np.float64)
    hits = total = 0
    for _ in range(batches):
        x = g[rng.choice(len(g), k, replace=False)]
        noise = rng.normal(size=(noise_rows, x.shape[1])) * x.std()
        rows = np.concatenate([x, noise])
        mix = rng.normal(size=(len(rows), len(rows)))
        found = sparse_in_span((mix @ rows).T, public.levels, seed=seed)
        for img in x:
            total += 1
            if found.shape[1] and (np.abs(found / found.max(0) - (img / img.max())[:, None]).max(0) < 1e-6).any():
                hits += 1
    return {"k": k, "noise_rows": noise_rows, "recovered": hits / max(total, 1), "chance": 0.0}
