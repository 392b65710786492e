"""The attacks on what a relay receives in the AsymML mode (`tempo.enclave.asymml`), and their scores.

With identity keys a relay holds, per product, exactly what the mode sends it: ``A`` the noisy
clipped residual of the layer's input (a Linear's batch rows; a convolution's patch rows,
sample-major, columns channel-major), ``B`` the layer's weights in the clear (transposed), and,
in the backward, ``E = dL/dy`` in the clear. The attacker here reads that view only, a public
sample of the data (`Public`: the held-out ``val`` images, never the victim's), the architecture
and the mode's public knobs (`AsymmlConfig`: energy, clip, noise). What it recovers:

- **labels** (`recover_labels`): the last layer's ``E`` is ``(softmax − onehot)/n`` per row: its
  one negative entry is the sample's label.
- **weights** (`rebuilt_model`): every product's ``B`` is a layer's weights; an evaluation
  batch's are the final ones. Biases never travel: they are fitted on the public sample.
- **inputs** (`reconstruct`): from the residual of the first offloaded layer whose residual is not
  pure noise (the ``mlp``'s first Linear; the ``cnn``'s second convolution: the first has one
  input channel, so its rank-1 split is full rank and its residual is noise only) and the zero
  pattern of the first layer's ``E`` (ReLU's inactive units: a sign constraint per unit on
  ``W x + b``, ``W`` in the clear), a ridge regression to the image learned on public images
  run through the same split (the step's weights, the knobs, biases matched to the observed
  activation rates), then a projected-gradient refinement that asks the image to reproduce the
  activation pattern with the known weights.

Scores are against the enclave's truth (`RunTruth`): rows are in batch order (identity keys:
nothing is permuted), so a recovered image is compared with the true image of its row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tempo.audit.public import Public
from tempo.audit.view import RunTruth, RunView

LABEL_CHANCE = 0.1


@dataclass
class Seen:
    """One product of one step as the relays received it, its parts joined (batch order kept)."""

    a: torch.Tensor
    b: torch.Tensor
    e: torch.Tensor | None


def joined(view: RunView) -> dict[tuple[int, int], Seen]:
    """(step, layer) → the product, parts joined: parts that share ``B`` split the rows of ``A``;
    parts that share ``A`` split the columns of ``B``."""
    groups: dict[tuple[int, int], list] = {}
    for p in view.products:
        groups.setdefault((p.step, p.layer), []).append(p)
    out = {}
    for key, parts in groups.items():
        parts.sort(key=lambda p: p.part)
        if len(parts) == 1:
            p = parts[0]
            out[key] = Seen(p.a, p.b, p.e)
            continue
        has_e = all(p.e is not None for p in parts)
        if all(p.b.shape == parts[0].b.shape and torch.equal(p.b, parts[0].b) for p in parts):
            out[key] = Seen(torch.cat([p.a for p in parts], -2), parts[0].b,
                            torch.cat([p.e for p in parts], -2) if has_e else None)
        elif all(p.a.shape == parts[0].a.shape and torch.equal(p.a, parts[0].a) for p in parts):
            out[key] = Seen(parts[0].a, torch.cat([p.b for p in parts], -1),
                            torch.cat([p.e for p in parts], -1) if has_e else None)
        else:
            raise ValueError(f"product {key}: parts that split neither the rows nor the columns")
    return out


def layers_of(public: Public) -> list[torch.nn.Module]:
    """The model's Linear/Conv2d layers in order (the architecture is public)."""
    from tempo import models

    net = models.build(public.model, public.image_shape, public.classes)
    return [m for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def weight_of(seen: Seen, layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight from ``B`` (Linear: Wᵀ; convolution as patch rows: W flattened, transposed)."""
    return seen.b.detach().to(torch.float64).t().reshape(layer.weight.shape).contiguous()


def train_steps(seen: dict, last: int) -> list[int]:
    """The steps with a backward: training steps (an evaluation batch has no ``E``)."""
    return sorted(s for (s, l), p in seen.items() if l == last and p.e is not None)


# -- labels --


def recover_labels(seen: dict, last: int) -> dict[int, torch.Tensor]:
    """Each training step's labels, in batch order: the one negative entry of each row of the
    last layer's ``E = (softmax − onehot)/n``."""
    return {s: seen[(s, last)].e.detach().to(torch.float64).argmin(-1) for s in train_steps(seen, last)}


def score_labels(labels: dict[int, torch.Tensor], truth: RunTruth) -> dict:
    ok = n = 0
    for s, y in labels.items():
        t = truth.steps.get(s)
        if t is None or not t.train:
            continue
        ok += int((y.cpu() == t.y.cpu()).sum())
        n += len(t.y)
    return {"labels_exact": ok / max(n, 1), "samples": n, "chance": LABEL_CHANCE}


# -- weights --


def rebuilt_model(seen: dict, public: Public, fit_biases: bool = True, seed: int = 0,
                  fit_steps: int = 300) -> tuple[torch.nn.Module, int]:
    """The model from the latest step's ``B`` operands (an evaluation batch's, when the run made
    some: the final weights), biases fitted on the public sample (or zero); and that step."""
    from tempo import models

    step = max(s for s, _ in seen)
    torch.manual_seed(seed)
    net = models.build(public.model, public.image_shape, public.classes).double()
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    with torch.no_grad():
        for i, m in enumerate(layers):
            m.weight.copy_(weight_of(seen[(step, i)], m))
            if m.bias is not None:
                m.bias.zero_()
    if fit_biases:
        biases = [m.bias for m in layers if m.bias is not None]
        for p in net.parameters():
            p.requires_grad_(False)
        for p in biases:
            p.requires_grad_(True)
        x, y = torch.as_tensor(public.x), torch.as_tensor(public.y)
        opt = torch.optim.Adam(biases, lr=0.05)
        for _ in range(fit_steps):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        for p in net.parameters():
            p.requires_grad_(False)
    net.eval()
    return net, step


def score_weights(seen: dict, truth: RunTruth, public: Public, fit_steps: int = 300) -> dict:
    """The rebuilt model's weights against the final ones, and its test accuracy (biases fitted on
    the public sample, or zero) against the real model's, on the run's evaluation batches."""
    from tempo import models

    net, step = rebuilt_model(seen, public, fit_steps=fit_steps)
    zero, _ = rebuilt_model(seen, public, fit_biases=False)
    real = models.build(public.model, public.image_shape, public.classes).double()
    real.load_state_dict({k: v.double() for k, v in truth.final_state.items()})
    real.eval()
    names = [k for k in truth.final_state if k.endswith("weight")]
    rebuilt = {k: v for k, v in net.state_dict().items() if k.endswith("weight")}
    diff = max(float((rebuilt[k] - truth.final_state[k].double()).abs().max()) for k in names)
    xs = [t.x for t in truth.steps.values() if not t.train]
    ys = [t.y for t in truth.steps.values() if not t.train]
    if not xs:
        return {"weights_max_abs_diff": diff, "weights_exact": diff == 0.0, "from_step": step}
    x, y = torch.cat(xs).double(), torch.cat(ys)

    def acc(m):
        with torch.no_grad():
            return float((m(x).argmax(1) == y).double().mean())

    return {"weights_max_abs_diff": diff, "weights_exact": diff < 1e-6, "from_step": step,
            "real_accuracy": acc(real), "rebuilt_accuracy": acc(net), "rebuilt_zero_bias_accuracy": acc(zero),
            "test_images": len(y), "chance": 1.0 / public.classes}


# -- inputs --


class Features:
    """What the attacker reads per sample, and the same computed on public images (simulation).

    ``mlp``: the first Linear's residual (pixels) and the first layer's active units (``E ≠ 0``).
    ``cnn``: the second convolution's residual (channels × positions: the patches' centres) and
    the first convolution's active (channel, position) pairs."""

    def __init__(self, public: Public, config, generator: torch.Generator) -> None:
        self.public, self.config, self.gen = public, config, generator
        self.layers = layers_of(public)
        self.cnn = isinstance(self.layers[0], torch.nn.Conv2d)
        self.residual_layer = 1 if self.cnn else 0

    # what the view holds
    def observed(self, seen: dict, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features (n, d), the first layer's weight, its activity (n, units…)) at `step`."""
        first = seen[(step, 0)]
        w = weight_of(first, self.layers[0])
        active = (first.e.detach().to(torch.float64) != 0).double()
        r = seen[(step, self.residual_layer)].a.detach().to(torch.float64)
        n = active.shape[0] if not self.cnn else r.shape[0] // self._positions()
        if self.cnn:
            conv = self.layers[1]
            centre = (conv.kernel_size[0] // 2) * conv.kernel_size[1] + conv.kernel_size[1] // 2
            cols = torch.arange(conv.in_channels) * conv.kernel_size[0] * conv.kernel_size[1] + centre
            r = r[:, cols].reshape(n, self._positions(), conv.in_channels).transpose(1, 2)  # (n, c, positions)
            active = active.reshape(n, self._positions(), -1).transpose(1, 2)  # (n, channels, positions)
        return torch.cat([r.reshape(n, -1), active.reshape(n, -1)], 1), w, active

    def _positions(self) -> int:
        return self.public.image_shape[1] * self.public.image_shape[2]

    def preact(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The first layer's pre-activation of images `x`: (n, units) or (n, channels, positions)."""
        if self.cnn:
            c = self.layers[0]
            y = F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)
            return y.reshape(len(x), y.shape[1], -1)
        y = x.reshape(len(x), -1) @ w.t()
        return y if b is None else y + b

    def bias(self, w: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The first layer's bias, matched so that public images are active as often as the batch
        was, unit by unit (the bias never travels; the activity pattern does)."""
        x = torch.as_tensor(self.public.x)
        z = self.preact(x, w, None)
        if self.cnn:
            z = z.transpose(0, 1).reshape(z.shape[1], -1)  # (channels, samples·positions)
            rate = active.transpose(0, 1).reshape(active.shape[1], -1).mean(1)
        else:
            z, rate = z.t(), active.mean(0)
        q = torch.stack([torch.quantile(z[j], float(1 - rate[j].clamp(0.0, 1.0))) for j in range(len(z))])
        return -q

    def simulate(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The features a relay would read for the batch `x` (public images) under these weights."""
        from tempo.core.asymml import light_svd, noisy_residual

        cfg = self.config
        z = self.preact(x, w, b)
        active = (z > 0).double()
        n = len(x)
        if self.cnn:
            h = torch.relu(z)  # (n, c, positions)
            u, v = light_svd(h, cfg.energy, cfg.max_rank, cfg.iters)
            low = u @ v if u.shape[-1] else torch.zeros_like(h)
            r = noisy_residual(h, low, cfg, self.gen)
        else:
            rows = x.reshape(n, -1)
            u, v = light_svd(rows.unsqueeze(0), cfg.energy, cfg.max_rank, cfg.iters)
            low = (u @ v)[0] if u.shape[-1] else torch.zeros_like(rows)
            r = noisy_residual(rows, low, cfg, self.gen)
        return torch.cat([r.reshape(n, -1), active.reshape(n, -1)], 1)


def _ridge(f: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mu, sd = f.mean(0), f.std(0).clamp_min(1e-6)
    g = (f - mu) / sd
    ym = y.mean(0)
    coef = torch.linalg.solve(g.t() @ g + lam * len(g) * torch.eye(g.shape[1], dtype=g.dtype), g.t() @ (y - ym))
    return mu, sd, torch.cat([coef, ym[None]])


def _predict(model, f: torch.Tensor) -> torch.Tensor:
    mu, sd, coef = model
    return ((f - mu) / sd) @ coef[:-1] + coef[-1]


def _batches(xs: torch.Tensor, n: int, count: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [xs[torch.randperm(len(xs), generator=gen)[:n]] if len(xs) >= n else
            xs[torch.randint(len(xs), (n,), generator=gen)] for _ in range(count)]


def refine(x0: torch.Tensor, w: torch.Tensor, b: torch.Tensor, active: torch.Tensor, feats: Features,
           iters: int = 150, weight: float = 1.0, lr: float = 0.02) -> torch.Tensor:
    """Images near `x0` (the regression's guess) that reproduce the first layer's observed
    activity with the known weights (a squared hinge on each unit's sign), kept in [0, 1]."""
    x = x0.clone().requires_grad_(True)
    sign = active * 2 - 1
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(iters):
        opt.zero_grad()
        z = feats.preact(x, w, b)
        scale = z.detach().abs().mean().clamp_min(1e-6)
        hinge = torch.relu(0.05 * scale - sign * z) / scale
        loss = weight * (hinge ** 2).sum() + ((x - x0) ** 2).sum()
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
    return x.detach()


@dataclass
class Reconstruction:
    images: dict  # step → (n, C, H, W) recovered images, float in [0, 1], batch order
    ridge: dict  # step → the regression's images (before the refinement)
    lam: float


def reconstruct(seen: dict, public: Public, config, steps: list[int] | None = None, batches: int = 24,
                seed: int = 0, refine_iters: int = 150) -> Reconstruction:
    """Every training step's images from what the relays saw (see the module's docstring)."""
    gen = torch.Generator().manual_seed(seed)
    feats = Features(public, config, gen)
    last = len(feats.layers) - 1
    steps = train_steps(seen, last) if steps is None else steps
    xs = torch.as_tensor(public.x)
    # the ridge's strength, once, on public images held out of the regression's own
    order = torch.randperm(len(xs), generator=gen)
    cut = int(0.75 * len(xs))
    fit_x, val_x = xs[order[:cut]], xs[order[cut:]]
    s0 = steps[0]
    f_obs, w0, act0 = feats.observed(seen, s0)
    b0 = feats.bias(w0, act0)
    n0 = len(f_obs)
    fit = [(feats.simulate(x, w0, b0), x) for x in _batches(fit_x, n0, batches, gen)]
    val = [(feats.simulate(x, w0, b0), x) for x in _batches(val_x, n0, 4, gen)]
    ff, fy = torch.cat([f for f, _ in fit]), torch.cat([x.reshape(len(x), -1) for _, x in fit])
    vf, vy = torch.cat([f for f, _ in val]), torch.cat([x.reshape(len(x), -1) for _, x in val])
    lam = min((1e-3, 1e-2, 1e-1, 1.0, 10.0),
              key=lambda lam: float(((_predict(_ridge(ff, fy, lam), vf) - vy) ** 2).mean()))
    images, ridged = {}, {}
    for s in steps:
        f_obs, w, act = feats.observed(seen, s)
        b = feats.bias(w, act)
        n = len(f_obs)
        sims = [(feats.simulate(x, w, b), x) for x in _batches(xs, n, batches, gen)]
        model = _ridge(torch.cat([f for f, _ in sims]), torch.cat([x.reshape(len(x), -1) for _, x in sims]), lam)
        x0 = _predict(model, f_obs).clamp(0.0, 1.0).reshape(n, *public.image_shape)
        ridged[s] = x0
        images[s] = refine(x0, w, b, act, feats, refine_iters) if refine_iters else x0
    return Reconstruction(images, ridged, lam)


def digit_classifier(public: Public, seed: int = 0) -> torch.nn.Module:
    """A classifier trained on the public images only (a small MLP), to name reconstructed digits."""
    torch.manual_seed(seed)
    x, y = torch.as_tensor(public.x).reshape(len(public.x), -1), torch.as_tensor(public.y)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 128), torch.nn.ReLU(),
                              torch.nn.Linear(128, public.classes)).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    return net


def score_reconstruction(images: dict, truth: RunTruth, public: Public, classifier=None) -> dict:
    """Per training image (rows in batch order): pixels exact after rounding to the grey levels,
    within one level, correlation with the true image, and the public classifier's accuracy on
    it against the true label; each with the public mean image as the baseline (and the
    classifier's accuracy on the true images as its ceiling)."""
    levels = public.levels
    mean = torch.as_tensor(public.x).mean(0).reshape(-1)
    mean_grid = torch.round(mean * levels)
    classifier = classifier or digit_classifier(public)
    ex = w1 = bex = bw1 = named = named_true = 0.0
    corr, bcorr, n = [], [], 0
    for s, img in images.items():
        st = truth.steps.get(s)
        if st is None or not st.train:
            continue
        t = st.x.reshape(len(st.x), -1).double()
        r = img.reshape(len(img), -1).double()
        tg = torch.round(t * levels).clamp(0, levels)
        rg = torch.round(r.clamp(0, 1) * levels)
        ex += float((rg == tg).double().sum())
        w1 += float(((rg - tg).abs() <= 1).double().sum())
        bex += float((mean_grid[None] == tg).double().sum())
        bw1 += float(((mean_grid[None] - tg).abs() <= 1).double().sum())
        corr.append(_corr(r, t))
        bcorr.append(_corr(mean[None].expand_as(t), t))
        with torch.no_grad():
            named += float((classifier(r).argmax(1) == st.y).double().sum())
            named_true += float((classifier(t).argmax(1) == st.y).double().sum())
        n += len(t)
    px = max(n * public.pixels, 1)
    n1 = max(n, 1)

    def mean_of(parts):
        return float(torch.cat(parts).nanmean()) if parts else None

    return {"pixels_exact": ex / px, "pixels_within_1_level": w1 / px, "baseline_exact": bex / px,
            "baseline_within_1_level": bw1 / px, "correlation": mean_of(corr), "baseline_correlation": mean_of(bcorr),
            "digit_accuracy": named / n1, "digit_accuracy_true_images": named_true / n1,
            "digit_chance": 1.0 / public.classes, "images": n}


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-30), torch.full_like(den, float("nan")))


# -- all of it --

ATTACKS = ("labels", "inputs", "weights")


def run_all(view: RunView, public: Public, truth: RunTruth | None, config, attacks: tuple[str, ...] = ATTACKS,
            log=None) -> dict:
    """The AsymML attacks on `view`, scored against `truth`; ``_cache`` holds the reconstruction.
    Small products: one thread each (on a shared machine torch's threads fight over the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_all(view, public, truth, config, attacks, log)
    finally:
        torch.set_num_threads(threads)


def _run_all(view: RunView, public: Public, truth: RunTruth | None, config, attacks: tuple[str, ...], log) -> dict:
    seen = joined(view)
    last = len(layers_of(public)) - 1
    out: dict = {}
    if "labels" in attacks:
        labels = recover_labels(seen, last)
        out["labels"] = score_labels(labels, truth) if truth is not None else {"steps": len(labels)}
        out["labels"]["from"] = "the last layer's dL/dy: (softmax − onehot)/n, its one negative entry per row"
        if log:
            log.info("audit.asymml.labels", **{k: v for k, v in out["labels"].items() if k != "from"})
    if "weights" in attacks and truth is not None:
        out["weights"] = score_weights(seen, truth, public)
        out["weights"]["from"] = ("every product's B (the weights, in the clear); biases fitted on the public sample "
                                  "(never sent)")
        if log:
            log.info("audit.asymml.weights", **{k: v for k, v in out["weights"].items() if k != "from"})
    if "inputs" in attacks:
        rec = reconstruct(seen, public, config)
        res = {"source": ("the second convolution's input residual and the first convolution's activity (dL/dy ≠ 0)"
                          if public.model == "cnn" else
                          "the first Linear's input residual and the first layer's activity (dL/dy ≠ 0)"),
               "ridge_lambda": rec.lam, "steps": len(rec.images)}
        if truth is not None:
            clf = digit_classifier(public)
            res.update(score_reconstruction(rec.images, truth, public, clf))
            res["ridge_only"] = {k: v for k, v in score_reconstruction(rec.ridge, truth, public, clf).items()
                                 if k in ("pixels_exact", "correlation", "digit_accuracy")}
        out["inputs"] = res
        out["_cache"] = {"inputs": rec}
        if log:
            log.info("audit.asymml.inputs", **{k: v for k, v in res.items() if not isinstance(v, (dict, str))})
    return out
