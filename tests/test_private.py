"""Private layers and conversion: gradient parity with torch autograd, counters, errors."""

import copy
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tempo import models
from tempo.core.verify import IntegrityError
from tempo.enclave.private import (
    InProcessEngine,
    PrivateContext,
    UnsupportedLayerError,
    conv_padding,
    private_matmul,
    to_private,
)


def grads_of(module, x, y):
    for p in module.parameters():
        p.grad = None
    loss = nn.functional.cross_entropy(module(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


def assert_parity(module, x, y, rel=1e-4):
    """One private step's gradients equal autograd's on the same module and batch."""
    reference = copy.deepcopy(module)
    pctx = PrivateContext(InProcessEngine())
    loss_p, got = grads_of(to_private(module, pctx, keep=()), x, y)
    loss_r, want = grads_of(reference, x, y)
    assert torch.allclose(loss_p, loss_r, rtol=rel)
    for name, g in want.items():
        err = float((got[name] - g).abs().max()) / max(float(g.abs().max()), 1e-12)
        assert err <= rel, (name, err)
    pctx.end_step()
    return pctx


def train_privately(net, x, y, opt, steps):
    """A few private training steps in-process: the loss must fall, and nothing stays open."""
    pctx = PrivateContext(InProcessEngine(rounds=8))
    private = to_private(net, pctx, keep=())
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(private(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pctx.end_step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    assert not pctx._open and not pctx.engine._cache


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Linear(12, 7), (5, 12)),
        (nn.Linear(12, 7, bias=False), (5, 12)),
        (nn.Conv2d(3, 4, 3), (2, 3, 6, 6)),
        (nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), (2, 3, 7, 5)),
        (nn.Conv2d(2, 3, (3, 2), dilation=(2, 1), padding=(2, 0)), (3, 2, 9, 8)),
        (nn.Conv2d(2, 3, 1), (4, 2, 5, 5)),
    ],
)
def test_every_private_layer_has_autograd_gradients(layer, shape):
    torch.manual_seed(0)
    net = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(*shape)
    net(x)  # materialise the lazy layer
    assert_parity(net, x, torch.randint(0, 5, (shape[0],)))


CONVS = {  # name -> ((in, out, kernel), other Conv2d arguments, input shape)
    "same, odd kernel": ((3, 4, 3), {"padding": "same"}, (2, 3, 7, 6)),
    "same, even kernel": ((3, 4, 4), {"padding": "same"}, (2, 3, 7, 6)),
    "same, mixed kernel": ((2, 3, (2, 3)), {"padding": "same"}, (2, 2, 6, 5)),
    "same, dilation": ((2, 3, 3), {"dilation": 2, "padding": "same"}, (2, 2, 8, 7)),
    "same, even kernel, dilation": ((2, 3, (2, 4)), {"dilation": (3, 1), "padding": "same"}, (2, 2, 8, 7)),
    "valid": ((3, 4, 3), {"padding": "valid"}, (2, 3, 7, 6)),
    "zeros": ((3, 4, 3), {"padding": (1, 2), "padding_mode": "zeros"}, (2, 3, 6, 6)),
    "reflect": ((3, 4, 3), {"padding": (1, 2), "padding_mode": "reflect"}, (2, 3, 6, 6)),
    "replicate": ((3, 4, 3), {"padding": 2, "padding_mode": "replicate"}, (2, 3, 6, 6)),
    "circular": ((3, 4, 3), {"padding": (2, 1), "padding_mode": "circular"}, (2, 3, 6, 6)),
    "reflect, same, even kernel": ((2, 3, 4), {"padding": "same", "padding_mode": "reflect"}, (2, 2, 7, 6)),
    "circular, stride": ((2, 3, 3), {"padding": 1, "stride": 2, "padding_mode": "circular"}, (2, 2, 7, 6)),
    "groups 2": ((4, 6, 3), {"padding": 1, "groups": 2}, (2, 4, 6, 6)),
    "groups 4": ((8, 8, 3), {"padding": 1, "groups": 4, "bias": False}, (2, 8, 6, 5)),
    "depthwise": ((4, 4, 3), {"padding": 1, "groups": 4}, (3, 4, 6, 6)),
    "depthwise, multiplier 2": ((4, 8, 3), {"padding": 1, "groups": 4}, (3, 4, 6, 6)),
    "grouped, stride, dilation, bias": ((6, 9, (3, 2)), {"stride": (2, 1), "dilation": (1, 2),
                                                         "padding": (1, 0), "groups": 3, "bias": True},
                                        (2, 6, 9, 8)),
    "depthwise, same, even kernel, reflect": ((4, 4, 4), {"padding": "same", "padding_mode": "reflect",
                                                          "groups": 4}, (2, 4, 6, 7)),
    "grouped, valid, replicate": ((4, 4, 2), {"padding": "valid", "padding_mode": "replicate", "groups": 2},
                                  (2, 4, 5, 5)),
}


