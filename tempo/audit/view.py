"""What relays saw of a run (`RunView`), and the enclave's ground truth for scoring (`RunTruth`).

A relay receives, per product part bound to (job, step, layer, part): the masked operands
``A'`` and ``B'`` of its forward (one of them possibly shipped ahead by ``stage``) and, if a
backward follows, the masked ``D'ᵀ`` (``Δ = dL/dC`` in its own layout, …×m×p). `ProductView`
holds exactly that. `step` is the binding's step number as it travels on the wire (the enclave
counts training steps and evaluation batches alike); `RunTruth.steps` says which were which.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
