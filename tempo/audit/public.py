"""What an attacker knows besides what relays received: public knowledge, never keys or truth.

The architecture (which offloaded layer is which), the scheme (the key space), the batch size,
and a public sample of the data distribution (`Public.x`, `Public.y`: images the victim never
trains on; in `tempo audit` runs, the held-out ``val`` part of the split). Grey levels: the
shipped digits take the values k/16, k = 0..16 (`levels`), which is public too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Public:
    model: str  # "mlp" or "cnn" (tempo.models)
    x: np.ndarray  # public images, (N, C, H, W), float
    y: np.ndarray  # their labels
    classes: int = 10
    levels: int = 16  # pixel values are k / levels
    key_space: str = "int:256"  # the scheme's key space (public: the code is)
    batch_size: int = 64
    layers: int | None = None  # the model's offloadable layers (None: as many as the view has)
    patch_rows: bool = False  # convolutions offloaded as the whole batch's patches @ Wᵀ (masking mixed)
    mix: int = 0  # the masking's mixing block g (0: none); public, the preset says it

    def nlayers(self, view) -> int:
        """How many Linear/Conv2d layers the model has (the view may hold fewer: some kept in the enclave)."""
        return self.layers if self.layers is not None else len(view.layers())

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def pixels(self) -> int:
        return int(np.prod(self.image_shape))

    def grid(self) -> np.ndarray:
        """Public images as integer grey levels, (N, pixels)."""
        return np.clip(np.round(self.x.reshape(len(self.x), -1) * self.levels), 0, self.levels).astype(int)

    def histograms(self, smoothing: float = 0.2) -> np.ndarray:
        """Per pixel, the smoothed distribution of grey levels: (pixels, levels + 1)."""
        g = self.grid()
        h = np.stack([np.bincount(g[:, q], minlength=self.levels + 1) for q in range(g.shape[1])]).astype(float)
        h += smoothing
        return h / h.sum(1, keepdims=True)

    @classmethod
    def from_split(cls, split, model: str, key_space: str = "int:256", batch_size: int = 64) -> Public:
        """The attacker's public sample: the split's held-out ``val`` images (the victim never uses them)."""
        if split.val_x is None:
            raise ValueError("the split holds no public sample (hold some training images out: data.hold_out)")
        x = split.val_x.detach().cpu().numpy() if isinstance(split.val_x, torch.Tensor) else np.asarray(split.val_x)
        y = split.val_y.detach().cpu().numpy() if isinstance(split.val_y, torch.Tensor) else np.asarray(split.val_y)
        return cls(model, x.astype(np.float64), y.astype(np.int64), split.classes, 16, key_space, batch_size)
