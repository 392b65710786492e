"""im2col in any dtype (tempo.core.im2col): patch rows equal to F.unfold's, their fold equal
to F.fold's, and the products with patch rows that never build them, exact in int64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tempo.core import im2col

GEOMETRY = dict(k=st.tuples(st.integers(1, 4), st.integers(1, 4)), d=st.tuples(st.integers(1, 3), st.integers(1, 3)),
                p=st.tuples(st.integers(0, 2), st.integers(0, 2)), s=st.tuples(st.integers(1, 3), st.integers(1, 3)))


def _fits(k, d, p, size=(9, 10)) -> bool:
    return all((ki - 1) * di + 1 <= n + 2 * pi for ki, di, pi, n in zip(k, d, p, size))


@settings(max_examples=60, deadline=None)
@given(**GEOMETRY)
def test_patch_rows_and_their_fold_are_unfold_and_fold_and_the_checks_products_are_exact(k, d, p, s):
    if not _fits(k, d, p):
        return  # the kernel does not fit
    conv = (*k, *d, *p, *s)
    g = torch.Generator().manual_seed(sum(conv))
    x = torch.randn(2, 3, 9, 10, generator=g)
    want = F.unfold(x, k, dilation=d, padding=p, stride=s)
    rows = im2col.patch_rows(x, conv)
    assert torch.equal(rows, want.transpose(1, 2).reshape(-1, want.shape[1]))
    assert rows.shape == im2col.rows_shape(tuple(x.shape), conv)
    assert torch.equal(im2col._patch_rows_torch(x, conv), rows)  # the kernel's and torch's paths agree
    xg = x.clone().requires_grad_()
    g_rows = torch.randn(rows.shape, generator=g, dtype=torch.float64).float()
    im2col.patch_rows(xg, conv).backward(g_rows)  # differentiable: the backward is the fold
    assert torch.allclose(xg.grad, F.fold(g_rows.view(2, -1, rows.shape[1]).transpose(1, 2), (9, 10), k, dilation=d,
                                          padding=p, stride=s), atol=1e-5)
    # in the ring: int64 with wrapping sums, as the shares mode's pools and checks use them
    xi = torch.randint(-2**62, 2**62, x.shape, generator=g)
    ri = im2col.patch_rows(xi, conv)
    y = torch.randint(-2**62, 2**62, ri.shape, generator=g)
    folded = im2col.fold_rows(y, tuple(x.shape), conv)
    yf = torch.randint(-1000, 1000, ri.shape, generator=g)
    assert torch.equal(im2col.fold_rows(yf, tuple(x.shape), conv).double(),
                       F.fold(yf.double().view(2, -1, ri.shape[1]).transpose(1, 2), (9, 10), k, dilation=d,
                              padding=p, stride=s))
    sv = torch.randint(-2**62, 2**62, (3, ri.shape[0]), generator=g)
    assert torch.equal(im2col.rows_left(sv, xi, conv), sv @ ri)
    si = torch.randint(-2**62, 2**62, (2, 2 * 9 * 10), generator=g)
    windows = im2col.windows_left(si, tuple(x.shape), conv).view(k[0] * k[1], 2, -1)
    lhs = torch.einsum("vnp,ncp->vc", si.view(2, 2, 90), folded.reshape(2, 3, 90))
    rhs = torch.einsum("kvm,mck->vc", windows, y.view(-1, 3, k[0] * k[1]))
    assert torch.equal(lhs, rhs)


def test_bad_geometries_are_refused():
    for conv in [(3, 3, 1, 1, 1, 1, 1), (3, 3, 0, 1, 1, 1, 1, 1), (3, 3, 1, 1, -1, 1, 1, 1), "x" * 8,
                 (3.0, 3, 1, 1, 1, 1, 1, 1), (True, 3, 1, 1, 1, 1, 1, 1)]:
        with pytest.raises(ValueError):
            im2col.check_conv(conv)
    with pytest.raises(ValueError, match="does not fit"):
        im2col.out_size(2, 2, (5, 5, 1, 1, 0, 0, 1, 1))