@pytest.mark.parametrize("name", CONVS)
def test_conv2d_paddings_and_groups_have_autograd_gradients(name):
    args, kwargs, shape = CONVS[name]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(*args, **kwargs), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(*shape)
    net(x)  # materialise the lazy layer
    pctx = assert_parity(net, x, torch.randint(0, 5, (shape[0],)))
    assert pctx.engine.counters.forward_products == 2  # the convolution is one product, groups or not


@st.composite
def conv_configs(draw):
    """A random Conv2d (every padding kind and mode, groups, stride, dilation, bias) and an
    input shape it accepts."""
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.sampled_from(["same", "valid", "int", "pair"]))
    stride = (1, 1) if padding == "same" else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if padding == "int":
        padding = draw(st.integers(0, 2))
    elif padding == "pair":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    kwargs = {"in_channels": cin, "out_channels": cout, "kernel_size": kernel, "stride": stride,
              "padding": padding, "dilation": dilation, "groups": groups, "bias": draw(st.booleans()),
              "padding_mode": mode}
    # big enough for the kernel, and for reflect and circular padding (each side < the size)
    h, w = (draw(st.integers(max(d * (k - 1) + 1 - before - after, max(before, after) + 1, 1), 8))
            for k, d, (before, after) in zip(kernel, dilation, conv_padding(padding, kernel, dilation)))
    return kwargs, (draw(st.integers(1, 3)), cin, h, w)


def _seeded_keys(seed: int):
    """The default masking's keys drawn from a fixed stream instead of the CSPRNG."""
    from tempo.core.keys import KeySchedule, KeySpace
    from tempo.enclave import protection

    m = protection.default()
    return KeySchedule(m.key_refresh, KeySpace.parse(m.key_space), random_bytes=random.Random(seed).randbytes,
                       mix=m.mix)


