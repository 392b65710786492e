"""Masking presets: what each product's keys are and which layers never leave the enclave.

Every preset keeps the identity ``mask(X) @ mask(Y) = mask(XY)``, so relays, the wire and the
verification are the same for all; they differ in what a relay can learn (measured by
`tempo audit`) and in what the enclave pays (measured by `tempo bench train`):

- ``paper``: the paper's scheme, (coefficient, permutation) per axis, coefficients in
  ``int:256``, fresh keys for every product.
- ``head``: the paper's scheme with the classifier head (the last Linear/Conv2d) kept in the
  enclave: the gradient that carries the labels never leaves.
- ``edges``: ``head`` and the first layer (the one that sees the raw data) kept in the enclave.
- ``mixed``: ``edges``, and every key mixes blocks of 16 positions with random orthogonal
  matrices: zeros, signs and per-entry ratios of the operands do not survive masking; a
  convolution's patches go as one matrix over the whole batch, rows keyed together, so which
  patch belongs to which image is hidden too.

Options on top of a preset (`Masking.with_options`): the key space, key refresh, mixing block
and the layers kept.
"""

from __future__ import annotations

from dataclasses import dataclass, replace



@dataclass(frozen=True)
class Masking:
    name: str
    key_space: str = "int:256"
    key_refresh: str = "step"  # or "epoch", the paper's reuse of one key per layer for an epoch
    mix: int = 0  # orthogonal mixing blocks on every axis key (0: none)
    keep: tuple[str, ...] = ()  # layers computed in the enclave: "first", "last"
    # convolutions offloaded as one matrix of the whole batch's patches (rows keyed together), so
    # a relay cannot group patches by image (`PrivateContext.patch_rows`)
    patch_rows: bool = False

    def keys(self):
        """The key schedule (`keys.KeySchedule`) this masking draws every product's key from."""
        from tempo.core.keys import KeySchedule, KeySpace

        return KeySchedule(self.key_refresh, KeySpace.parse(self.key_space), mix=self.mix, ahead=True)

    def with_options(self, key_space: str | None = None, key_refresh: str | None = None, mix: int | None = None,
                     keep: tuple[str, ...] | None = None, patch_rows: bool | None = None) -> Masking:
        """This preset with the options that are given (not None) replacing its own."""
        changes = {k: v for k, v in (("key_space", key_space), ("key_refresh", key_refresh), ("mix", mix),
                                     ("keep", keep), ("patch_rows", patch_rows)) if v is not None and v != getattr(self, k)}
        if not changes:
            return self
        masking = replace(self, **changes)
        return replace(masking, name=f"{self.name}+" + ",".join(f"{k}={v}" for k, v in changes.items()))

    def describe(self) -> dict:
        return {"masking": self.name, "key_space": self.key_space, "key_refresh": self.key_refresh, "mix": self.mix,
                "keep": list(self.keep), "patch_rows": self.patch_rows}


PRESETS: dict[str, Masking] = {
    "paper": Masking("paper"),
    "head": Masking("head", keep=("last",)),
    "edges": Masking("edges", keep=("first", "last")),
    "mixed": Masking("mixed", mix=16, keep=("first", "last"), patch_rows=True),
}
# The default: of the presets `tempo audit` measured, the one whose relays were found to learn
# nothing per sample, at about the paper's enclave work (2× on ResNet-18). Aggregates still
# leak (a block's rank counts dead units): README, what a relay learns.
DEFAULT = "mixed"
KEEP_CHOICES = ("first", "last")  # layers that can stay in the enclave (`to_private`'s keep)


# What relays were measured to learn under each preset (`tempo audit`, README: what a relay
# learns), in one line: a masking run says it once, with how to get the shares mode.
LEAKS = {
    "paper": "relays rebuild the training images (99.9% of pixels) and every batch's labels, and steal the MLP",
    "head": "relays rebuild the training images (99.9% of pixels); labels stay in the enclave",
    "edges": "relays read digits from the CNN's hidden maps (89%) and group samples by label (71% MLP)",
    "mixed": "nothing per sample was found, with no proof; relays count silent hidden units per block exactly",
}
SHARES_HINT = ("--protection shares: every product secret-shared across three relay pools, provably hiding "
               "data and weights from each pool (README: the shares mode)")


def leak_notice(masking: Masking) -> str:
    """One line: what this masking was measured to leak, and how to get the shares mode."""
    base = masking.name.split("+", 1)[0]
    what = LEAKS.get(base, "not measured")
    extra = " (options changed: not what was measured)" if "+" in masking.name else ""
    return f"masking {masking.name}{extra}: {what}; for a proof, {SHARES_HINT}"


def default() -> Masking:
    """The default masking, of `tempo train` and of the library (`to_private`, the engines)."""
    return PRESETS[DEFAULT]


def preset(name: str) -> Masking:
    """The preset `name`, or `ValueError` listing them."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown masking {name!r}; one of {', '.join(PRESETS)}") from None


def parse_keep(text: str | None) -> tuple[str, ...] | None:
    """``"first,last"`` → ``("first", "last")``; ``"none"`` → ``()``; None stays None."""
    if text is None:
        return None
    if text.strip() in ("", "none"):
        return ()
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in KEEP_CHOICES]
    if bad:
        raise ValueError(f"keep takes {', '.join(KEEP_CHOICES)} or none, not {', '.join(bad)}")
    return parts
