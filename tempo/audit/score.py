"""Scoring the attacks of `tempo.audit.attacks` against the enclave's truth (`RunTruth`).

Nothing here is available to an attacker: it reads the plaintext. Where a score needs to know
which masked row or column is which plaintext one, it finds out without keys either, from the
truth: ``C' ⊙ D'ᵀ = C ⊙ Δ`` up to the permutations (the keys cancel entrywise), so sorting the
rows (or columns) of both sides matches them; likewise ``B' ⊙ (A'ᵀ D'ᵀ) = B ⊙ dL/dB``.
"""

from __future__ import annotations

import numpy as np

from tempo.audit import attacks as at
from tempo.audit.public import Public
from tempo.audit.view import RunTruth, RunView

# ---------------------------------------------------------------------------------------------
# truth correspondences


def _match_sorted(masked: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """``out[i]``: the row of `plain` whose sorted values match row i of `masked` best."""
    f1 = np.sort(masked, 1)
    f2 = np.sort(plain, 1)
    cost = np.abs(f1[:, None, :] - f2[None, :, :]).sum(-1)
    _, col = at.lap(cost)
    return col


def _ce(view_p, truth_p) -> tuple[np.ndarray, np.ndarray]:
    """Masked and plaintext ``C ⊙ Δ`` (2-D products with a backward)."""
    a, b, e = at._np(view_p.a), at._np(view_p.b), at._np(view_p.e)
    ta, tb, tg = at._np(truth_p.a), at._np(truth_p.b), at._np(truth_p.grad_c)
    return (a @ b) * e, (ta @ tb) * tg


def truth_rows(view: RunView, truth: RunTruth, step: int, layer: int) -> np.ndarray:
    """For a linear layer's product with a backward: the enclave's row (sample) of each masked row."""
    p = at._index(view)[(step, layer)]
    masked, plain = _ce(p, truth.products[(step, layer, p.part)])
    return _match_sorted(masked, plain)


def truth_out_units(view: RunView, truth: RunTruth, step: int, layer: int) -> np.ndarray:
    """The plaintext output unit of each masked output column of a linear layer (with a backward)."""
    p = at._index(view)[(step, layer)]
    masked, plain = _ce(p, truth.products[(step, layer, p.part)])
    return _match_sorted(masked.T, plain.T)


def truth_in_units(view: RunView, truth: RunTruth, step: int, layer: int) -> np.ndarray:
    """The plaintext input unit of each masked row of a linear layer's ``B'`` (with a backward)."""
    p = at._index(view)[(step, layer)]
    t = truth.products[(step, layer, p.part)]
    a, b, e = at._np(p.a), at._np(p.b), at._np(p.e)
    ta, tb, tg = at._np(t.a), at._np(t.b), at._np(t.grad_c)
    return _match_sorted(b * (a.T @ e), tb * (ta.T @ tg))


def train_labels(view: RunView, truth: RunTruth, step: int) -> np.ndarray:
    """True label of each masked row of the last layer at a training step."""
    last = view.layers()[-1]
    return truth.steps[step].y.numpy()[truth_rows(view, truth, step, last)]


def known_labels(view: RunView, truth: RunTruth, public: Public, per_class: int = 1, seed: int = 0) -> list[tuple[int, int, int]]:
    """What "the attacker knows the labels of a few samples" means here: for `per_class` samples
    of each class, picked at random over the run's training steps, (step, masked row of the last
    layer, label), as the relay's view would locate them."""
    rng = np.random.default_rng(seed)
    steps = at.train_steps(view)
    out = []
    for c in range(public.classes):
        got = 0
        for s in rng.permutation(steps):
            labs = train_labels(view, truth, int(s))
            rows = np.nonzero(labs == c)[0]
            if len(rows):
                out.append((int(s), int(rng.choice(rows)), c))
                got += 1
            if got == per_class:
                break
    return out


# ---------------------------------------------------------------------------------------------
# per attack


def score_zeros_signs(records: list, truth: RunTruth, public: Public) -> dict:
    """Per operand kind: the fraction of plaintext zeros that are zeros on the wire; the
    fraction of operands whose rows' and columns' zero counts match the plaintext's as multisets;
    the same for negative counts after the attacker's sign normalisation (`signs_match`)."""
    from tempo.core.keys import KeySpace

    signed = KeySpace.parse(public.key_space).signed
    out: dict[str, dict] = {}
    for r in records:
        t = truth.products.get((r.step, r.layer, 0))
        if t is None:
            continue
        plain = at._np({"a": t.a, "b": t.b, "e": t.grad_c}[r.side])
        rz, cz = at._row_col_counts(plain, lambda x: x == 0)
        rn, cn = at._row_col_counts(plain, lambda x: x < 0)
        d = out.setdefault(r.kind, {"operands": 0, "plain_zeros": 0, "wire_zeros": 0, "zero_multisets_match": 0,
                                    "signs_match": 0, "plain_negative_fraction": 0.0})
        d["operands"] += 1
        d["plain_zeros"] += int(rz.sum())
        d["wire_zeros"] += int(r.row_zeros.sum())
        d["zero_multisets_match"] += int(np.array_equal(rz, r.row_zeros) and np.array_equal(cz, r.col_zeros))
        d["signs_match"] += int(np.array_equal(rn, r.row_neg) and np.array_equal(cn, r.col_neg))
        d["plain_negative_fraction"] += float((plain < 0).mean())
    for d in out.values():
        n = d["operands"]
        d["zeros_survive"] = d["wire_zeros"] / d["plain_zeros"] if d["plain_zeros"] else None  # none to survive
        d["zero_multisets_match"] /= n
        d["signs_match"] /= n
        d["plain_negative_fraction"] /= n
        d["chance"] = "signs_match of a random sign pattern: ~0 (any negative entries); zeros always survive"
        d["signed_keys"] = signed
    return out


def score_invariant(nb: at.InvariantNeighbours, view: RunView, truth: RunTruth) -> dict:
    """Nearest-neighbour label agreement of the scale-invariant similarity, per layer (chance: the
    fraction of other samples in the batch that share the label)."""
    per: dict[int, list] = {}
    chance: dict[int, list] = {}
    for (s, l), nn in nb.neighbours.items():
        rows = truth_rows(view, truth, s, l)
        y = truth.steps[s].y.numpy()[rows]
        per.setdefault(l, []).append(float((y[nn] == y).mean()))
        same = (y[:, None] == y[None, :]).sum(1) - 1
        chance.setdefault(l, []).append(float((same / max(len(y) - 1, 1)).mean()))
    return {f"layer{l}": {"nn_same_label": float(np.mean(v)), "chance": float(np.mean(chance[l]))} for l, v in per.items()}


def score_unmix(prof, dead, view: RunView, truth: RunTruth) -> dict:
    """Attack ``unmix``: per layer, the nearest neighbour by block-rank profile shares the label
    (the sample axis of a conv's patches is the batch in its own order: no matching needed;
    chance: the share of same-label others), the share of singular blocks; and the dead units
    counted from ranks against the plaintext's zero columns (exact or not, per operand)."""
    out: dict[str, dict] = {}
    per: dict[int, list] = {}
    chance: dict[int, list] = {}
    per_profile: dict[int, list] = {}
    for (s, l), nn in prof.neighbours.items():
        y = truth.steps[s].y.numpy()
        if len(y) != len(nn):
            continue
        per.setdefault(l, []).append(float((y[nn] == y).mean()))
        if (s, l) in prof.neighbours_profile:
            per_profile.setdefault(l, []).append(float((y[prof.neighbours_profile[(s, l)]] == y).mean()))
        same = (y[:, None] == y[None, :]).sum(1) - 1
        chance.setdefault(l, []).append(float((same / max(len(y) - 1, 1)).mean()))
    for l, v in per.items():
        defi = [d for (s, ll), d in prof.deficient.items() if ll == l]
        out[f"layer{l}"] = {"nn_same_label": float(np.mean(v)), "chance": float(np.mean(chance[l])),
                            "nn_same_label_profile_only": float(np.mean(per_profile[l])) if l in per_profile else None,
                            "singular_blocks": float(np.mean(defi))}
    exact, counted, plain = 0, 0, 0
    for (s, l), blocks in dead.per_block.items():
        t = truth.products.get((s, l, 0))
        if t is None:
            continue
        a = at._np(t.a)
        zero_cols = int((np.abs(a).max(0) == 0).sum())
        exact += int(blocks.sum() == zero_cols)
        counted += int(blocks.sum())
        plain += zero_cols
    if dead.per_block:
        out["dead_units"] = {"operands": len(dead.per_block), "count_exact": exact / len(dead.per_block),
                             "counted": counted, "plaintext": plain}
    return out


def _ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two partitions (label arrays)."""
    from math import comb

    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), np.int64)
    np.add.at(table, (ai, bi), 1)
    s_ij = sum(comb(int(x), 2) for x in table.ravel())
    s_a = sum(comb(int(x), 2) for x in table.sum(1))
    s_b = sum(comb(int(x), 2) for x in table.sum(0))
    n2 = comb(len(a), 2)
    exp = s_a * s_b / n2 if n2 else 0.0
    mx = (s_a + s_b) / 2
    return float((s_ij - exp) / (mx - exp)) if mx != exp else 1.0


def score_labels(lr: at.LabelRecovery, view: RunView, truth: RunTruth, public: Public) -> dict:
    """Partition: the fraction of samples whose group is exactly the set of same-label samples of
    their batch, and the mean adjusted Rand index (chance: ~0 and 0). Labels: accuracy given the
    known labels and from the recovered images (chance: the most frequent class's share)."""
    exact, ari, acc_k, acc_i, n = 0, [], [], [], 0
    ys = []
    for s, cols in lr.columns.items():
        y = train_labels(view, truth, s)
        ys.append(y)
        same_true = y[:, None] == y[None, :]
        same_pred = cols[:, None] == cols[None, :]
        exact += int((same_true == same_pred).all(1).sum())
        n += len(y)
        ari.append(_ari(y, cols))
        lk = lr.labels(s, "known")
        if lk is not None:
            acc_k.append((lk == y).mean())
        li = lr.labels(s, "images")
        if li is not None:
            acc_i.append((li == y).mean())
    yall = np.concatenate(ys) if ys else np.zeros(0, np.int64)
    majority = float(np.bincount(yall).max() / len(yall)) if len(yall) else 0.0
    return {"grouped_exactly": exact / max(n, 1), "ari": float(np.mean(ari)) if ari else 0.0,
            "label_accuracy_known": float(np.mean(acc_k)) if acc_k else None,
            "label_accuracy_images": float(np.mean(acc_i)) if acc_i else None,
            "samples": n, "chance": {"grouped_exactly": 0.0, "ari": 0.0, "label_accuracy": majority}}


def _true_grid(truth: RunTruth, step: int, levels: int) -> np.ndarray:
    x = truth.steps[step].x.numpy()
    return np.clip(np.round(x.reshape(len(x), -1) * levels), 0, levels)


def match_images(rec: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recovered rows matched to the true images (minimum total L1): (rec rows, true rows)."""
    r = rec.reshape(len(rec), -1).astype(np.float64)
    t = true.reshape(len(true), -1).astype(np.float64)
    return at.lap(np.abs(r[:, None, :] - t[None, :, :]).sum(-1))


def score_images(rec: at.ImageRecovery, truth: RunTruth, public: Public) -> dict:
    """Fraction of pixels exactly right and within one grey level (1/16), in place, over the
    training steps' images (each step's recovered images matched to its true ones), against the
    public mean image (rounded to the grid) as the baseline."""
    mean = np.round(public.grid().mean(0))
    ex, w1, bex, bw1, n = 0.0, 0.0, 0.0, 0.0, 0
    for s, img in rec.images.items():
        st = truth.steps.get(s)
        if st is None or not st.train:
            continue
        t = _true_grid(truth, s, rec.levels)
        r, c = match_images(img, t)
        d = np.abs(img.reshape(len(img), -1)[r] - t[c])
        ex += (d < 0.5).sum()
        w1 += (d <= 1.0).sum()
        bd = np.abs(mean[None] - t)
        bex += (bd < 0.5).sum()
        bw1 += (bd <= 1.0).sum()
        n += t.size
    n = max(n, 1)
    return {"pixels_exact": ex / n, "pixels_within_1_level": w1 / n, "baseline_exact": bex / n,
            "baseline_within_1_level": bw1 / n, "steps": sum(1 for s in rec.images if truth.steps.get(s) and truth.steps[s].train),
            "chance": {"pixels_within_1_level": bw1 / n}}


def score_structure(st: at.MLPStructure, view: RunView, truth: RunTruth) -> dict:
    """Fraction of hidden units matched correctly between consecutive layers (all, and those
    active on the step's batch), and of samples (rows) traced correctly; chance ~1/units."""
    out = {}
    for l in st.layers[:-1]:
        ok, ok_live, rows_ok = [], [], []
        for s in st.steps:
            tu_out = truth_out_units(view, truth, s, l)
            tu_in = truth_in_units(view, truth, s, l + 1)
            col = st.unit_cols(l, s)
            good = tu_out == tu_in[col]
            live = ~(at._np(at._index(view)[(s, l)].e) == 0).all(0)
            ok.append(good.mean())
            ok_live.append(good[live].mean() if live.any() else 1.0)
            tr0 = truth_rows(view, truth, s, l)
            tr1 = truth_rows(view, truth, s, l + 1)
            rows_ok.append((tr0 == tr1[st.row_maps[l][s]]).mean())
        n = len(st.unit_map[l])
        out[f"layer{l}->{l + 1}"] = {"units": float(np.mean(ok)), "units_active": float(np.mean(ok_live)),
                                     "samples": float(np.mean(rows_ok)), "chance": 1.0 / n}
    return out


def _real_model(truth: RunTruth, public: Public, seed: int | None = None):
    import torch

    from tempo import models

    if seed is not None:
        torch.manual_seed(seed)
    m = models.build(public.model, public.image_shape, public.classes)
    if seed is None:
        m.load_state_dict(truth.final_state)
    m.eval()
    return m


def score_steal(stolen: at.StolenMLP, truth: RunTruth, public: Public) -> dict:
    """Accuracy on the public sample of the stolen model, the victim's final model and a random
    initialisation (chance: the majority class), and how often stolen and final agree."""
    import torch

    x = torch.tensor(public.x, dtype=torch.float32)
    with torch.no_grad():
        real = _real_model(truth, public)(x).argmax(1).numpy()
        rnd = _real_model(truth, public, seed=12345)(x).argmax(1).numpy()
    pred = stolen.predict(public.x)
    # the victim's weights at the stolen step (the products' plaintext) with its final biases
    # (biases never leave the enclave, and the truth keeps only the final ones)
    step_agree = None
    layers = sorted(l for (s, l, _) in truth.products if s == stolen.step)
    biases = [v for k, v in truth.final_state.items() if k.endswith("bias")]
    if len(layers) == len(stolen.weights) == len(biases):
        h = public.x.reshape(len(public.x), -1)
        for i, l in enumerate(layers):
            h = h @ at._np(truth.products[(stolen.step, l, 0)].b) + at._np(biases[i])
            if i < len(layers) - 1:
                h = np.maximum(h, 0.0)
        step_agree = float((stolen.classes[stolen.logits(public.x).argmax(1)] == h.argmax(1)).mean())
    return {"stolen_accuracy": float((pred == public.y).mean()), "real_accuracy": float((real == public.y).mean()),
            "random_init_accuracy": float((rnd == public.y).mean()), "agreement_with_real": float((pred == real).mean()),
            "agreement_with_step_weights": step_agree, "step": stolen.step,
            "chance": float(np.bincount(public.y).max() / len(public.y))}


def score_theft(theft, truth: RunTruth, public: Public) -> dict:
    """`tempo.audit.theft.steal_offloaded`'s models and the victim's final model, scored on the
    victim's test images (the run's evaluation batches: neither the victim nor the attacker
    trained on them; the public sample's held-out part when the run has none). ``worth``:
    stolen minus the better baseline (random frozen, public only); > 0 when the theft pays."""
    test = [s for s in truth.steps.values() if not s.train]
    if test:
        x = np.concatenate([s.x.numpy() for s in test]).astype(np.float64)
        y = np.concatenate([s.y.numpy() for s in test])
        on = f"victim's test set ({len(y)} images)"
    else:
        x, y = public.x[theft.held], public.y[theft.held]
        on = f"held-out public images ({len(y)})"
    acc = theft.accuracy(x, y)
    from tempo.audit.theft import accuracy

    real = accuracy(_real_model(truth, public), x, y)
    out = {f"{k}_accuracy": v for k, v in acc.items()} | {"real_accuracy": real, "scored_on": on,
                                                           "frozen_layers": theft.frozen, "step": theft.step,
                                                           "public_images": len(theft.train),
                                                           "own_held_out": theft.own,
                                                           "chance": float(np.bincount(y).max() / len(y))}
    if "stolen" in acc:
        out["worth"] = acc["stolen"] - max(acc.get("random_frozen", 0.0), acc.get("public_only", 0.0))
    return out


def score_hidden(hr: at.HiddenRecovery, truth: RunTruth, layer: int = 1) -> dict:
    """Correlation of the rebuilt maps with the true ones (channels matched, one scale per
    channel; in the attacker's chosen frame symmetry and in the best one), of the deconvolved
    images with the true images, and the digit accuracy of their labels (chance 10%)."""
    corr, corr_best, img_corr, acc = [], [], [], []
    for s, hm in hr.maps.items():
        t = truth.products[(s, layer, 0)].b.numpy().astype(np.float64)  # (batch, channels·9, positions)
        nch = t.shape[1] // 9
        h = round(np.sqrt(t.shape[2]))
        true = t[:, [c * 9 + 4 for c in range(nch)], :].reshape(len(t), nch, h, h)
        tf = true.transpose(1, 0, 2, 3).reshape(nch, -1)
        best = None
        for k in range(8):
            m = at._d4_image(hm.maps, k)
            mf = m.transpose(1, 0, 2, 3).reshape(m.shape[1], -1)
            with np.errstate(invalid="ignore", divide="ignore"):
                c = np.nan_to_num(np.corrcoef(mf, tf)[:len(mf), len(mf):])
            r, cc = at.lap(-c)
            val = float(c[r, cc].mean())
            if k == hm.symmetry:
                corr.append(val)
            best = val if best is None else max(best, val)
        corr_best.append(best)
        x = truth.steps[s].x.numpy().reshape(len(t), -1)
        img = hr.images[s].reshape(len(t), -1)
        img_corr.append(float((at._corr_features(img) * at._corr_features(x)).sum(1).mean()))
        acc.append(float((hr.labels[s] == truth.steps[s].y.numpy()).mean()))
    return {"map_correlation": float(np.mean(corr)) if corr else None,
            "map_correlation_best_symmetry": float(np.mean(corr_best)) if corr_best else None,
            "image_correlation": float(np.mean(img_corr)) if img_corr else None,
            "digit_accuracy": float(np.mean(acc)) if acc else None, "steps": len(acc), "chance": {"digit_accuracy": 0.1}}


def score_cnn_channels(match: dict, view: RunView, truth: RunTruth) -> dict:
    """Fraction of conv1 output channels matched to the right conv2 input channel (chance 1/16)."""
    ok = []
    for s, (rows, cols) in match.items():
        p = at._index(view)[(s, 0)]
        t = truth.products[(s, 0, 0)]
        # conv1's output channels: rows of C' ⊙ D'ᵀ (batch, ch, pos) against the plaintext's
        a, b, e = at._np(p.a), at._np(p.b), at._np(p.e)
        masked = np.einsum("ck,bkp->bcp", a, b) * e
        plain = np.einsum("ck,bkp->bcp", at._np(t.a), at._np(t.b)) * at._np(t.grad_c)
        ch = _match_sorted(masked.transpose(1, 0, 2).reshape(masked.shape[1], -1),
                           plain.transpose(1, 0, 2).reshape(plain.shape[1], -1))
        # conv2's input channel of each recovered channel: its rows' true channel, by the truth
        # patches' proportional entries
        tb = at._np(truth.products[(s, 1, 0)].b)
        pb = at._np(at._index(view)[(s, 1)].b)
        true_ch = _patch_row_channels(pb, tb)
        for c1, rset in zip(rows, cols):
            ok.append(ch[c1] == true_ch[rset[0]])
    return {"channels": float(np.mean(ok)) if ok else None, "chance": 1.0 / 16}


def _patch_row_channels(masked: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """The true input channel of each masked patch row (conv2's ``B'``): a masked entry's vector
    over the batch is proportional to a plaintext entry's of the same channel."""
    nrow = masked.shape[1]
    ch = -np.ones(nrow, np.int64)
    tv = np.abs(plain).transpose(1, 2, 0).reshape(-1, plain.shape[0])
    tmx = tv.max(1)
    tn = np.where(tmx[:, None] > 0, tv / np.where(tmx > 0, tmx, 1)[:, None], 0)
    for j in range(nrow):
        v = np.abs(masked[:, j, :]).T  # (positions, batch)
        k = int(np.argmax((v > 0).sum(1)))
        if v[k].max() == 0:
            continue
        u = v[k] / v[k].max()
        d = np.abs(tn - u[None, :]).max(1)
        ch[j] = int(np.argmin(d)) // plain.shape[2] // 9
    return ch


def write_images_png(rec: at.ImageRecovery, truth: RunTruth, path: str, step: int | None = None,
                     count: int = 16, public: Public | None = None) -> str:
    """A PNG of true (top) and recovered (below) images of one training step (the first by
    default), recovered ones matched to the true ones; with `public`, a third row shows the
    public mean image, the baseline. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s in sorted(rec.images) if truth.steps.get(s) and truth.steps[s].train]
    s = step if step is not None else steps[0]
    true = _true_grid(truth, s, rec.levels)
    img = rec.images[s].reshape(len(rec.images[s]), -1)
    r, c = match_images(img, true)
    order = np.argsort(c)[:count]
    h, w = rec.images[s].shape[-2:]
    rows = 3 if public is not None else 2
    fig, axes = plt.subplots(rows, count, figsize=(count * 0.8, rows * 0.9))
    for k, i in enumerate(order):
        axes[0, k].imshow(true[c[i]].reshape(h, w), cmap="gray_r", vmin=0, vmax=rec.levels)
        axes[1, k].imshow(img[r[i]].reshape(h, w), cmap="gray_r", vmin=0, vmax=rec.levels)
        if public is not None:
            axes[2, k].imshow(public.grid().mean(0).reshape(h, w), cmap="gray_r", vmin=0, vmax=rec.levels)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("true", fontsize=7)
    axes[1, 0].set_ylabel("relay", fontsize=7)
    if public is not None:
        axes[2, 0].set_ylabel("public\nmean", fontsize=7)
    fig.suptitle(f"{rec.model}: step {s}, recovered from what relays received", fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def score_game(answers: list[int], secrets: list[int], z: float = 1.96) -> dict:
    """A distinguishing game's advantage ``2·accuracy − 1`` with the number of rounds and a Wilson
    95% interval (on the accuracy, mapped to the advantage). Chance: 0."""
    n = len(secrets)
    if n == 0:
        return {"advantage": None, "rounds": 0, "interval": None, "chance": 0.0}
    wins = int(sum(int(a) == int(s) for a, s in zip(answers, secrets)))
    p = wins / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo, hi = max(0.0, mid - half), min(1.0, mid + half)
    return {"advantage": 2 * p - 1, "accuracy": p, "rounds": n, "wins": wins,
            "interval": [round(float(2 * lo - 1), 4), round(float(2 * hi - 1), 4)], "chance": 0.0}