# derandomized, with keys from a fixed stream: the same 60 examples and keys on every run, so the
# known false alarm below (about 1% of fresh keys on the smallest grouped convolutions) cannot
# make this test flaky; it is reproduced, and tracked, by the strict xfail that follows
@settings(max_examples=60, deadline=None, derandomize=True)
@given(conv_configs())
def test_random_conv2d_configurations_match_torch_in_fp64(config):
    """Output, input gradient and parameter gradients equal torch's Conv2d up to fp64 rounding."""
    kwargs, shape = config
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs).double()
    reference = copy.deepcopy(conv)
    private = to_private(conv, PrivateContext(InProcessEngine(rounds=4, keys=_seeded_keys(0))), keep=())
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = private(x), reference(x_ref)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    for (name, p), p_ref in zip(conv.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.xfail(strict=True, raises=IntegrityError, reason=(
    "known false alarm, about 1% of fresh keys on a 1x1 grouped convolution of one pixel (found by "
    "the test above in CI): the bound follows the relay's error through the masked operands |A'|, "
    "while the enclave's masking rounds relative to |Q||S||A|, larger than |A'| where a block's "
    "terms cancel (here 0.0094 against 0.0038; with |Q||S||A| in the bound this case passes at "
    "0.84x). Computing |Q||S||A| costs one more masking pass per operand"))
def test_the_mixing_bound_holds_on_the_smallest_grouped_convolution():
    """Seed 5 of the default masking's keys: an honest fp64 backward that the bound rejects
    (1.38x). When the bound is fixed this passes, and strict xfail fails: remove the mark."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 3, 1, groups=3, bias=False).double()
    private = to_private(conv, PrivateContext(InProcessEngine(rounds=4, keys=_seeded_keys(5))), keep=())
    x = torch.randn(1, 6, 1, 1, dtype=torch.float64, requires_grad=True)
    y = private(x)
    y.backward(torch.randn_like(y))


@pytest.mark.parametrize("padding, kernel, dilation", [
    ("same", (3, 4), (1, 1)), ("same", (2, 5), (3, 2)), ("same", (4, 1), (2, 1)), ("valid", (3, 3), (1, 1)),
    (2, (3, 3), (1, 1)), ((0, 3), (2, 2), (2, 1)),
])
def test_padding_is_placed_where_torch_places_it(padding, kernel, dilation):
    conv = nn.Conv2d(1, 1, kernel, padding=padding, dilation=dilation, padding_mode="reflect")
    (top, bottom), (left, right) = conv_padding(conv.padding, conv.kernel_size, conv.dilation)
    assert [left, right, top, bottom] == list(conv._reversed_padding_repeated_twice)


def test_unbatched_input_as_torch_accepts_it():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding="same", groups=4, padding_mode="circular")
    private = to_private(conv, PrivateContext(InProcessEngine()), keep=())
    x = torch.randn(4, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(private(x), conv(x), rtol=1e-5, atol=1e-5)


def mobilenet_block(cin=3, width=8, classes=5):
    """Stem, then a MobileNet block: depthwise 3×3 + pointwise 1×1, each with BatchNorm and ReLU;
    a strided depthwise with channel multiplier 2 after it. BatchNorm's affine parameters are
    drawn at random: at their initial (1, 0) a BatchNorm + ReLU before a depthwise convolution
    and its BatchNorm is scale-invariant per channel, and the weight's exact gradient is 0 (fp32
    autograd itself then gets nothing right, relative to the rounding noise it returns)."""
    net = nn.Sequential(
        nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding="same", groups=width, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1, groups=2 * width, bias=False),
        nn.BatchNorm2d(4 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes),
    )
    for m in net:
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return net


def test_a_mobilenet_block_has_autograd_gradients_and_trains():
    torch.manual_seed(5)
    net = mobilenet_block()
    x, y = torch.randn(8, 3, 10, 10), torch.randint(0, 5, (8,))
    assert_parity(net, x, y)
    exact = mobilenet_block().double()
    exact.load_state_dict(net.state_dict())
    reference = copy.deepcopy(exact)
    _, got = grads_of(to_private(exact, PrivateContext(InProcessEngine()), keep=()), x.double(), y)
    _, want = grads_of(reference, x.double(), y)
    assert max(rel_errors(got, want).values()) < 1e-9
    train_privately(net, x, y, torch.optim.Adam(net.parameters(), lr=1e-2), steps=4)


SMALL = {"mlp": None, "cnn": None, "resnet18": 8, "resnet50": 4, "vit": 32}


def rel_errors(got: dict, want: dict) -> dict:
    return {n: float((got[n] - g).abs().max()) / max(float(g.abs().max()), 1e-30) for n, g in want.items()}


@pytest.mark.parametrize("name", models.MODELS)
def test_every_packaged_model_has_exact_gradients_in_fp64(name):
    """The private step computes the same gradients as autograd: exactly, up to fp64 rounding."""
    torch.manual_seed(1)
    shape = (1, 8, 8) if name in ("mlp", "cnn") else (3, 16, 16)
    net = models.build(name, shape, 10, SMALL[name]).double()
    x, y = torch.rand(6, *shape, dtype=torch.float64), torch.randint(0, 10, (6,))
    reference = copy.deepcopy(net)
    _, got = grads_of(to_private(net, PrivateContext(InProcessEngine()), keep=()), x, y)
    _, want = grads_of(reference, x, y)
    assert max(rel_errors(got, want).values()) < 1e-9


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18", "vit"])
def test_packaged_models_have_autograd_gradients_in_fp32(name):
    torch.manual_seed(1)
    shape = (1, 8, 8) if name in ("mlp", "cnn") else (3, 16, 16)
    net = models.build(name, shape, 10, SMALL[name])
    x, y = torch.rand(16 if name in ("mlp", "cnn") else 4, *shape), torch.randint(0, 10, (16,))
    assert_parity(net, x, y[: len(x)])


def test_resnet50_fp32_gradients_are_as_close_as_fp32_itself_allows():
    """Width-4 ResNet-50 with BatchNorm is ill-conditioned: plain fp32 autograd is itself ~1e-4
    from the fp64 gradients. The private step must be no further from fp64 than a few times that."""
    torch.manual_seed(0)
    net = models.build("resnet50", (3, 16, 16), 10, 4)
    exact = copy.deepcopy(net).double()
    plain = copy.deepcopy(net)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    _, g_private = grads_of(to_private(net, PrivateContext(InProcessEngine()), keep=()), x, y)
    _, g_plain = grads_of(plain, x, y)
    _, g_exact = grads_of(exact, x.double(), y)
    g_exact = {k: v.float() for k, v in g_exact.items()}
    private_err = max(rel_errors(g_private, g_exact).values())
    plain_err = max(rel_errors(g_plain, g_exact).values())
    assert private_err <= 5 * plain_err + 1e-5, (private_err, plain_err)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vit"])
def test_big_models_train_privately_on_synthetic_cifar_shaped_data(name):
    from tempo import data

    torch.manual_seed(0)
    split = data.synthetic((3, 32, 32), classes=10, n_train=32, n_test=8)
    net = models.build(name, split.image_shape, 10, SMALL[name])
    train_privately(net, split.train_x[:16], split.train_y[:16], torch.optim.AdamW(net.parameters(), lr=3e-3), steps=6)


def test_one_encryption_per_product_backward_and_weights_never_reencrypted():
    torch.manual_seed(2)
    net = models.build("cnn", (1, 8, 8), 10)
    products = 3  # two convolutions and one linear
    pctx = PrivateContext(InProcessEngine())
    private = to_private(net, pctx, keep=())
    for step in range(3):
        before = pctx.engine.counters.__dict__.copy()
        nn.functional.cross_entropy(private(torch.rand(8, 1, 8, 8)), torch.randint(0, 10, (8,))).backward()
        pctx.end_step()
        c = pctx.engine.counters
        assert c.forward_products - before["forward_products"] == products
        assert c.forward_encryptions - before["forward_encryptions"] == 2 * products  # W and X, once
        assert c.backward_encryptions - before["backward_encryptions"] == products  # Δᵀ only
        assert c.backward_products - before["backward_products"] == products
    assert not pctx._open and not pctx.engine._cache


def test_no_grad_forward_releases_everything():
    pctx = PrivateContext(InProcessEngine())
    private = to_private(models.build("mlp", (1, 8, 8), 10), pctx, keep=())
    with torch.no_grad():
        private(torch.rand(4, 1, 8, 8))
    assert not pctx._open and not pctx.engine._cache


def test_trained_weights_load_into_the_original_module():
    net = models.build("mlp", (1, 8, 8), 10)
    pctx = PrivateContext(InProcessEngine())
    private = to_private(net, pctx, keep=())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    nn.functional.cross_entropy(private(torch.rand(4, 1, 8, 8)), torch.randint(0, 10, (4,))).backward()
    opt.step()
    fresh = models.build("mlp", (1, 8, 8), 10)
    fresh.load_state_dict(net.state_dict())
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fresh(x), private(x), atol=1e-5)
    assert set(private.state_dict()) == set(net.state_dict())


class UserBlock(nn.Module):
    """A user's own module: children only, its own forward with a residual add."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.fc(x))


