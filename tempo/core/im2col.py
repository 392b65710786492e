"""im2col for any dtype: a convolution's patch rows, their adjoint (col2im), and the products
with patch rows that never build them (pure functions).

A convolution's geometry is ``conv = (kh, kw, dh, dw, ph, pw, sh, sw)``: kernel, dilation,
symmetric zero padding, stride (what goes on the wire as a list). Patch rows are
``(batch·positions × in·kh·kw)``, rows image-major then row-major over output positions,
columns channel-major ``(c, ki, kj)`` as ``F.unfold`` orders them. Every function here is
linear and exact in any dtype, int64 ring elements included (sums wrap), which is what lets the
shares mode's pools unfold and fold their own shares (`tempo.core.shares`) and the enclave
check products with patch rows in one pass over the image (`rows_left`, `windows_left`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Conv = tuple[int, int, int, int, int, int, int, int]


def check_conv(conv) -> Conv:
    """`conv` as a tuple of eight ints, or ValueError (it may come off the wire)."""
    if (not isinstance(conv, (list, tuple)) or len(conv) != 8
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in conv)):
        raise ValueError("a convolution's geometry is eight ints (kh, kw, dh, dw, ph, pw, sh, sw)")
    kh, kw, dh, dw, ph, pw, sh, sw = conv
    if min(kh, kw, dh, dw, sh, sw) < 1 or min(ph, pw) < 0 or max(conv) > 1 << 16:
        raise ValueError(f"a convolution's geometry is out of range: {list(conv)}")
    return tuple(conv)


def out_size(h: int, w: int, conv: Conv) -> tuple[int, int]:
    kh, kw, dh, dw, ph, pw, sh, sw = conv
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"a {kh}×{kw} kernel does not fit a {h}×{w} image with this padding and dilation")
    return ho, wo


def rows_shape(x_shape: tuple, conv: Conv) -> tuple[int, int]:
    """The patch rows' shape for an image batch of `x_shape` (n, C, H, W)."""
    n, c, h, w = x_shape
    ho, wo = out_size(h, w, conv)
    return n * ho * wo, c * conv[0] * conv[1]


_KERNEL_DTYPES = {torch.float32: 0, torch.float64: 1, torch.int64: 2}


def _kernel():
    from tempo.core.obfuscation import _kernel as kernel

    return kernel if kernel is not None and hasattr(kernel, "conv_rows") else None


def _kernel_takes(t: torch.Tensor, conv: Conv):
    """The C kernel when it takes `t` (CPU float32, float64 or int64) for this geometry, else None.
    A 1×1 kernel's rows are a permuted copy, which torch does faster (the kernel would read the
    images across channels, H·W apart, for every row)."""
    kernel = _kernel()
    if kernel is None or not t.is_cpu or t.dtype not in _KERNEL_DTYPES or not t.numel() or conv[0] * conv[1] == 1:
        return None
    return kernel


def _by_kernel(kernel, fold: bool, src: torch.Tensor, x_shape: tuple, conv: Conv) -> torch.Tensor:
    """The C kernel's patch rows of images `src` (NCHW), or fold of rows `src`."""
    src = src.contiguous()
    n, c, h, w = x_shape
    ho, wo = out_size(h, w, conv)
    out = torch.zeros(x_shape, dtype=src.dtype) if fold else torch.empty(rows_shape(x_shape, conv), dtype=src.dtype)
    threads = torch.get_num_threads() if src.numel() >= 1 << 16 else 1
    kernel.conv_rows(fold, _KERNEL_DTYPES[src.dtype], out.data_ptr(), src.data_ptr(), n, c, h, w, *conv, ho, wo,
                     threads)
    return out


