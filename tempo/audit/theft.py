"""Model theft from the offloaded layers alone (`steal_offloaded`), under every masking preset.

Under positive monomial keys a masked weight ``W' = D_r P_r W P_s D_s`` of a hidden layer is a
functional copy of ``W``: ReLU commutes with a permutation and with positive per-unit scales,
so the layer before (which produces ``W'``'s inputs) and the layer after (which reads its
outputs) can absorb the keys. A relay that holds ``W'`` of the offloaded hidden layers, and an
attacker with a public sample of the data, therefore only has to train the layers the relays
never saw (the first layer and the head when ``edges``/``mixed`` keep them in the enclave, and
the biases, which never leave it), with the hidden layers frozen at their masked weights.

Compared, all trained the same way on the same public images and scored on the same held-out
images: (a) the same architecture with the frozen layers at random initialisation (what the
frozen layers are worth on their own), (b) the architecture trained entirely on the public
sample (what an attacker gets without Tempo), (c) the victim's real model. The theft is worth
something when stolen > max(a, b).

Which layers are frozen: the offloaded *hidden* layers (neither the first, whose inputs are the
pixels in an order the key hides, nor the head, whose outputs are the classes in an order the
key hides): MLP layer 1 (Linear 128→128), CNN conv2. Under ``paper``/``head`` the first layer
(and head) are offloaded too, but their outer side is not absorbable by a trainable layer: the
full-model theft of `attacks.steal_mlp` uses them (pixel order from the image attack); here they
are trained, so one number compares all presets. Two adjacent frozen layers would need their
keys linked (`attacks.link_matrices`); the shipped models have one hidden product each.

The CNN's conv2 ``A'`` is ``(out channels) × (in channel, kernel offset)`` with both axes
permuted and scaled by the key: without the row structure it cannot be put back as a 3×3
convolution. It is frozen as a 1×1 convolution over 144 maps, one per masked patch row, made
by a trainable 5×5 convolution (padding 2) with ReLU: patch row (c, δ) at position p is
``relu(conv1_c(x))(p + δ)``, a 3×3 kernel moved by δ, i.e. a 5×5 kernel; the keys' scale and
order are absorbed per map. So the victim's network lies in this family (up to the border,
where the hidden map is zero-padded), whatever the key; the baselines use the same family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from tempo.audit.public import Public
from tempo.audit.view import RunView


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64) if hasattr(t, "detach") else np.asarray(t, np.float64)


def hidden_layers(public: Public, view: RunView) -> list[int]:
    """The model's layers to freeze: offloaded ones that are neither the first nor the head."""
    n = public.nlayers(view)
    return [l for l in view.layers() if 0 < l < n - 1]


def masked_weight(view: RunView, public: Public, layer: int, step: int | None = None) -> tuple[np.ndarray, int]:
    """The masked weight of `layer` as a relay holds it, (out × in) as torch stores it, from the
    last step the layer was seen (default): evaluation batches after training carry the final
    weights. Parts of a partitioned product are joined along the output axis."""
    steps = sorted({p.step for p in view.products if p.layer == layer})
    if not steps:
        raise ValueError(f"layer {layer} never left the enclave")
    t = steps[-1] if step is None else step
    parts = view.at(t, layer)
    if public.model == "cnn" and not public.patch_rows:  # conv: A' is the weight (out × in·k·k), B' the patches
        return _join([_np(p.a) for p in parts], 0), t
    return _join([_np(p.b) for p in parts], 1).T, t  # linear: A' the activations, B' the weight (in × out)


def _join(mats: list[np.ndarray], axis: int) -> np.ndarray:
    """One weight from a product's parts: the same matrix in each (the parts split the batch) or
    pieces of it along `axis`."""
    if all(m.shape == mats[0].shape and np.array_equal(m, mats[0]) for m in mats[1:]):
        return mats[0]
    return np.concatenate(mats, axis)


def balance(w: np.ndarray, rows: bool = True, cols: bool = True, rounds: int = 20) -> np.ndarray:
    """``w`` (out × in) with output units (`rows`) and input units (`cols`) rescaled to unit
    norm (Sinkhorn on the norms): a positive scale per output unit is absorbed by its trainable
    bias and the next trainable layer, one per input unit by the trainable layer before (ReLU
    commutes with both), so this changes nothing the network can compute; it only undoes the
    keys' 2⁸-fold spread of scales for the optimiser. An axis shared with another frozen layer
    (or the pixels) is left alone."""
    w = w.copy()
    for _ in range(rounds if rows and cols else 1):
        if rows:
            r = np.linalg.norm(w, axis=1, keepdims=True)
            w /= np.where(r > 0, r, 1.0)
        if cols:
            c = np.linalg.norm(w, axis=0, keepdims=True)
            w /= np.where(c > 0, c, 1.0)
    return w