def test_users_own_modules_convert():
    torch.manual_seed(3)
    net = nn.Sequential(UserBlock(), UserBlock(), nn.Linear(6, 3))
    assert_parity(net, torch.randn(5, 6), torch.randint(0, 3, (5,)))


class OwnWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.w


class MyConv(nn.Conv2d):
    """A Conv2d subclass: its forward may differ from Conv2d's, so it is not offloaded as one."""


@pytest.mark.parametrize(
    "module, name",
    [
        (nn.LSTM(3, 3), "LSTM"),
        (nn.Sequential(nn.Linear(3, 3), nn.Embedding(4, 3)), "Embedding"),
        (nn.Sequential(nn.Conv1d(3, 3, 1)), "Conv1d"),
        (nn.Sequential(nn.Conv3d(3, 3, 1)), "Conv3d"),
        (nn.Sequential(nn.ConvTranspose2d(3, 3, 2)), "ConvTranspose2d"),
        (nn.Sequential(MyConv(3, 3, 1)), "MyConv"),
        (nn.Sequential(OwnWeights()), "OwnWeights"),
    ],
)
def test_unsupported_layers_are_named(module, name):
    with pytest.raises(UnsupportedLayerError, match=name) as info:
        to_private(module, PrivateContext(InProcessEngine()), keep=())
    assert "Linear" in str(info.value)
    if "Conv" in name:
        assert "only nn.Conv2d itself is offloaded" in str(info.value)


