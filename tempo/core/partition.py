"""Partitioning one product across N relays (paper §IV-D, Algorithm 4; SPEC §5).

Pure functions, no I/O. A product ``C = A @ B`` with ``A`` (…×m×n) and ``B`` (…×n×p) is cut
into parts that are computed independently, each under its own key:

- ``"batch"``: along the first broadcast batch dimension. Convolutions (``W @ patches`` with
  ``patches`` of shape batch×(in·kh·kw)×positions) are split by data, attention's ``QKᵀ`` and
  ``AV`` (batch·heads×T×d) by batch·head slices. An operand without that dimension (the conv
  weight) goes whole to every part, masked under each part's key.
- ``"cols"``: along ``p``, the output features of a fully connected layer (``B = Wᵀ``), the
  paper's split by tensor; ``A`` (the activations) goes whole to every part.
- ``"rows"``: along ``m``, when ``A`` is the larger operand (a convolution laid out as the whole
  batch's patches, ``patches @ Wᵀ``, `PrivateContext.patch_rows`): ``B`` goes whole to every
  part, so each part ships a slice of the big operand instead of all of it.

`split` returns views (no copies: the masking kernel reads row-strided input). `gather_c`
concatenates the parts' results; `gather_grads` concatenates the gradient of a split operand and
sums the gradients of one that every part received.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Plan:
    axis: str  # "none" | "batch" | "cols" | "rows"
    bounds: tuple[tuple[int, int], ...]
    batch_dims: int  # broadcast batch dimensions of the product

    @property
    def parts(self) -> int:
        return len(self.bounds)


def _ranges(size: int, parts: int) -> tuple[tuple[int, int], ...]:
    """``parts`` contiguous ranges covering ``range(size)``, sizes differing by at most one."""
    base, extra = divmod(size, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        out.append((lo, hi))
        lo = hi
    return tuple(out)


def plan(a_shape: torch.Size | tuple, b_shape: torch.Size | tuple, parts: int) -> Plan:
    """How to cut ``A @ B`` into at most `parts` parts (fewer when the split axis is shorter)."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, not {parts}")
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise ValueError("partitioning needs matrices (at least two dimensions)")
    batch = torch.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2]))
    m, p = a_shape[-2], b_shape[-1]
    if parts > 1 and len(batch) and batch[0] >= 2:
        return Plan("batch", _ranges(batch[0], min(parts, batch[0])), len(batch))
    if parts > 1 and not len(batch) and m > 64 * p:  # A far larger than B (patch rows): cut A's rows
        return Plan("rows", _ranges(m, min(parts, m)), 0)
    if parts > 1 and not len(batch) and p >= 2:
        return Plan("cols", _ranges(p, min(parts, p)), 0)
    return Plan("none", ((0, 0),), len(batch))


def _has_lead(shape: tuple, plan: Plan) -> bool:
    """Whether an operand of `shape` carries the split batch dimension itself (not broadcast
    into it): such an operand is cut into slices, any other goes whole to every part."""
    return len(shape) - 2 == plan.batch_dims and shape[0] != 1


def split(a: torch.Tensor, b: torch.Tensor, plan: Plan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if plan.axis == "none":
        return [(a, b)]
    if plan.axis == "batch":
        a_lead, b_lead = _has_lead(a.shape, plan), _has_lead(b.shape, plan)
        return [(a[lo:hi] if a_lead else a, b[lo:hi] if b_lead else b) for lo, hi in plan.bounds]
    if plan.axis == "rows":
        return [(a[lo:hi], b) for lo, hi in plan.bounds]
    return [(a, b[..., lo:hi]) for lo, hi in plan.bounds]


def split_grad(grad_c: torch.Tensor, plan: Plan) -> list[torch.Tensor]:
    """``dL/dC`` cut the way ``C`` was gathered."""
    if plan.axis == "none":
        return [grad_c]
    if plan.axis in ("batch", "rows"):
        return [grad_c[lo:hi] for lo, hi in plan.bounds]
    return [grad_c[..., lo:hi] for lo, hi in plan.bounds]


def gather_c(parts: list[torch.Tensor], plan: Plan) -> torch.Tensor:
    if plan.axis == "none":
        return parts[0]
    return torch.cat(parts, dim=0 if plan.axis in ("batch", "rows") else -1)


def gather_grads(
    parts: list[tuple[torch.Tensor, torch.Tensor]], plan: Plan, a_shape: tuple, b_shape: tuple
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dA, dL/dB)`` from the parts' gradients (each already summed to its part's operand
    shape, as relays return them): a split operand's gradients are concatenated, the gradients
    of an operand every part received whole are summed."""
    if plan.axis == "none":
        return parts[0]
    das, dbs = zip(*parts)
    if plan.axis == "batch":
        da = torch.cat(das, dim=0) if _has_lead(a_shape, plan) else _sum(das)
        return da, torch.cat(dbs, dim=0) if _has_lead(b_shape, plan) else _sum(dbs)
    if plan.axis == "rows":
        return torch.cat(das, dim=0), _sum(dbs)
    return _sum(das), torch.cat(dbs, dim=-1)


def _sum(ts) -> torch.Tensor:
    total = ts[0].clone()
    for t in ts[1:]:
        total += t
    return total