class _Frozen1x1(nn.Module):
    """A (out × in) matrix applied per position, with a trainable bias."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(w.shape[1], w.shape[0], 1)
        with torch.no_grad():
            self.conv.weight.copy_(w[:, :, None, None])
            self.conv.bias.zero_()
        self.conv.weight.requires_grad_(False)

    def forward(self, x):
        return self.conv(x)


def build_model(public: Public, frozen: dict[int, np.ndarray | None], seed: int = 0) -> nn.Module:
    """The architecture with layers in `frozen` fixed (their bias trainable): a matrix (out × in,
    masked row and column order), or None for the public-only model (nothing frozen). For the
    CNN, conv2 frozen becomes a 1×1 conv over one map per masked patch row (module doc)."""
    from tempo import models

    torch.manual_seed(seed)
    model = models.build(public.model, public.image_shape, public.classes)
    frozen = {l: w for l, w in frozen.items() if w is not None}
    if not frozen:
        return model
    if public.model == "cnn":
        if set(frozen) != {1}:
            raise ValueError("the CNN theft freezes conv2 only")
        w = torch.tensor(frozen[1], dtype=torch.float32)
        c_in = public.image_shape[0]
        mods = list(model)
        return nn.Sequential(nn.Conv2d(c_in, w.shape[1], 5, padding=2), nn.ReLU(), _Frozen1x1(w), *mods[3:])
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for l, w in frozen.items():
        mod = layers[l]
        with torch.no_grad():
            mod.weight.copy_(torch.tensor(w, dtype=torch.float32).reshape(mod.weight.shape))
            mod.bias.zero_()
        mod.weight.requires_grad_(False)
    return model


def random_like(shapes: dict[int, tuple[int, int]], seed: int) -> dict[int, np.ndarray]:
    """Random frozen weights of the frozen layers' shapes (out × in), PyTorch's default init."""
    torch.manual_seed(10_000 + seed)
    return {l: nn.Linear(shape[1], shape[0]).weight.detach().numpy().astype(np.float64) for l, shape in shapes.items()}


def fit(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 60, lr: float = 3e-3, batch: int = 64,
        seed: int = 0) -> nn.Module:
    """Adam on the trainable parameters, minibatches of the public images."""
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch):
            idx = order[i:i + batch]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.tensor(x, dtype=torch.float32)).argmax(1).numpy() == np.asarray(y)).mean())


@dataclass
class Theft:
    """The attacker's models, trained on ``public.x[train]``: ``models[kind][seed]`` for kind in
    stolen / random_frozen / public_only; ``frozen`` the model layers fixed at the masked
    weights of ``step``; ``own`` the attacker's own accuracies on the public images it held out."""

    frozen: list[int]
    step: int | None
    train: np.ndarray
    held: np.ndarray
    models: dict[str, list[nn.Module]] = field(default_factory=dict)
    own: dict[str, float] = field(default_factory=dict)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        return {k: float(np.mean([accuracy(m, x, y) for m in ms])) for k, ms in self.models.items()}


def steal_offloaded(view: RunView, public: Public, seeds: int = 2, epochs: int | None = None, held_out: float = 0.2,
                    weights: dict[int, np.ndarray] | None = None, per_class: int | None = None) -> Theft:
    """Freeze the offloaded hidden layers at their masked weights (`weights` overrides, for
    experiments), train the rest on (1 - `held_out`) of the public sample, `seeds` times, and
    the two baselines the same way. Nothing but the relays' view and the public sample."""
    frozen = hidden_layers(public, view) if weights is None else sorted(weights)
    step = None
    if weights is None:
        weights = {}
        for l in frozen:
            weights[l], step = masked_weight(view, public, l)
    weights = {l: np.asarray(w, np.float64) for l, w in weights.items()}
    for l in frozen:  # units between two frozen layers: one scale per unit, out of one and into the other
        if l + 1 in weights:
            n = np.linalg.norm(weights[l], axis=1)
            n = np.where(n > 0, n, 1.0)
            weights[l], weights[l + 1] = weights[l] / n[:, None], weights[l + 1] * n[None, :]
    weights = {l: balance(w, rows=l + 1 not in frozen and l + 1 < public.nlayers(view),
                          cols=l > 0 and l - 1 not in frozen) for l, w in weights.items()}
    rng = np.random.default_rng(0)
    order = rng.permutation(len(public.x))
    cut = int(round(len(order) * (1 - held_out)))
    tr, held = np.sort(order[:cut]), np.sort(order[cut:])
    if per_class is not None:  # an attacker with only a few labelled images per class
        tr = np.sort(np.concatenate([tr[public.y[tr] == c][:per_class] for c in range(public.classes)]))
    theft = Theft(frozen, step, tr, held)
    if epochs is None:
        epochs = 60 if public.model == "mlp" else 40
    x, y = public.x[tr], public.y[tr]
    epochs = int(epochs * 288 / len(tr)) if 0 < len(tr) < 288 else epochs  # few images: about as many steps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend
    try:
        _train_all(theft, public, weights, frozen, x, y, seeds, epochs)
    finally:
        torch.set_num_threads(threads)
    if len(held):
        theft.own = theft.accuracy(public.x[held], public.y[held])
    return theft


def _train_all(theft: Theft, public: Public, weights, frozen, x, y, seeds: int, epochs: int) -> None:
    for s in range(seeds):
        rand = random_like({l: w.shape for l, w in weights.items()}, s)
        kinds = {"stolen": weights, "random_frozen": rand, "public_only": {}}
        for kind, fw in kinds.items():
            if not frozen and kind != "public_only":
                continue
            m = fit(build_model(public, fw, seed=s), x, y, epochs=epochs, seed=s)
            theft.models.setdefault(kind, []).append(m)