class Net(nn.Module):
    def __init__(self, odd: nn.Module):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, groups=4), odd)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def bad_padding_mode():
    conv = nn.Conv2d(4, 4, 3)
    conv.padding_mode = "mirror"  # torch checks it only in the constructor
    return conv


def strided_same():
    conv = nn.Conv2d(4, 4, 3, padding="same")
    conv.stride = (2, 2)  # torch refuses it in the constructor (and in F.conv2d)
    return conv


@pytest.mark.parametrize(
    "odd, why",
    [
        (nn.Conv1d(4, 4, 1), "has no private version"),
        (nn.ConvTranspose2d(4, 4, 1), "has no private version"),
        (MyConv(4, 4, 1), "has no private version"),
        (bad_padding_mode(), "padding_mode='mirror'"),
        (strided_same(), "padding='same' with stride"),
    ],
)
def test_the_refusal_names_the_layers_path_in_the_model(odd, why):
    with pytest.raises(UnsupportedLayerError) as info:
        to_private(Net(odd), PrivateContext(InProcessEngine()), keep=())
    message = str(info.value)
    assert message.startswith(f"layer 'Net.features.3' ({type(odd).__name__}) ")
    assert why in message and "supported: " in message


def test_private_matmul_broadcasts_a_shared_operand():
    torch.manual_seed(4)
    w = torch.randn(5, 7, requires_grad=True)
    x = torch.randn(3, 7, 4, requires_grad=True)
    pctx = PrivateContext(InProcessEngine())
    out = private_matmul(w, x, pctx)
    g = torch.randn_like(out)
    out.backward(g)
    w2, x2 = w.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    (w2 @ x2).backward(g)
    assert torch.allclose(w.grad, w2.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_grouped_convolutions_split_across_two_relay_processes_have_autograd_gradients():
    """Grouped and depthwise products through a real off-loader and 2 relays, each cut by data
    into 2 parts (the weight whole in both, its gradient summed), pipelined, with the weights
    masked ahead on the second step: the gradients are autograd's."""
    from tempo.cluster import LocalCluster
    from tempo.enclave.client import OffloadClient
    from tempo.enclave.private import ClientEngine

    torch.manual_seed(6)
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding="same", groups=4), nn.ReLU(),  # depthwise, multiplier 2
        nn.Conv2d(8, 8, 4, padding="same", groups=8, padding_mode="reflect", bias=False), nn.ReLU(),
        nn.Conv2d(8, 6, 1, groups=2), nn.Flatten(), nn.Linear(6 * 6 * 6, 5),
    )
    reference = copy.deepcopy(net)
    x, y = torch.randn(5, 4, 6, 6), torch.randint(0, 5, (5,))
    _, want = grads_of(reference, x, y)
    with LocalCluster(relays=2) as cluster, OffloadClient(cluster.enclave_endpoint, "layers") as client:
        client.wait_for_relays(2)
        engine = ClientEngine(client, parts=2, split_min_mb=0.0)
        pctx = PrivateContext(engine, job="layers")
        private = to_private(net, pctx, keep=())
        for _ in range(2):  # the second step masks each next layer's weights ahead (the look-ahead)
            _, got = grads_of(private, x, y)
            pctx.end_step()
            errors = rel_errors(got, want)
            assert max(errors.values()) <= 1e-4, errors
        assert engine.prefetch_used == 3  # layers 1–3, in their forward shapes (grouped: g × out/g × K)
        assert client.counters.premasks_dropped == 0
        assert client.counters.forward == client.counters.backward == 2 * 4 * 2  # 2 steps, 4 products, 2 parts
        assert len(client.counters.parts_by_relay) == 2  # both relays computed parts


