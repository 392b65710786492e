"""What relays saw of a run (`RunView`), and the enclave's ground truth for scoring (`RunTruth`).

A relay receives, per product part bound to (job, step, layer, part): the masked operands
``A'`` and ``B'`` of its forward (one of them possibly shipped ahead by ``stage``) and, if a
backward follows, the masked ``D'ᵀ`` (``Δ = dL/dC`` in its own layout, …×m×p). `ProductView`
holds exactly that. `step` is the binding's step number as it travels on the wire (the enclave
counts training steps and evaluation batches alike); `RunTruth.steps` says which were which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class ProductView:
    """One offloaded product part as a relay received it."""

    step: int
    layer: int
    part: int
    a: torch.Tensor  # A' (…×m×n)
    b: torch.Tensor  # B' (…×n×p)
    e: torch.Tensor | None = None  # D'ᵀ (…×m×p), when a backward came
    relay: str = ""

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.step, self.layer, self.part)


@dataclass
class RunView:
    """Every product part the relays received in one run, in the order sent."""

    products: list[ProductView] = field(default_factory=list)

    def steps(self) -> list[int]:
        return sorted({p.step for p in self.products})

    def at(self, step: int, layer: int) -> list[ProductView]:
        """The parts of one layer's product at one step, by part number."""
        return sorted((p for p in self.products if p.step == step and p.layer == layer), key=lambda p: p.part)

    def layers(self) -> list[int]:
        return sorted({p.layer for p in self.products})


@dataclass
class ProductTruth:
    """The enclave's plaintext for one product part (scoring only)."""

    a: torch.Tensor
    b: torch.Tensor
    grad_c: torch.Tensor | None = None


@dataclass
class StepTruth:
    """One step's data, in the order the enclave fed it (scoring only)."""

    x: torch.Tensor  # images, (batch, C, H, W)
    y: torch.Tensor  # labels
    train: bool  # a training step (forward and backward) or an evaluation batch (forward only)


@dataclass
class RunTruth:
    """What the enclave knows of a run: plaintext products, data per step, the final weights."""

    model: str
    products: dict[tuple[int, int, int], ProductTruth] = field(default_factory=dict)
    steps: dict[int, StepTruth] = field(default_factory=dict)
    final_state: dict = field(default_factory=dict)
    asymml: dict | None = None  # the AsymML mode's statistics (ranks, releases), when that mode ran


def load_recording(root: str | Path, job: str | None = None) -> RunView:
    """The view a recording holds (`tempo relay --record ROOT`, any number of relays): one
    `ProductView` per forward part, with the operand shipped ahead by ``stage`` joined to its
    forward, and the masked ``Δ`` of the backward that followed (from whichever relay computed
    it). `job` keeps one job's products when the recording holds several."""
    from tempo.relay.record import FORMAT

    root = Path(root)
    relays = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not relays:
        raise ValueError(f"{root} holds no relay recording (expected {root}/<relay>/*.pt)")
    products: dict[tuple, ProductView] = {}
    for relay_dir in relays:
        for meta in relay_dir.glob("meta-*.json"):
            if json.loads(meta.read_text()).get("format") != FORMAT:
                raise ValueError(f"{meta}: a recording format this version does not read")
        staged: dict[tuple, tuple[str, torch.Tensor]] = {}
        for path in sorted(relay_dir.glob("*.pt")):
            rec = torch.load(path, weights_only=True)
            bind = tuple(rec["bind"])
            if job is not None and bind[0] != job:
                continue
            key, tensors = bind[1:], rec["tensors"]
            if rec["op"] == "stage":
                staged[key] = (rec["slot"], tensors[0])
            elif rec["op"] == "forward":
                if rec["staged"] is not None:  # one operand came ahead
                    slot, held = staged.pop(key)
                    a, b = (held, tensors[0]) if slot == "a" else (tensors[0], held)
                else:
                    a, b = tensors
                products[key] = ProductView(*key, a=a, b=b, relay=relay_dir.name)
            elif rec["op"] in ("backward", "backward_full"):
                e = tensors[-1]
                if key in products:
                    products[key].e = e
                elif rec["op"] == "backward_full":  # its forward's relay is gone: the operands came again
                    products[key] = ProductView(*key, a=tensors[0], b=tensors[1], e=e, relay=relay_dir.name)
    return RunView(sorted(products.values(), key=lambda p: p.key))


# -- the shares mode: what a pool, or pools that collude, hold --

