"""Private layers: every matrix product offloaded masked, everything else in the enclave.

`OffloadedMatmul` is the one autograd function. Forward: the engine masks ``A`` and ``B``,
has them multiplied elsewhere, then decrypts and verifies ``C``. Backward: only ``Δᵀ`` is
masked, since the relay kept ``A'`` and ``B'`` (paper Fig. 5), and both gradients come back
decrypted and verified. `PrivateLinear` and `PrivateConv2d` (im2col: weights ``out × (in·kh·kw)``
times patches ``(in·kh·kw) × positions``; with groups, one product batched over the groups; any
padding and padding mode, applied in the enclave) use it. `to_private` turns a user's module
into its private twin, sharing its parameters, so the trained weights load back into the
original; what it cannot convert it refuses by the layer's path in the model.

Engines: `ClientEngine` sends the work to the off-loader and relays (real processes);
`InProcessEngine` performs the relay's multiplication in this process, for tests and
single-process runs. Both mask, unmask and verify the same way.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tempo.core import im2col, partition
from tempo.enclave import protection
from tempo.enclave.protection import KEEP_CHOICES
from tempo.core.keys import KeySchedule
from tempo.core.roundtrip import MaskedProduct
from tempo.core.layers import AddTokens, Matmul
from tempo.core.products import relay_backward, relay_forward
from tempo.protocol import Binding


# Which operand of a product is a layer's weight, and how to read it now: ("a" | "b", callable).
# Engines may mask it ahead of time (the pipeline's look-ahead); it never changes the result.
Weight = tuple


@dataclass
class EngineCounters:
    """Per run: products offloaded and matrices encrypted, by pass."""

    forward_products: int = 0
    backward_products: int = 0
    forward_encryptions: int = 0  # matrices masked in forward passes (2 per product)
    backward_encryptions: int = 0  # matrices masked in backward passes (1 per product: Δᵀ)


class InProcessEngine:
    """Mask, multiply the masked operands here exactly as a relay would, unmask, verify: the
    one masked round trip (`tempo.core.roundtrip`) without processes.

    `observer`, when given, is called with what a relay would receive for each product,
    ``observer("forward", bind, (A', B'), product)`` and ``observer("backward", bind, (D'ᵀ,),
    product)``, where `product` is the enclave's `MaskedProduct` (its plaintext, for scoring
    attacks only: `tempo audit`)."""

    def __init__(self, rounds: int = 16, keys: KeySchedule | None = None, observer=None) -> None:
        self.rounds = rounds
        self.keys = keys or protection.default().keys()
        self.observer = observer
        self.counters = EngineCounters()
        self._cache: dict[Binding, tuple[MaskedProduct, torch.Tensor, torch.Tensor]] = {}

    def forward(self, a: torch.Tensor, b: torch.Tensor, bind: Binding, weight: Weight | None = None) -> torch.Tensor:
        m, n, p = a.shape[-2], a.shape[-1], b.shape[-1]
        product = MaskedProduct(self.keys.key(bind.layer, m, n, p), a, b, where=f"layer {bind.layer}")
        a_enc, b_enc = product.mask_a(), product.mask_b()
        self.counters.forward_encryptions += 2
        self.counters.forward_products += 1
        if self.observer is not None:
            self.observer("forward", bind, (a_enc, b_enc), product)
        c = product.unmask_c(relay_forward(a_enc, b_enc))
        product.verify_c(c, self.rounds, (a_enc, b_enc)).raise_if_failed()
        self._cache[bind] = (product, a_enc, b_enc)
        return c

    def backward(self, grad_c: torch.Tensor, bind: Binding) -> tuple[torch.Tensor, torch.Tensor]:
        product, a_enc, b_enc = self._cache.pop(bind)
        e = product.mask_grad(grad_c)  # D'ᵀ
        self.counters.backward_encryptions += 1
        self.counters.backward_products += 1
        if self.observer is not None:
            self.observer("backward", bind, (e,), product)
        da, db = product.unmask_grads(*relay_backward(a_enc, b_enc, e))
        product.verify_grads(da, db, self.rounds, (a_enc, b_enc, e)).raise_if_failed()
        return da, db

    def release(self, bind: Binding) -> None:
        self._cache.pop(bind, None)

    def end_step(self) -> None:
        """Nothing is masked ahead here."""

    def close(self) -> None:
        self._cache.clear()


class ClientEngine:
    """Offload through a running off-loader and relays (`OffloadClient`).

    Each product is cut into up to `parts` parts (`tempo.core.partition`: convolutions and
    attention by batch, fully connected layers by output features), each under its own key.
    Products smaller than `split_min_mb` (operands and result) stay whole. With `pipeline` on,
    every part of a product is masked and sent before the first is awaited,
    so the relays compute part i while the enclave masks part i+1, and part i is unmasked and
    verified while part i+1 is still in flight (forward and backward alike), and the next
    layer's weights are masked and shipped to a relay while this layer is computed. With it off, each
    part makes the whole round trip before the next is masked: the comparison point.
    """

    def __init__(self, client, parts: int = 1, pipeline: bool = True, split_min_mb: float = 4.0,
                 stage: bool = True) -> None:
        self.client = client
        self.stage = stage  # ship weights masked ahead to a relay before their product
        self.parts = parts
        self.split_min_bytes = split_min_mb * (1 << 20)
        self.pipeline = pipeline
        self.offload_s = 0.0  # wall time inside forward/backward (the enclave's offload path)
        self.gather_s = 0.0  # of which: cutting products into parts and joining the results
        self._plans: dict[Binding, tuple] = {}  # bind -> (plan, A shape, B shape) until backward
        self._trace: dict[int, tuple] = {}  # layer -> (weight, A shape, B shape), from the last pass
        self._prefetched: dict[int, tuple] = {}  # layer -> weights masked ahead, per part
        self.prefetch_used = 0  # products whose weights were masked while the previous one ran

    @property
    def counters(self) -> EngineCounters:
        """The client's own counts, taken where products are submitted and matrices masked."""
        c = self.client.counters
        return EngineCounters(c.forward, c.backward, c.forward_encryptions, c.backward_encryptions)

    def _plan(self, a_shape, b_shape, itemsize: int) -> partition.Plan:
        """Split only products whose operands and result add up to `split_min_mb`: below that a
        part's fixed costs (a round trip, a key, a verification) outweigh what it saves."""
        batch = torch.broadcast_shapes(a_shape[:-2], b_shape[:-2])
        m, p = a_shape[-2], b_shape[-1]
        rows = math.prod(batch)
        nbytes = itemsize * (math.prod(a_shape) + math.prod(b_shape) + rows * m * p)
        return partition.plan(a_shape, b_shape, self.parts if nbytes >= self.split_min_bytes else 1)

    @staticmethod
    def _part_bind(bind: Binding, i: int) -> Binding:
        return Binding(bind.job, bind.step, bind.layer, i)

    def forward(self, a: torch.Tensor, b: torch.Tensor, bind: Binding, weight: Weight | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        plan = self._plan(a.shape, b.shape, a.element_size())
        pieces = partition.split(a, b, plan)
        self.gather_s += time.perf_counter() - t0
        client = self.client
        pres = self._take_prefetched(bind.layer, a, b, weight)
        if weight is not None:
            self._trace[bind.layer] = (weight, tuple(a.shape), tuple(b.shape))
        if self.pipeline:
            pending = [client.submit_forward(ai, bi, self._part_bind(bind, i), pre=pres[i] if pres else None)
                       for i, (ai, bi) in enumerate(pieces)]
            # while the relays compute this product, mask the next layer's weights and ship them
            self._prefetch(Binding(bind.job, bind.step, bind.layer + 1, 0))
            cs = [client.finish_forward(p) for p in pending]
        else:
            cs = [client.forward(ai, bi, self._part_bind(bind, i)) for i, (ai, bi) in enumerate(pieces)]
        self._plans[bind] = (plan, tuple(a.shape), tuple(b.shape))
        t1 = time.perf_counter()
        c = partition.gather_c(cs, plan)
        t2 = time.perf_counter()
        self.gather_s += t2 - t1
        self.offload_s += t2 - t0
        return c

    # -- the look-ahead: weights of layer l+1 masked while layer l is computed --
    def _prefetch(self, bind: Binding) -> None:
        """Mask the weight operand of `bind`'s layer now (and have it shipped), if the last pass
        showed which operand it is and its shapes."""
        layer = bind.layer
        traced = self._trace.get(layer)
        if traced is None or layer in self._prefetched:
            return
        (side, operand), a_shape, b_shape = traced
        w = operand()
        meta_a, meta_b = torch.empty(a_shape, device="meta"), torch.empty(b_shape, device="meta")
        plan = self._plan(a_shape, b_shape, w.element_size())
        shapes = partition.split(meta_a, meta_b, plan)
        weights = partition.split(w if side == "a" else meta_a, w if side == "b" else meta_b, plan)
        pres = []
        for i, ((ma, mb), (wa, wb)) in enumerate(zip(shapes, weights)):
            pres.append(self.client.premask(self._part_bind(bind, i), side, wa if side == "a" else wb,
                                            (ma.shape[-2], ma.shape[-1], mb.shape[-1]), stage=self.stage))
        self._prefetched[layer] = (a_shape, b_shape, side, w._version, pres)

    def _take_prefetched(self, layer: int, a: torch.Tensor, b: torch.Tensor, weight: Weight | None):
        entry = self._prefetched.pop(layer, None)
        if entry is None:
            return None
        a_shape, b_shape, side, version, pres = entry
        fits = (weight is not None and weight[0] == side and (a_shape, b_shape) == (tuple(a.shape), tuple(b.shape))
                and weight[1]()._version == version)
        if fits:
            self.prefetch_used += 1
            return pres
        self._drop(pres)  # the batch shape changed (last batch, evaluation), or the weights did
        return None

    def _drop(self, pres) -> None:
        for pre in pres:
            self.client.drop_premasked(pre)  # counted there

    def end_step(self) -> None:
        for *_, pres in self._prefetched.values():
            self._drop(pres)
        self._prefetched.clear()

    def backward(self, grad_c: torch.Tensor, bind: Binding) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        plan, a_shape, b_shape = self._plans.pop(bind)
        grads = partition.split_grad(grad_c, plan)
        client = self.client
        if self.pipeline:
            pending = [client.submit_backward(g, self._part_bind(bind, i)) for i, g in enumerate(grads)]
            out = [client.finish_backward(p) for p in pending]
        else:
            out = [client.backward(g, self._part_bind(bind, i)) for i, g in enumerate(grads)]
        t1 = time.perf_counter()
        da, db = partition.gather_grads(out, plan, a_shape, b_shape)
        t2 = time.perf_counter()
        self.gather_s += t2 - t1
        self.offload_s += t2 - t0
        return da, db

    def release(self, bind: Binding) -> None:
        entry = self._plans.pop(bind, None)
        for i in range(entry[0].parts if entry else 1):
            self.client.release(self._part_bind(bind, i))

    def close(self) -> None:
        self.client.close()


@dataclass
class PrivateContext:
    """Hands out bindings (job, step, layer, part) and tracks what awaits a backward pass."""

    engine: object
    job: str = "train"
    # Convolutions as ``patches (batch·positions × in·kh·kw) @ Wᵀ``: one row key over the whole
    # batch's patches, so the relay cannot tell which patch is whose image (masking `mixed`);
    # else ``W @ patches`` batched over the images, one key shared by all of them (the paper's).
    patch_rows: bool = field(default_factory=lambda: protection.default().patch_rows)
    # the AsymML mode (`tempo.enclave.asymml.AsymmlState`): layers split their inputs into a
    # low-rank part computed here and a noisy residual offloaded unmasked; None: masking or shares
    asymml: object | None = None
    step: int = 0
    _layer: int = 0
    _open: set = field(default_factory=set)

    def next_bind(self) -> Binding:
        bind = Binding(self.job, self.step, self._layer, 0)
        self._layer += 1
        return bind

    def end_step(self) -> None:
        """Release products whose backward never came (eval, or a discarded graph); next step."""
        for bind in list(self._open):
            self.engine.release(bind)
        self._open.clear()
        self.engine.end_step()
        self.step += 1
        self._layer = 0


class OffloadedMatmul(torch.autograd.Function):
    """``A @ B`` computed by the engine, forward and backward (one encryption of ``Δᵀ`` back).
    With `conv` (an engine that unfolds the images itself, `conv_forward`: the shares mode),
    ``A`` is a convolution's images and the product ``patch_rows(A) @ B``; ``dL/dA`` comes
    back folded, in the images' shape."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, pctx: PrivateContext, track: bool,
                weight: Weight | None = None, conv: tuple | None = None) -> torch.Tensor:
        bind = pctx.next_bind()
        a_, b_ = a.detach(), b.detach()  # views are fine: masking reads strided rows
        c = (pctx.engine.conv_forward(a_, b_, conv, bind) if conv is not None
             else pctx.engine.forward(a_, b_, bind, weight=weight))
        ctx.bind, ctx.pctx = bind, pctx
        if track:  # a backward can come: keep the operands (here and on the relay) until then
            pctx._open.add(bind)
        else:
            pctx.engine.release(bind)
        return c

    @staticmethod
    def backward(ctx, grad_c: torch.Tensor):
        ctx.pctx._open.discard(ctx.bind)
        # engines return each gradient in its operand's shape (relays sum broadcast slices)
        da, db = ctx.pctx.engine.backward(grad_c.contiguous(), ctx.bind)
        return da, db, None, None, None, None


def private_matmul(a: torch.Tensor, b: torch.Tensor, pctx: PrivateContext, weight: Weight | None = None,
                   conv: tuple | None = None) -> torch.Tensor:
    """``A @ B`` offloaded; differentiable. (Grad mode is always off inside a Function's
    forward, so whether a backward can come is decided here.) `weight` says which operand is a
    layer's weight (see `Weight`); `conv`, that ``A`` is a convolution's images for an engine
    that unfolds them itself (`OffloadedMatmul`)."""
    track = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    return OffloadedMatmul.apply(a, b, pctx, track, weight, conv)


class PrivateLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``x Wᵀ`` offloaded: ``A = x`` (batch × in), ``B = Wᵀ`` (in × out)."""

    def __init__(self, linear: nn.Linear, pctx: PrivateContext) -> None:
        super().__init__()
        self.weight = linear.weight  # shared: the trained weights are the original module's
        self.bias = linear.bias
        self.pctx = pctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = private_matmul(x.reshape(-1, x.shape[-1]), self.weight.t(), self.pctx,
                           weight=("b", lambda: self.weight.detach().t()))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, -1)


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def conv_padding(padding, kernel_size: tuple, dilation: tuple) -> tuple[tuple[int, int], ...]:
    """``((before, after), …)`` per spatial axis, as torch's convolutions pad: numeric padding on
    both sides, ``"valid"`` none, ``"same"`` ``dilation·(k−1)`` in all, the odd one after (right,
    bottom), as ``nn.Conv2d`` (``_reversed_padding_repeated_twice``) and ``F.conv2d`` place it."""
    if padding == "valid":
        return tuple((0, 0) for _ in kernel_size)
    if padding == "same":
        out = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    if isinstance(padding, str):
        raise UnsupportedLayerError(f"padding={padding!r} (supported: a number, a pair, 'same', 'valid')")
    if isinstance(padding, int):
        padding = (padding,) * len(kernel_size)
    return tuple((int(q), int(q)) for q in padding)


