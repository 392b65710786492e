"""Plain building blocks that models use so their private twins know what to offload.

`Matmul` marks an activation × activation product (attention's ``QKᵀ`` and ``AV``): plain
``a @ b`` in a normal model, offloaded masked in its private twin. `AddTokens` prepends a
learned class token and adds learned position embeddings: additions only, done in the enclave.
"""

from __future__ import annotations

import torch
from torch import nn


class Matmul(nn.Module):
    """``a @ b`` (batched over leading dimensions)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class AddTokens(nn.Module):
    """Prepend a class token to ``(batch, tokens, dim)`` and add position embeddings."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