def shares_records(root: str | Path, job: str | None = None) -> list[dict]:
    """The requests pool members recorded (`tempo relay --pool … --record ROOT`), opened: one
    dict per request (``bind``, ``pool``, ``part`` forward or backward, ``request`` header,
    ``tensors``), each forward request once though a backward carries it again."""
    root = Path(root)
    seen, out = set(), []
    for path in sorted(root.glob("*/*.pt")):
        rec = torch.load(path, weights_only=False)
        if rec.get("op") != "sealed" or (job is not None and rec["bind"][0] != job):
            continue
        key = (tuple(rec["bind"]), rec["pool"], rec["part"])
        if key not in seen:
            seen.add(key)
            out.append(rec)
    return out


def paper_layout(x, w, conv, padding_uniform: bool = False) -> tuple:
    """A convolution's product as the shares mode sends it (images `x`, ``W`` as C·kh·kw × out)
    in the paper's layout, the one the CNN attacks read: ``(W`` (out × C·kh·kw), each image's
    patches (n × C·kh·kw × positions)``)``. With `padding_uniform` the padded positions are
    uniform ring values (a pool's own view: it never receives the padding, a public geometry, and
    the opened patch rows would show it uniform), else zeros (the plaintext)."""
    from tempo.core import im2col
    from tempo.core.shares import Randomness

    kh, kw, dh, dw, ph, pw, sh, sw = im2col.check_conv(conv)
    n, c, h, wd = x.shape
    if padding_uniform:
        padded = Randomness().uniform((n, c, h + 2 * ph, wd + 2 * pw)).to(x.dtype)
        padded[:, :, ph:ph + h, pw:pw + wd] = x
        x, conv = padded, (kh, kw, dh, dw, 0, 0, sh, sw)
    return w.t(), im2col.patch_rows(x, conv).view(n, -1, w.shape[0]).transpose(1, 2)


def paper_grads(g, images: int):
    """``Δ`` of a convolution as patch rows × out, in the paper's layout (n × out × positions)."""
    return g.view(images, -1, g.shape[-1]).transpose(1, 2)


def pools_view(records: list[dict], pools: tuple[str, ...], roles: dict[str, int]) -> tuple[RunView, str]:
    """The view `pools` hold together, as products an attack reads (int64 ring elements as
    float64): a pool of role 1 or 2 alone holds ``E, F`` and ``G`` (uniform: its `ProductView`
    is those); pool 3 alone holds only seeds (no tensor to attack: an empty view). Pools that
    together hold both seeds of a product and its opened values (any two) rebuild ``A, B`` and
    ``Δ`` up to the enclave's private power-of-two scales, and that is their view. Returns the
    view and what it is, in words."""
    from tempo.core import shares as sh

    mine = [r for r in records if r["pool"] in pools]
    by_key: dict[tuple, dict] = {}
    for rec in mine:
        entry = by_key.setdefault(tuple(rec["bind"][1:]), {"seeds": {}, "forward": None, "backward": None,
                                                           "grad_seeds": {}, "header": None})
        role = roles[rec["pool"]]
        header = rec["request"]
        if rec["part"] == "forward":
            entry["header"] = header
            for i, s in enumerate(header["seeds"]):
                entry["seeds"][role if role != 3 else i + 1] = s
            if rec["tensors"]:
                entry["forward"] = rec["tensors"]
        else:
            for i, s in enumerate(header["seeds"]):
                entry["grad_seeds"][role if role != 3 else i + 1] = s
            if rec["tensors"]:
                entry["backward"] = rec["tensors"][0]
    colluding = len({roles[p] for p in pools}) >= 2
    products = []
    for key, entry in sorted(by_key.items()):
        if entry["forward"] is None:
            continue  # pool 3 alone: seeds only
        e, f = entry["forward"]
        g = entry["backward"]
        if colluding and set(entry["seeds"]) == {1, 2}:
            h = entry["header"]
            (u1, v1), (u2, v2) = (sh._expand(entry["seeds"][i], h["a"], h["b"]) for i in (1, 2))
            e, f = e + u1 + u2, f + v1 + v2
            if g is not None and set(entry["grad_seeds"]) == {1, 2}:
                g = g + sum(sh._expand(entry["grad_seeds"][i], g.shape)[0] for i in (1, 2))
        if "conv" in entry["header"]:
            images = e.shape[0]
            e, f = paper_layout(e, f, entry["header"]["conv"], padding_uniform=not (colluding and set(entry["seeds"]) == {1, 2}))
            g = None if g is None else paper_grads(g, images)
        products.append(ProductView(*key, a=e.double(), b=f.double(), e=None if g is None else g.double(),
                                    relay="+".join(pools)))
    what = ("the plaintext of every product, up to a power of two per operand (a collusion)" if colluding and products
            else "E, F and G: uniform ring elements" if products else "seeds only: no tensor")
    return RunView(products), what
