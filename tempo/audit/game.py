"""The distinguishing game on a real run's relay view, on whatever layers are offloaded.

The challenger (`challenges`, which reads the enclave's truth) picks training steps of the run;
for each, it hands the attacker two candidate batches of labelled training images in random
order: the batch that step really processed and a decoy drawn from the same training data.
The attacker (`guess`, which reads only the relays' products of that step and `Public`: the
architecture, the scheme, the public sample; never a key, a weight or the truth) says which
candidate was processed. Advantage ``2·accuracy − 1``; `tempo.audit.score.score_game` adds a
binomial confidence interval.

Decoys (``VARIANTS``):

- ``batch``: the batch of another training step of the same run (same size, same data);
- ``swap-labels``: the true batch with `k` images replaced by training images of other labels
  (the label histogram differs in ``2k`` counts at most);
- ``swap-same-label``: the true batch with `k` images replaced by other training images of the
  same labels (same label histogram: only the images tell).

The attacker's evidence, per offloaded product of the step whose operands carry samples:

- a sample-similarity matrix that no key changes: for an operand whose rows are samples (a
  linear layer's ``A'`` and ``D'ᵀ``), `attacks.invariant_similarity` (rows in the key's order:
  matched to each candidate's own similarity by a quadratic assignment); for a convolution's
  operands, whose batch axis is never masked (keys are shared over it), the cosine of the
  samples after each masked entry is divided by its root mean square over the batch (which
  cancels monomial keys exactly: rows in batch order, compared as they are);
- each is compared with two public similarities of the candidates: of their pixels and of their
  labels (same label or not);
- for the CNN, the first layer's maps rebuilt from the second's input (`attacks.recover_hidden`):
  images deconvolved from them correlated with each candidate's images, in batch order, and
  digits read from them compared with each candidate's labels.

Each score is put on one scale by scoring random batches of the public sample the same way (a
null the attacker computes itself): the candidate with the larger sum of standardised scores wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tempo.audit import attacks as at
from tempo.audit.public import Public
from tempo.audit.view import RunTruth, RunView

VARIANTS = ("batch", "swap-labels", "swap-same-label")


@dataclass
class Challenge:
    """One round: the step and two candidate batches, (images (n, C, H, W), labels (n,)) each."""

    step: int
    variant: str
    candidates: list[tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------------------------------
# the challenger (reads the truth)


def challenges(view: RunView, truth: RunTruth, variant: str = "batch", rounds: int = 20, swap: int = 4,
               seed: int = 0) -> tuple[list[Challenge], list[int]]:
    """`rounds` challenges on training steps of the run (evenly spread, or each step again with
    another decoy when there are fewer; full batches only) and the
    secret answers (which candidate is real). Decoys are drawn from the run's own training data."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    rng = np.random.default_rng(seed)
    seen = set(view.steps())
    steps = [s for s, t in sorted(truth.steps.items()) if t.train and s in seen]
    if not steps:
        return [], []
    n = max(len(truth.steps[s].y) for s in steps)
    steps = [s for s in steps if len(truth.steps[s].y) == n]
    pool_x = np.concatenate([truth.steps[s].x.numpy() for s in steps]).astype(np.float64)
    pool_y = np.concatenate([truth.steps[s].y.numpy() for s in steps]).astype(np.int64)
    pool_step = np.repeat(np.arange(len(steps)), n)
    if rounds <= len(steps):
        chosen = [steps[int(i)] for i in np.linspace(0, len(steps) - 1, rounds)]
    else:  # more rounds than steps: every step again, with other decoys
        chosen = [steps[i % len(steps)] for i in range(rounds)]
    out, secrets = [], []
    for s in chosen:
        x, y = truth.steps[s].x.numpy().astype(np.float64), truth.steps[s].y.numpy().astype(np.int64)
        own = steps.index(s)
        if variant == "batch":
            other = steps[(own + 1 + rng.integers(len(steps) - 1)) % len(steps)] if len(steps) > 1 else s
            dx, dy = truth.steps[other].x.numpy().astype(np.float64), truth.steps[other].y.numpy().astype(np.int64)
        else:
            dx, dy = x.copy(), y.copy()
            for i in rng.choice(n, min(swap, n), replace=False):
                ok = pool_step != own
                ok &= (pool_y == y[i]) if variant == "swap-same-label" else (pool_y != y[i])
                if not ok.any():  # no such image elsewhere in the run: this position stays
                    continue
                j = rng.choice(np.nonzero(ok)[0])
                dx[i], dy[i] = pool_x[j], pool_y[j]
        bit = int(rng.integers(2))
        cands = [(x, y), (dx, dy)] if bit == 0 else [(dx, dy), (x, y)]
        out.append(Challenge(s, variant, cands))
        secrets.append(bit)
    return out, secrets