class _PatchRows(torch.autograd.Function):
    """`patch_rows` by the kernel, differentiable: its backward is the fold (col2im)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, conv: Conv, kernel) -> torch.Tensor:
        ctx.shape, ctx.conv = tuple(x.shape), conv
        return _by_kernel(kernel, False, x, tuple(x.shape), conv)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return fold_rows(grad, ctx.shape, ctx.conv), None, None


def patch_rows(x: torch.Tensor, conv: Conv) -> torch.Tensor:
    """``F.unfold(x, …).transpose(1, 2)`` flattened to (batch·positions × in·kh·kw), any dtype.
    By the C kernel (rows written in order, about 2× torch's composition over ResNet-18's
    convolutions) for CPU float32, float64 and int64 images, differentiable; else windows as
    strided views of the (zero-padded) input and one reshape."""
    kernel = _kernel_takes(x, conv) if x.dim() == 4 else None
    if kernel is None:
        return _patch_rows_torch(x, conv)
    if x.requires_grad and torch.is_grad_enabled():
        return _PatchRows.apply(x, tuple(conv), kernel)
    return _by_kernel(kernel, False, x, tuple(x.shape), conv)


def _patch_rows_torch(x: torch.Tensor, conv: Conv) -> torch.Tensor:
    kh, kw, dh, dw, ph, pw, sh, sw = conv
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    u = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)  # n, C, Ho, Wo, span_h, span_w
    if dh > 1 or dw > 1:
        u = u[..., ::dh, ::dw]
    n, c, ho, wo = u.shape[:4]
    return u.permute(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)


def _window(t: torch.Tensor, ki: int, kj: int, ho: int, wo: int, conv: Conv) -> torch.Tensor:
    """The (…, Ho, Wo) strided view of a padded (…, Hp, Wp) grid that kernel offset (ki, kj)
    reads: its entry (i, j) is the padded input position that output (i, j) multiplies there."""
    _, _, dh, dw, _, _, sh, sw = conv
    return t[..., ki * dh:ki * dh + sh * (ho - 1) + 1:sh, kj * dw:kj * dw + sw * (wo - 1) + 1:sw]


def fold_rows(rows: torch.Tensor, x_shape: tuple, conv: Conv) -> torch.Tensor:
    """The adjoint of `patch_rows` (col2im): each row entry added back at the input position it
    came from; positions in the padding are dropped. (n, C, H, W), in `rows`' dtype."""
    kernel = _kernel_takes(rows, conv)
    if kernel is not None:
        return _by_kernel(kernel, True, rows, tuple(x_shape), conv)
    kh, kw, dh, dw, ph, pw, sh, sw = conv
    n, c, h, w = x_shape
    ho, wo = out_size(h, w, conv)
    grid = torch.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=rows.dtype, device=rows.device)
    r = rows.reshape(n, ho, wo, c, kh, kw).permute(0, 3, 4, 5, 1, 2)  # n, C, kh, kw, Ho, Wo
    for ki in range(kh):
        for kj in range(kw):
            _window(grid, ki, kj, ho, wo, conv).add_(r[:, :, ki, kj])
    return grid[:, :, ph:ph + h, pw:pw + w].contiguous() if ph or pw else grid


def rows_left(s: torch.Tensor, x: torch.Tensor, conv: Conv, matmul=torch.matmul) -> torch.Tensor:
    """``s · patch_rows(x)`` (v × in·kh·kw) for `s` (v × batch·positions), reading `x` once and
    never building the patch rows: each row of `s` is scattered onto the input grid once per
    kernel offset, and one batched product with the images sums it all."""
    kh, kw, dh, dw, ph, pw, sh, sw = conv
    n, c, h, w = x.shape
    ho, wo = out_size(h, w, conv)
    v, kk = s.shape[0], kh * kw
    grid = torch.zeros((n, h + 2 * ph, w + 2 * pw, kk, v), dtype=s.dtype, device=s.device)
    sv = s.view(v, n, ho, wo).permute(1, 2, 3, 0)  # n, Ho, Wo, v
    for ki in range(kh):
        for kj in range(kw):
            _window(grid.movedim((1, 2), (-2, -1)), ki, kj, ho, wo, conv)[:, ki * kw + kj].copy_(sv.movedim(-1, 1))
    inner = grid[:, ph:ph + h, pw:pw + w].reshape(n, h * w, kk * v)  # what falls in the padding meets zeros
    out = matmul(x.reshape(n, c, h * w), inner).sum(0)  # C, kk·v
    return out.view(c, kk, v).permute(2, 0, 1).reshape(v, c * kk)


def windows_left(s: torch.Tensor, x_shape: tuple, conv: Conv) -> torch.Tensor:
    """For `s` (v × n·H·W, one weight per input position), ``S`` (kh·kw·v × batch·positions):
    row (k, i) holds, at each output position, the weight of the input position kernel offset
    k reads there (0 in the padding). Then ``s · fold_rows(Y)`` over the image's positions
    (v × C) is ``Σ_k S_k · Y[:, (c, k)]``: how a folded product is checked without folding."""
    kh, kw, dh, dw, ph, pw, sh, sw = conv
    n, c, h, w = x_shape
    ho, wo = out_size(h, w, conv)
    v = s.shape[0]
    grid = F.pad(s.view(v, n, h, w), (pw, pw, ph, ph))
    out = torch.empty((kh * kw, v, n, ho, wo), dtype=s.dtype, device=s.device)
    for ki in range(kh):
        for kj in range(kw):
            out[ki * kw + kj].copy_(_window(grid, ki, kj, ho, wo, conv))
    return out.view(kh * kw * v, n * ho * wo)