class PrivateConv2d(nn.Module):
    """Conv2d as ``W (out × in·kh·kw) @ patches (batch × in·kh·kw × positions)`` (im2col).

    Padding, unfolding and folding back (col2im, in autograd's backward of unfold) happen in the
    enclave. Symmetric zero padding is unfold's own; any other (``padding="same"`` with an even
    extent, ``reflect``, ``replicate``, ``circular``) is ``F.pad`` first, as ``nn.Conv2d`` does it.

    ``groups = g > 1`` (grouped, depthwise) is one batched product:
    ``W (g × out/g × in/g·kh·kw) @ patches (batch × g × in/g·kh·kw × positions)``, the weight
    broadcast over the batch (partitioned by data like any convolution; relays sum its gradient
    over the batch). Its key is shared by all slices, groups included, as attention's heads share
    theirs: a relay sees the ratio of two groups' weights at the same (masked) position.
    """

    def __init__(self, conv: nn.Conv2d, pctx: PrivateContext) -> None:
        super().__init__()
        if conv.padding_mode not in PADDING_MODES:
            raise UnsupportedLayerError(
                f"padding_mode={conv.padding_mode!r} (supported: {', '.join(PADDING_MODES)})")
        if conv.padding == "same" and tuple(conv.stride) != (1, 1):  # torch refuses it too
            raise UnsupportedLayerError(f"padding='same' with stride {tuple(conv.stride)} (only stride 1)")
        (top, bottom), (left, right) = conv_padding(conv.padding, conv.kernel_size, conv.dilation)
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.dilation, self.groups = tuple(conv.stride), tuple(conv.dilation), conv.groups
        self.padding_mode = conv.padding_mode
        symmetric_zeros = conv.padding_mode == "zeros" and top == bottom and left == right
        if symmetric_zeros or top == bottom == left == right == 0:
            self.unfold_padding, self.pad = (top, left), None  # unfold pads with zeros itself (or none)
        else:
            self.unfold_padding, self.pad = (0, 0), (left, right, top, bottom)  # F.pad's order
        self.pctx = pctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, unbatched = self._input(x)
        return self._output(self._offload(x), x, unbatched)

    def _input(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The batched input, checked, padded unless unfold pads it (and whether it was unbatched)."""
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        out_ch, cin_g, kh, kw = self.weight.shape
        g = self.groups
        if x.dim() != 4 or x.shape[1] != cin_g * g:
            raise RuntimeError(f"Conv2d with weight {tuple(self.weight.shape)} and groups={g} expects "
                               f"(batch,) {cin_g * g} × H × W input; got {tuple(x.shape)}")
        if self.pad is not None:
            x = F.pad(x, self.pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        im2col.out_size(x.shape[2], x.shape[3], self._geometry(x))  # the kernel fits: checked before anything leaves
        return x, unbatched

    def _geometry(self, x: torch.Tensor) -> tuple:
        """unfold's (kh, kw, dilation, padding, stride) for this layer."""
        kh, kw = self.weight.shape[-2:]
        return (kh, kw, *self.dilation, *self.unfold_padding, *self.stride)

    def _output(self, y: torch.Tensor, x: torch.Tensor, unbatched: bool) -> torch.Tensor:
        """(n, out, positions) to the layer's output, with the bias."""
        n, out_ch = x.shape[0], self.weight.shape[0]
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1)
        y = y.reshape(n, out_ch, *im2col.out_size(x.shape[2], x.shape[3], self._geometry(x)))
        return y.squeeze(0) if unbatched else y

    def _offload(self, x: torch.Tensor) -> torch.Tensor:
        """The product of the (padded) input and the weights, offloaded: (n, out, positions)."""
        out_ch, cin_g, kh, kw = self.weight.shape
        g = self.groups
        n = x.shape[0]
        conv = self._geometry(x)
        engine_unfolds = hasattr(self.pctx.engine, "conv_forward")  # the shares mode's pools unfold
        if g == 1 and (engine_unfolds or self.pctx.patch_rows):
            if engine_unfolds:  # (n·L, out) from the images
                y = private_matmul(x, self.weight.reshape(out_ch, -1).t(), self.pctx, conv=conv)
            else:  # patch rows (n·L, in·kh·kw) @ Wᵀ
                y = private_matmul(im2col.patch_rows(x, conv), self.weight.reshape(out_ch, -1).t(), self.pctx,
                                   weight=("b", lambda: self.weight.detach().reshape(out_ch, -1).t()))
            return y.view(n, -1, out_ch).transpose(1, 2)  # (n, out, L)
        if g == 1:
            return private_matmul(self.weight.reshape(out_ch, -1), self._patches(x), self.pctx,  # (n, out, L)
                                  weight=("a", lambda: self.weight.detach().reshape(out_ch, -1)))
        patches = self._patches(x)
        # unfold orders rows channel-major (c, ki, kj): group j's rows are one contiguous block
        y = private_matmul(self.weight.reshape(g, out_ch // g, -1),  # (n, g, out/g, L)
                           patches.view(n, g, cin_g * kh * kw, -1), self.pctx,
                           weight=("a", lambda: self.weight.detach().reshape(g, out_ch // g, -1)))
        return y.reshape(n, out_ch, -1)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """im2col: (batch × in·kh·kw × positions)."""
        return F.unfold(x, tuple(self.weight.shape[-2:]), dilation=self.dilation, padding=self.unfold_padding,
                        stride=self.stride)


class PrivateMatmul(nn.Module):
    """An activation × activation product (attention's ``QKᵀ`` and ``AV``), offloaded.

    Keys are shared by all batch·head slices of one product (fresh for every product).
    """

    def __init__(self, module: Matmul, pctx: PrivateContext) -> None:
        super().__init__()
        self.pctx = pctx

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return private_matmul(a, b, self.pctx)


class UnsupportedLayerError(TypeError):
    """A module that has no private version: it names the layer and what is supported."""


OFFLOADED = {nn.Linear: PrivateLinear, nn.Conv2d: PrivateConv2d, Matmul: PrivateMatmul}
# Layers that run in the enclave in plaintext as they are (no matrix product to offload).
ENCLAVE_LAYERS = (
    nn.ReLU, nn.GELU, nn.Flatten, nn.Dropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.Softmax, nn.LogSoftmax,
    AddTokens,
)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def supported_layers() -> list[str]:
    return sorted(c.__name__ for c in (*OFFLOADED, *ENCLAVE_LAYERS, *CONTAINERS))



def offloaded_products(module: nn.Module) -> int:
    """Products per forward pass: Linear, Conv2d and Matmul modules (L in Theorem V.2)."""
    return sum(isinstance(m, (nn.Linear, nn.Conv2d, Matmul)) for m in module.modules())


def to_private(module: nn.Module, pctx: PrivateContext, keep: tuple[str, ...] | None = None) -> nn.Module:
    """A private twin of `module`: Linear and Conv2d offloaded, the rest unchanged, parameters
    shared with `module` (so ``module.state_dict()`` holds the trained weights).

    `keep` names layers that stay in the enclave, computed there in plaintext, although they
    could be offloaded: ``"first"`` (the first Linear or Conv2d, the one that sees the raw data)
    and ``"last"`` (the last: a classifier head, whose gradient carries the labels). None: what
    the default masking keeps (`tempo.enclave.protection.default`); ``()``: nothing.

    Raises `UnsupportedLayerError` naming the first layer that cannot run privately by its path
    in `module` (``'Net.features.3'``), its type, why, and what is supported.
    """
    if keep is None:
        keep = protection.default().keep
    unknown = set(keep) - set(KEEP_CHOICES)
    if unknown:
        raise ValueError(f"keep takes {', '.join(KEEP_CHOICES)}, not {sorted(unknown)}")
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    kept = set()
    if layers and "first" in keep:
        kept.add(id(layers[0]))
    if layers and "last" in keep:
        kept.add(id(layers[-1]))
    return _convert(module, pctx, type(module).__name__, frozenset(kept))


CONV_HINT = ("of the convolutions only nn.Conv2d itself is offloaded (any padding, padding_mode, stride, "
             "dilation, groups, bias)")


def _refusal(path: str, child: nn.Module, reason: str) -> UnsupportedLayerError:
    hint = f"; {CONV_HINT}" if isinstance(child, nn.modules.conv._ConvNd) else ""
    return UnsupportedLayerError(
        f"layer {path!r} ({type(child).__name__}) {reason}{hint}; supported: {', '.join(supported_layers())}"
    )


def _convert(child: nn.Module, pctx: PrivateContext, path: str, kept: frozenset = frozenset()) -> nn.Module:
    kind = type(child)
    if id(child) in kept:
        return child  # stays in the enclave: computed here, never offloaded
    offloaded = OFFLOADED
    if pctx.asymml is not None:
        from tempo.enclave.asymml import AsymmlConv2d, AsymmlLinear

        if kind is Matmul:
            raise _refusal(path, child, "has no AsymML form (AsymML splits a layer's input from its weights; "
                                        "attention multiplies two activations): use the masking or the shares mode")
        offloaded = {nn.Linear: AsymmlLinear, nn.Conv2d: AsymmlConv2d}
    if kind in offloaded:
        try:
            return offloaded[kind](child, pctx)
        except UnsupportedLayerError as exc:  # the layer's own reason, with where it is
            raise _refusal(path, child, f"is not supported with {exc}") from None
    if isinstance(child, ENCLAVE_LAYERS):
        return child
    own_params = list(child.parameters(recurse=False))
    is_torch_layer = kind.__module__.startswith("torch.")
    if isinstance(child, CONTAINERS) or (not is_torch_layer and (child._modules or not own_params)):
        # a container, or the user's own module: its forward runs here, its children privately.
        # A user module with parameters of its own would use them in plaintext products we
        # cannot see, so it is refused below.
        twin = copy.copy(child)
        twin._modules = {name: _convert(c, pctx, f"{path}.{name}", kept) for name, c in child._modules.items()}
        if own_params and not isinstance(child, CONTAINERS):
            raise _refusal(path, child, "holds parameters of its own outside Linear/Conv2d")
        return twin
    raise _refusal(path, child, "has no private version")