# ---------------------------------------------------------------------------------------------
# the attacker (reads the view of the step and public knowledge only)


def _offdiag(m: np.ndarray) -> np.ndarray:
    return m[~np.eye(len(m), dtype=bool)]


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    d = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / d) if d > 0 else 0.0


def _cosine(f: np.ndarray) -> np.ndarray:
    f = f.reshape(len(f), -1).astype(np.float64)
    f = f - f.mean(0, keepdims=True)
    f = f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-12)
    return f @ f.T


def conv_similarity(t: np.ndarray) -> np.ndarray:
    """Key-free similarity of the samples of a convolution operand (batch, rows, cols), whose
    keys are shared over the batch: each entry over its root mean square across the batch
    (monomial keys cancel), then the samples' cosine."""
    t = np.abs(np.asarray(t, dtype=np.float64))
    rms = np.sqrt((t**2).mean(0))
    f = np.where(rms > 0, t / np.where(rms > 0, rms, 1.0), 0.0)
    return _cosine(f)


def _candidate_similarities(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    return {"pixels": _cosine(x), "labels": (y[:, None] == y[None, :]).astype(np.float64)}


def _matched_score(sv: np.ndarray, sc: np.ndarray, ordered: bool) -> float:
    """How well the candidate's similarity `sc` explains the view's `sv`: in order, or under the
    best row matching (a quadratic assignment from two starts)."""
    if ordered:
        return _corr(_offdiag(sv), _offdiag(sc))
    perm = _qap(sv, sc)
    return _corr(_offdiag(sv), _offdiag(sc[np.ix_(perm, perm)]))


@dataclass
class StepEvidence:
    """What the view of one step gives the attacker: sample similarities (name -> (matrix, in
    batch order?)) and, for the CNN, images and digits rebuilt from hidden maps (batch order)."""

    similarities: dict[str, tuple[np.ndarray, bool]]
    images: np.ndarray | None = None
    digits: np.ndarray | None = None


def step_evidence(view: RunView, public: Public, step: int, hidden=None) -> StepEvidence:
    """Everything the attacker reads off the relays' products of `step` (any offloaded layer).
    `hidden`: an `attacks.HiddenRecovery` already computed for this run (CNN)."""
    sims = {}
    for layer in view.layers():
        parts = view.at(step, layer)
        if len(parts) != 1:
            continue
        p = parts[0]
        for side in ("a", "b", "e"):
            t = getattr(p, side)
            if t is None:
                continue
            kind = at.operand_kind(public.model, layer, side, public.nlayers(view), public.patch_rows)
            if kind not in ("input", "hidden", "delta"):
                continue
            m = at._np(t)
            if public.model == "cnn" and layer < public.nlayers(view) - 1 and m.ndim == 2:
                continue  # a convolution as one matrix of the whole batch's patches: rows are not samples
            if m.ndim == 3:  # convolution: (batch, rows, cols), keys shared over the batch
                sims[f"{kind}{layer}"] = (conv_similarity(m), True)
            elif m.ndim == 2 and len(m) > 2:  # linear: rows are samples, in the key's order
                sims[f"{kind}{layer}"] = (at.invariant_similarity(m), False)
                nz = (m != 0).astype(np.float64)
                if 0 < nz.mean() < 1:  # which units are active: zeros survive monomial keys
                    sims[f"{kind}{layer}-zeros"] = (_cosine(nz), False)
    images = digits = None
    if public.model == "cnn" and 1 in view.layers():
        if hidden is not None and step in hidden.images:
            images, digits = hidden.images[step], hidden.labels[step]
        elif hidden is None:  # no run-level recovery given: this step's own (about 1.5 s)
            one = at.recover_hidden(RunView([p for p in view.products if p.step == step]), public, max_steps=1)
            if step in one.images:
                images, digits = one.images[step], one.labels[step]
    return StepEvidence(sims, images, digits)


def candidate_scores(ev: StepEvidence, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Each piece of evidence's score for one candidate batch (higher: more like it)."""
    out = {}
    cs = _candidate_similarities(x, y)
    for name, (sv, ordered) in ev.similarities.items():
        if len(sv) != len(x):
            continue
        for what, sc in cs.items():
            out[f"{name}~{what}"] = _matched_score(sv, sc, ordered)
    if ev.images is not None and len(ev.images) == len(x):
        xi = x.reshape(len(x), *x.shape[-2:])
        out["hidden-images"] = float((at._corr_features(ev.images) * at._corr_features(xi)).sum(1).mean())
        out["hidden-digits"] = float((ev.digits == y).mean())
    return out


def _differing(c0, c1) -> np.ndarray:
    """Positions where the two candidate batches (in batch order) differ."""
    (x0, y0), (x1, y1) = c0, c1
    return np.nonzero((x0.reshape(len(x0), -1) != x1.reshape(len(x1), -1)).any(1) | (y0 != y1))[0]


class _LocalScorer:
    """Scores for candidates that differ from each other in a few positions `d` only: how well the
    images put at `d` explain the view's rows for them, against the shared images (the rest).
    Rows of an unordered operand are matched to each candidate by a quadratic assignment once;
    the rows left for `d` are then matched to the images at `d` (an assignment per score)."""

    def __init__(self, ev: StepEvidence, cands, d: np.ndarray):
        self.ev, self.d = ev, d
        x0, y0 = cands[0]
        n = len(y0)
        self.common = np.setdiff1d(np.arange(n), d)
        self.xc, self.yc = x0[self.common], y0[self.common]
        self.rows = {}  # evidence -> list of (rows for the common positions, rows for d)
        for name, (sv, ordered) in ev.similarities.items():
            if len(sv) != n:
                continue
            if ordered:
                self.rows[name] = [(self.common, d)]
                continue
            pairs = []
            for x, y in cands:
                for what, sc in _candidate_similarities(x, y).items():
                    perm = _qap(sv, sc)  # view row r <-> candidate position perm[r]
                    inv = np.argsort(perm)
                    pairs.append((inv[self.common], inv[d]))
                    break  # the pixels' similarity places the rows
            self.rows[name] = pairs

    def score(self, xd: np.ndarray, yd: np.ndarray) -> dict[str, float]:
        out = {}
        xc = self.xc.reshape(len(self.xc), -1)
        xdf = xd.reshape(len(xd), -1)
        mu = np.concatenate([xc, xdf]).mean(0)
        fc = xc - mu
        fc = fc / (np.linalg.norm(fc, axis=1, keepdims=True) + 1e-12)
        fd = xdf - mu
        fd = fd / (np.linalg.norm(fd, axis=1, keepdims=True) + 1e-12)
        cand = {"pixels": fd @ fc.T, "labels": (yd[:, None] == self.yc[None, :]).astype(np.float64)}
        for name, pairs in self.rows.items():
            sv = self.ev.similarities[name][0]
            ordered = self.ev.similarities[name][1]
            for what, sc in cand.items():
                vals = []
                for rc, rd in pairs:
                    prof = sv[np.ix_(rd, rc)]  # the rows left for d, against the shared rows
                    c = np.array([[_corr(prof[r], sc[i]) for i in range(len(sc))] for r in range(len(rd))])
                    if ordered:
                        vals.append(float(np.mean(np.diag(c))))
                    else:
                        r, i = at.lap(-c)
                        vals.append(float(c[r, i].mean()))
                out[f"{name}~{what}"] = float(np.mean(vals))
        if self.ev.images is not None and len(self.ev.images) == len(self.common) + len(self.d):
            img = self.ev.images[self.d]
            xi = xd.reshape(len(xd), *xd.shape[-2:])
            out["hidden-images"] = float((at._corr_features(img) * at._corr_features(xi)).sum(1).mean())
            out["hidden-digits"] = float((self.ev.digits[self.d] == yd).mean())
        return out


def _qap(sv: np.ndarray, sc: np.ndarray) -> np.ndarray:
    """The row matching of `_matched_score` (view row r <-> candidate position perm[r])."""
    from scipy.optimize import quadratic_assignment

    a = sv - _offdiag(sv).mean()
    b = sc - _offdiag(sc).mean()
    np.fill_diagonal(a, 0.0)
    np.fill_diagonal(b, 0.0)
    ra, rb = np.sort(a, 1), np.sort(b, 1)
    za = (ra - ra.mean(1, keepdims=True)) / (ra.std(1, keepdims=True) + 1e-12)
    zb = (rb - rb.mean(1, keepdims=True)) / (rb.std(1, keepdims=True) + 1e-12)
    _, col = at.lap(((za[:, None, :] - zb[None, :, :]) ** 2).sum(-1))
    best, out = -np.inf, col
    for p0 in (np.eye(len(a))[col], "barycenter"):
        res = quadratic_assignment(a, b, method="faq", options={"maximize": True, "P0": p0, "maxiter": 40,
                                                                "rng": np.random.default_rng(0)})
        perm = res.col_ind
        val = _corr(_offdiag(sv), _offdiag(sc[np.ix_(perm, perm)]))
        if val > best:
            best, out = val, perm
    return out


def _standardised(scores: list[dict], null: list[dict]) -> tuple[list[float], list[dict]]:
    total = [0.0] * len(scores)
    z = [{} for _ in scores]
    for k in scores[0]:
        ref = np.array([s[k] for s in null] + [s[k] for s in scores])
        sd = ref.std() if ref.std() > 0 else 1.0
        mu = np.mean([s[k] for s in null]) if null else ref.mean()
        for c, s in enumerate(scores):
            z[c][k] = (s[k] - mu) / sd
            total[c] += z[c][k]
    return total, z


def guess(view: RunView, public: Public, ch: Challenge, nulls: int = 8, seed: int = 0, hidden=None,
          evidence: StepEvidence | None = None) -> tuple[int, dict]:
    """Which of `ch.candidates` the step processed (0 or 1), and the standardised scores.

    Candidates that differ in most positions are scored whole, standardised by the scores of
    `nulls` random public batches; candidates that differ in a few positions are scored on those
    positions (`_LocalScorer`), standardised by the scores of random public images put there
    (of the same label where both candidates agree on it)."""
    ev = evidence if evidence is not None else step_evidence(view, public, ch.step, hidden)
    rng = np.random.default_rng(seed + ch.step)
    n = len(ch.candidates[0][1])
    d = _differing(*ch.candidates)
    null = []
    if len(d) > n // 2:
        scores = [candidate_scores(ev, x, y) for x, y in ch.candidates]
        for _ in range(nulls if n <= len(public.y) else 0):
            i = rng.choice(len(public.y), n, replace=False)
            null.append(candidate_scores(ev, public.x[i], public.y[i]))
    else:
        local = _LocalScorer(ev, ch.candidates, d)
        scores = [local.score(x[d], y[d]) for x, y in ch.candidates]
        same = ch.candidates[0][1][d] == ch.candidates[1][1][d]
        for _ in range(nulls):
            pick = np.array([rng.choice(np.nonzero(public.y == ch.candidates[0][1][j])[0]) if s
                             else rng.integers(len(public.y)) for j, s in zip(d, same)])
            null.append(local.score(public.x[pick], public.y[pick]))
    total, z = _standardised(scores, null)
    pick = 0 if total[0] > total[1] else 1 if total[1] > total[0] else int(rng.integers(2))
    return pick, {"scores": scores, "z": z, "local": len(d) <= n // 2}


def hidden_distinguishing(view: RunView, public: Public, rounds: list[Challenge], nulls: int = 8,
                          hidden=None, cache: dict | None = None) -> list[int]:
    """The attacker's answers to `rounds` (one `guess` each; the evidence of a step computed once,
    kept in `cache`)."""
    cache = {} if cache is None else cache
    out = []
    for ch in rounds:
        if ch.step not in cache:
            cache[ch.step] = step_evidence(view, public, ch.step, hidden)
        out.append(guess(view, public, ch, nulls=nulls, evidence=cache[ch.step])[0])
    return out


def play(view: RunView, public: Public, truth: RunTruth, variants: tuple[str, ...] = VARIANTS, rounds: int = 40,
         swap: int = 4, nulls: int = 8, hidden=None, seed: int = 0) -> dict:
    """The game, every variant: the challenger's rounds (from the truth), the attacker's answers
    (from the view and public knowledge), scored (`score.score_game`)."""
    from tempo.audit import score as sc

    out, cache = {}, {}
    for v in variants:
        rounds_v, secrets = challenges(view, truth, v, rounds=rounds, swap=swap, seed=seed)
        answers = hidden_distinguishing(view, public, rounds_v, nulls=nulls, hidden=hidden, cache=cache)
        out[v] = sc.score_game(answers, secrets)
    return out
