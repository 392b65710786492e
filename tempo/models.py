"""Models in the package, sized for the data by their arguments (more land with issue 4)."""

from __future__ import annotations

import math

from torch import nn

MODELS = ("mlp", "cnn")


def mlp(image_shape: tuple[int, ...], classes: int, hidden: int = 128) -> nn.Module:
    """Two hidden layers of `hidden` units with ReLU."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(image_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def small_cnn(image_shape: tuple[int, ...], classes: int, width: int = 16) -> nn.Module:
    """Two 3×3 convolutions (padding 1) with ReLU, a 2×2 average pool, and a linear classifier."""
    channels, h, w = image_shape
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * (h // 2) * (w // 2), classes),
    )


def build(name: str, image_shape: tuple[int, ...], classes: int) -> nn.Module:
    if name == "mlp":
        return mlp(image_shape, classes)
    if name == "cnn":
        return small_cnn(image_shape, classes)
    raise ValueError(f"unknown model {name!r}; one of {MODELS}")