@pytest.mark.parametrize("keep, offloaded", [((), [0, 1, 2]), (("first",), [0, 1]), (("last",), [0, 1]),
                                              (("first", "last"), [0])])
def test_layers_kept_in_the_enclave_are_never_offloaded_and_gradients_stay_exact(keep, offloaded):
    torch.manual_seed(0)
    net = models.build("cnn", (1, 8, 8), 10)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    reference = copy.deepcopy(net)
    seen = []
    pctx = PrivateContext(InProcessEngine(observer=lambda event, bind, masked, product: seen.append(bind.layer)))
    loss_p, got = grads_of(to_private(net, pctx, keep=keep), x, y)
    loss_r, want = grads_of(reference, x, y)
    assert sorted(set(seen)) == offloaded and len(seen) == 2 * len(offloaded)  # forward and backward each
    assert torch.allclose(loss_p, loss_r, rtol=1e-5)
    for name, g in want.items():
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-6), name
    with pytest.raises(ValueError, match="keep takes"):
        to_private(net, pctx, keep=("middle",))


@pytest.mark.parametrize("bias,stride,padding", [(True, 1, 1), (False, 2, 0), (True, 1, "same")])
def test_convolutions_as_rows_of_the_whole_batch_match_autograd_and_hide_the_images(bias, stride, padding):
    """`patch_rows` (masking `mixed`): the relay gets one (batch·positions × in·kh·kw) matrix
    under one row key, not the images one by one; gradients are autograd's."""
    from tempo.core.keys import KeySchedule

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, stride=stride, padding=padding, bias=bias), nn.ReLU(), nn.Flatten(),
                        nn.LazyLinear(4))
    x, y = torch.randn(6, 3, 7, 7), torch.randint(0, 4, (6,))
    net(x)  # materialise the lazy layer
    seen = []
    engine = InProcessEngine(keys=KeySchedule(mix=4), observer=lambda ev, bind, masked, product: seen.append(
        (ev, bind.layer, [tuple(t.shape) for t in masked])))
    reference = copy.deepcopy(net)
    pctx = PrivateContext(engine, patch_rows=True)
    loss_p, got = grads_of(to_private(net, pctx, keep=()), x, y)
    loss_r, want = grads_of(reference, x, y)
    assert torch.allclose(loss_p, loss_r, rtol=1e-4)
    for name, g in want.items():
        assert float((got[name] - g).abs().max()) <= 1e-4 * max(float(g.abs().max()), 1e-12), name
    positions = reference[0](x).shape[-2] * reference[0](x).shape[-1]
    conv_forward = next(shapes for ev, layer, shapes in seen if ev == "forward" and layer == 0)
    assert conv_forward == [(6 * positions, 27), (27, 5)]  # 2-D: no batch axis for the relay to read
