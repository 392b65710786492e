"""Models in the package, sized for the data by their arguments.

MLP and a small CNN for fast runs; ResNet-18 and ResNet-50 (CIFAR variants: a 3×3 stem, no
max-pool) and a ViT (patch 4, 8 encoder layers), the models the paper evaluates.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tempo.core.layers import AddTokens, Matmul

MODELS = ("mlp", "cnn", "resnet18", "resnet50", "vit")


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


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(cin, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stem, four stages, global average pool, linear head."""

    def __init__(self, block, depths: list[int], image_shape: tuple[int, ...], classes: int, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(image_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, depth in enumerate(depths):
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(block(cin, width * 2**i, stride))
                cin = width * 2**i * block.expansion
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


def resnet18(image_shape, classes, width: int = 64) -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2], image_shape, classes, width)


def resnet50(image_shape, classes, width: int = 64) -> nn.Module:
    return ResNet(Bottleneck, [3, 4, 6, 3], image_shape, classes, width)


class Attention(nn.Module):
    """Multi-head self-attention; ``QKᵀ`` and ``AV`` go through `Matmul` (offloaded when private)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.scores = Matmul()
        self.mix = Matmul()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.softmax(self.scores(q, k.transpose(-2, -1)) * self.scale)
        out = self.mix(attn, v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer as in the paper: patch 4, 8 encoder layers (sizes are flags)."""

    def __init__(self, image_shape, classes: int, patch: int = 4, dim: int = 128, depth: int = 8, heads: int = 4) -> None:
        super().__init__()
        c, h, w = image_shape
        if h % patch or w % patch:
            raise ValueError(f"image {h}×{w} is not divisible into {patch}×{patch} patches")
        self.patches = nn.Conv2d(c, dim, patch, patch)
        self.flatten = nn.Flatten(2)
        self.tokens = AddTokens((h // patch) * (w // patch), dim)
        self.encoder = nn.Sequential(*[EncoderLayer(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.patches(x)).transpose(1, 2)  # (batch, tokens, dim)
        x = self.encoder(self.tokens(x))
        return self.head(self.norm(x[:, 0]))


def vit(image_shape, classes, dim: int = 128, depth: int = 8, heads: int = 4, patch: int = 4) -> nn.Module:
    return ViT(image_shape, classes, patch, dim, depth, heads)


def build(name: str, image_shape: tuple[int, ...], classes: int, width: int | None = None) -> nn.Module:
    """A packaged model; `width` scales ResNets (base width) and ViT (dim)."""
    if name == "mlp":
        return mlp(image_shape, classes, **({"hidden": width} if width else {}))
    if name == "cnn":
        return small_cnn(image_shape, classes, **({"width": width} if width else {}))
    if name == "resnet18":
        return resnet18(image_shape, classes, width or 64)
    if name == "resnet50":
        return resnet50(image_shape, classes, width or 64)
    if name == "vit":
        patch = 4 if image_shape[-1] % 4 == 0 else 2
        return vit(image_shape, classes, dim=width or 128, patch=patch)
    raise ValueError(f"unknown model {name!r}; one of {MODELS}")


def describe_mismatch(model: nn.Module, state: dict) -> str:
    """What keeps `state` (a state_dict) from loading into `model`, in full: missing and
    unexpected keys, and each shape that differs (empty when it fits)."""
    own = model.state_dict()
    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")

    if missing:
        problems.append(f"missing {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {listed(unexpected)}")
    if shapes:
        problems.append(listed(shapes))
    return "; ".join(problems)


def load_weights(model: nn.Module, state: object, source: str) -> None:
    """Load a state_dict into `model`, or raise `ValueError` saying in one line what does not fit."""
    if not isinstance(state, dict):
        raise ValueError(f"{source} holds no model weights (a {type(state).__name__}, not a state_dict)")
    mismatch = describe_mismatch(model, state)
    if mismatch:
        raise ValueError(f"{source} does not fit this model ({type(model).__name__}): {mismatch}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:  # e.g. a value that is not a tensor
        raise ValueError(f"{source} does not fit this model: {' '.join(str(exc).split())}") from None
