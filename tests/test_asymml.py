"""The AsymML mode: the light SVD, the low-rank convolution, the noisy residual, the layers'
exactness and gradients against a plain autograd reference of the same decomposed computation,
the DP accounting against a hand computation, and the mode end to end."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tempo import models
from tempo.core.asymml import (
    AsymmlConfig,
    clip_rows,
    dp_account,
    light_svd,
    lowrank_conv2d,
    noisy_residual,
    zcdp_epsilon,
    zcdp_per_release,
)
from tempo.enclave.asymml import AsymmlState, IdentityKeys
from tempo.enclave.private import InProcessEngine, PrivateContext, UnsupportedLayerError, to_private

# -- the math --


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), rows=st.integers(1, 6), cols=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_light_svd_at_full_rank_leaves_no_residual(b, rows, cols, seed):
    x = torch.randn(b, rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u, v = light_svd(x, energy=1.0)
    assert u.shape[:2] == (b, rows) and v.shape[0] == b and v.shape[2] == cols and u.shape[2] == v.shape[1]
    assert u.shape[2] <= rows
    assert torch.allclose(u @ v, x, atol=1e-8 * max(1.0, float(x.abs().max())))


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.9, 0.99])
def test_light_svd_keeps_the_energy_asked_for_with_the_fewest_terms(energy):
    g = torch.Generator().manual_seed(3)
    # four strong directions and noise: the rank grows with the energy asked for
    x = torch.randn(4, 16, 4, generator=g) @ (torch.randn(4, 4, 30, generator=g) * torch.tensor([8., 4., 2., 1.]).view(1, 4, 1))
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    total = float((x * x).sum())
    u, v = light_svd(x, energy=energy)
    r = u.shape[-1]
    left = float(((x - u @ v) ** 2).sum())
    assert left <= (1 - energy) * total + 1e-6
    if r > 1:  # one term fewer would not have been enough
        u1, v1 = light_svd(x, energy=energy, max_rank=r - 1)
        assert float(((x - u1 @ v1) ** 2).sum()) > (1 - energy) * total


def test_light_svd_obeys_max_rank_and_energy_zero_and_refuses_bad_shapes():
    x = torch.randn(2, 8, 10)
    assert light_svd(x, energy=1.0, max_rank=3)[0].shape[-1] == 3
    u, v = light_svd(x, energy=0.0)
    assert u.shape == (2, 8, 0) and v.shape == (2, 0, 10)
    with pytest.raises(ValueError, match="batch × rows × cols"):
        light_svd(torch.randn(8, 10))


@pytest.mark.parametrize("groups, stride, padding, dilation", [(1, 1, 0, 1), (1, 2, 1, 1), (2, 1, 1, 2), (3, (2, 1), (1, 2), 1)])
def test_the_low_rank_convolution_is_the_convolution_of_the_low_rank_part(groups, stride, padding, dilation):
    g = torch.Generator().manual_seed(1)
    n, c, h, w, r = 3, 6, 9, 8, 2
    u = torch.randn(n, c, r, generator=g, dtype=torch.float64)
    v = torch.randn(n, r, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(4 * groups, c // groups, 3, 2, generator=g, dtype=torch.float64)
    low = (u @ v.reshape(n, r, -1)).reshape(n, c, h, w)
    want = F.conv2d(low, weight, None, stride, padding, dilation, groups)
    got = lowrank_conv2d(u, v, weight, stride, padding, dilation, groups)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-10)
    zero = lowrank_conv2d(u[..., :0], v[:, :0], weight, stride, padding, dilation, groups)
    assert zero.shape == want.shape and not zero.any()


def test_clipping_bounds_each_samples_norm_and_leaves_small_ones_alone():
    r = torch.stack([torch.full((3, 4), 0.01), torch.full((3, 4), 10.0)])
    clipped = clip_rows(r, 2.0)
    norms = clipped.reshape(2, -1).norm(dim=1)
    assert torch.allclose(clipped[0], r[0])
    assert abs(float(norms[1]) - 2.0) < 1e-5


def test_the_clipping_and_the_noise_have_the_stated_scales():
    cfg = AsymmlConfig(clip=3.0, noise=0.5)
    d = 400
    x = torch.zeros(2000, 20, 20)  # samples of d entries
    out = noisy_residual(x, torch.zeros_like(x), cfg, torch.Generator().manual_seed(0))
    assert cfg.sigma == 1.5 and cfg.clip_norm(d) == 60.0
    assert abs(float(out.std()) / 1.5 - 1) < 0.01  # σ = z·clip per entry
    assert abs(float(out.flatten(1).norm(dim=1).mean()) / (0.5 * 60.0) - 1) < 0.02  # a norm of z × the clipping norm
    quiet = noisy_residual(x + 10.0, torch.zeros_like(x), AsymmlConfig(clip=3.0, noise=0.0))
    assert torch.allclose(quiet.flatten(1).norm(dim=1), torch.full((2000,), 60.0))  # clipped to clip·√d
    small = noisy_residual(x + 1.0, torch.zeros_like(x), AsymmlConfig(clip=3.0, noise=0.0))
    assert torch.equal(small, x + 1.0)  # an RMS of 1 < 3: untouched


def test_bad_knobs_are_refused_by_name():
    for bad, word in ((dict(energy=1.5), "energy"), (dict(clip=0.0), "clip"), (dict(noise=-1.0), "noise"),
                      (dict(delta=1.0), "delta"), (dict(max_rank=-1), "max_rank"), (dict(iters=0), "iters")):
        with pytest.raises(ValueError, match=word):
            AsymmlConfig(**bad).validate()


# -- the DP accounting, by hand --


def test_dp_accounting_matches_a_hand_computation():
    cfg = AsymmlConfig(noise=0.5, clip=7.0, delta=1e-5)
    got = dp_account([64, 1024], passes=3, config=cfg)
    # one release of d entries: Δ = 2·clip·√d, σ = z·clip → ρ = Δ²/(2σ²) = 4d/(2·0.25) = 8d
    assert got["rho_per_layer"] == [512.0, 8192.0]
    rho = 3 * (512 + 8192)
    assert got["rho"] == rho and got["releases_per_sample"] == 6
    assert got["epsilon"] == pytest.approx(rho + 2 * math.sqrt(rho * math.log(1e5)), rel=1e-9)
    assert got["epsilon_one_pass"] == pytest.approx(8704 + 2 * math.sqrt(8704 * math.log(1e5)), rel=1e-9)
    assert zcdp_per_release(2.0, 1) == 0.5 and zcdp_epsilon(0.5, math.exp(-2)) == pytest.approx(0.5 + 2.0)
    assert got["does_not_cover"] and "labels" in got["does_not_cover"]


def test_no_noise_means_no_finite_epsilon_and_no_release_means_zero():
    assert dp_account([10], 2, AsymmlConfig(noise=0.0))["epsilon"] is None
    assert dp_account([10], 0, AsymmlConfig())["epsilon"] == 0.0
    json.dumps(dp_account([10], 2, AsymmlConfig(noise=0.0)))  # JSON has no infinity: None stands for it


# -- the layers --


def asymml_context(config: AsymmlConfig, seed: int = 0, rounds: int = 8) -> PrivateContext:
    state = AsymmlState(config, torch.Generator().manual_seed(seed))
    return PrivateContext(InProcessEngine(rounds=rounds, keys=IdentityKeys()), patch_rows=True, asymml=state)


def grads_of(module, x, y):
    for p in module.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(module(x), y)
    loss.backward()
    return loss.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, groups=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 12), nn.ReLU(), nn.Linear(12, 5)).double()


def test_at_full_rank_without_noise_asymml_is_plain_training():
    net = small_cnn()
    plain = copy.deepcopy(net)
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    pctx = asymml_context(AsymmlConfig(energy=1.0, noise=0.0, clip=1e9))
    private = to_private(net, pctx, keep=())
    opt_p, opt_r = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (net, plain))
    for _ in range(3):  # a few steps: the weights stay equal too
        lp, gxp, gp = grads_of(private, x, y)
        lr, gxr, gr = grads_of(plain, x, y)
        assert torch.allclose(lp, lr, rtol=1e-10)
        assert torch.allclose(gxp, gxr, rtol=1e-8, atol=1e-12)
        for name in gr:
            assert torch.allclose(gp[name], gr[name], rtol=1e-8, atol=1e-12), name
        opt_p.step()
        opt_r.step()
        pctx.end_step()
    state = pctx.asymml
    assert state.releases == 3 * 4 * 4 and state.layer_entries() == [3 * 8 * 8, 6 * 8 * 8, 72, 12]
    assert state.rank_max > 0


def test_below_full_rank_without_noise_the_sum_is_still_the_plain_layer():
    """Linearity: L + R = x at any rank, so with neither clipping nor noise the output is exact."""
    net = small_cnn()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    want = net(x)
    pctx = asymml_context(AsymmlConfig(energy=0.5, max_rank=1, noise=0.0, clip=1e9))
    got = to_private(copy.deepcopy(net), pctx, keep=())(x)
    assert pctx.asymml.rank_max == 1
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


class ReferenceConv(nn.Module):
    """The mode's definition in plain autograd: the layer applied to ``L + R̃`` with the input's
    gradient passing straight through the decomposition."""

    def __init__(self, conv: nn.Conv2d, cfg: AsymmlConfig, gen: torch.Generator):
        super().__init__()
        self.conv, self.cfg, self.gen = conv, cfg, gen

    def forward(self, x):
        n, c, h, w = x.shape
        u, v = light_svd(x.detach().reshape(n, c, h * w), self.cfg.energy, self.cfg.max_rank, self.cfg.iters)
        low = (u @ v).reshape(x.shape)
        seen = low + noisy_residual(x.detach(), low, self.cfg, self.gen)
        return self.conv(x + (seen - x).detach())


class ReferenceLinear(nn.Module):
    def __init__(self, linear: nn.Linear, cfg: AsymmlConfig, gen: torch.Generator):
        super().__init__()
        self.linear, self.cfg, self.gen = linear, cfg, gen

    def forward(self, x):
        u, v = light_svd(x.detach().unsqueeze(0), self.cfg.energy, self.cfg.max_rank, self.cfg.iters)
        low = (u @ v)[0]
        seen = low + noisy_residual(x.detach(), low, self.cfg, self.gen)
        return self.linear(x + (seen - x).detach())


def reference_of(net: nn.Sequential, cfg: AsymmlConfig, gen: torch.Generator) -> nn.Sequential:
    layers = []
    for m in net:
        if isinstance(m, nn.Conv2d):
            m = ReferenceConv(m, cfg, gen)
        elif isinstance(m, nn.Linear):
            m = ReferenceLinear(m, cfg, gen)
        layers.append(m)
    return nn.Sequential(*layers)


@pytest.mark.parametrize("cfg", [AsymmlConfig(energy=0.8, clip=0.5, noise=0.3),
                                 AsymmlConfig(energy=0.6, max_rank=1, clip=2.0, noise=1.0),
                                 AsymmlConfig(energy=0.0, clip=0.1, noise=0.1)])
def test_gradients_match_a_plain_autograd_reference_of_the_decomposed_computation(cfg):
    net = small_cnn()
    ref_net = copy.deepcopy(net)
    x, y = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4])
    pctx = asymml_context(cfg, seed=11)
    lp, gxp, gp = grads_of(to_private(net, pctx, keep=()), x, y)
    lr, gxr, gr = grads_of(reference_of(ref_net, cfg, torch.Generator().manual_seed(11)), x, y)
    assert torch.allclose(lp, lr, rtol=1e-9)
    assert torch.allclose(gxp, gxr, rtol=1e-7, atol=1e-12)
    names = dict(zip(gp, gr))  # the reference wraps each layer: its names differ, its order does not
    for mine, theirs in names.items():
        assert torch.allclose(gp[mine], gr[theirs], rtol=1e-7, atol=1e-12), mine
    # and the noise did change things: the plain model's loss differs
    assert not torch.allclose(lp, F.cross_entropy(copy.deepcopy(ref_net)(x), y), rtol=1e-6)


def test_what_a_relay_receives_is_the_noisy_residual_and_the_plain_weights():
    seen = []
    pctx = asymml_context(AsymmlConfig(energy=0.9, clip=1.0, noise=0.2), seed=5)
    pctx.engine.observer = lambda kind, bind, operands, product: seen.append((kind, operands))
    net = nn.Sequential(nn.Linear(10, 4)).double()
    x = torch.randn(6, 10, dtype=torch.float64)
    to_private(net, pctx, keep=())(x)
    (kind, (a, b)), = seen
    assert kind == "forward"
    assert torch.equal(b, net[0].weight.detach().t())  # weights in the clear, by design
    ref = noisy_residual(x, (lambda u, v: (u @ v)[0])(*light_svd(x.unsqueeze(0), 0.9)), pctx.asymml.config,
                         torch.Generator().manual_seed(5))
    assert torch.allclose(a, ref)
    assert not torch.allclose(a, x, atol=0.1)  # not the input itself


def test_attention_has_no_asymml_form():
    pctx = asymml_context(AsymmlConfig())
    vit = models.build("vit", (3, 16, 16), 10, None)
    with pytest.raises(UnsupportedLayerError, match="no AsymML form"):
        to_private(vit, pctx, keep=())


def test_packaged_convolutional_models_train_in_the_asymml_mode():
    torch.manual_seed(0)
    net = models.build("resnet18", (3, 16, 16), 10, 8)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    pctx = asymml_context(AsymmlConfig())
    private = to_private(net, pctx, keep=())
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(private(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pctx.end_step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    assert not pctx._open and not pctx.engine._cache


# -- the mode through real processes --


def test_tempo_train_asymml_reports_its_dp_accounting(tmp_path):
    """The commands in this process (CliRunner); their relays and off-loader are real processes."""
    from click.testing import CliRunner

    from tempo.cli import main

    out = tmp_path / "run"
    quiet = {"TEMPO_LOG_LEVEL": "warning"}
    proc = CliRunner().invoke(main, ["train", "--protection", "asymml", "--epochs", "1", "--relays", "1", "--batch-size",
                                     "256", "--val-fraction", "0", "--asymml-noise", "0.5", "--out", str(out)], env=quiet)
    assert proc.exit_code == 0, proc.output[-3000:]
    assert "-DP for what the accounting covers" in proc.output
    summary = json.loads((out / "summary.json").read_text())
    dp = summary["dp"]
    assert summary["offload"]["protection"] == "asymml" and summary["offload"]["noise"] == 0.5
    assert dp["layer_entries"] == [64, 1024, 512] and dp["passes"] == 1  # the digits CNN's three layers
    rho = sum(2 * d / 0.25 for d in dp["layer_entries"])
    assert dp["epsilon"] == pytest.approx(rho + 2 * math.sqrt(rho * math.log(1e5)), rel=1e-6)
    assert summary["offload"]["asymml"]["releases"] > 0 and summary["offload"]["failed_verifications"] == 0
    # and private inference with the trained weights in the same mode, at full rank without noise:
    # the plain model's accuracy exactly
    proc = CliRunner().invoke(main, ["infer", "--checkpoint", str(out / "model.pt"), "--model", "cnn", "--protection",
                                     "asymml", "--asymml-energy", "1", "--asymml-noise", "0", "--asymml-clip", "1e9",
                                     "--relays", "1", "--batch-size", "400", "--json", str(out / "infer.json")], env=quiet)
    assert proc.exit_code == 0, proc.output[-3000:]
    result = json.loads((out / "infer.json").read_text())
    assert result["protection"] == "asymml" and result["dp"]["passes"] == 1 and result["dp"]["epsilon"] is None
    from tempo import data as datasets
    from tempo.train import evaluate

    split = datasets.load("digits", seed=7)
    net = models.build("cnn", split.image_shape, split.classes)
    net.load_state_dict(torch.load(out / "model.pt"))
    net.eval()
    assert result["accuracy"] == evaluate(net, split.test_x, split.test_y, 128)


def test_bad_asymml_knobs_are_usage_errors():
    from click.testing import CliRunner

    from tempo.cli import main

    result = CliRunner().invoke(main, ["train", "--protection", "asymml", "--asymml-energy", "1.5"])
    assert result.exit_code == 2 and "asymml-energy" in result.output


def test_the_train_config_checks_the_knobs_by_name():
    from tempo.train import ConfigError, TrainConfig

    with pytest.raises(ConfigError) as err:
        TrainConfig(protection="asymml", asymml_noise=-1.0).validate()
    assert err.value.key == "asymml_noise"


def test_identity_keys_mask_by_copying_and_others_are_not_identities():
    from tempo.core.obfuscation import mask, unmask

    keys = IdentityKeys()
    k = keys.key(0, 3, 4, 5)
    assert k.m.identity and k.n.identity and keys.key(0, 3, 4, 5) is k
    a = torch.randn(2, 3, 4)
    out = torch.empty_like(a)
    assert mask(a, k.m, k.n, out=out) is out and torch.equal(out, a)
    masked = mask(a, k.m, k.n)
    assert torch.equal(masked, a) and masked.data_ptr() != a.data_ptr()  # a copy, never the operand itself
    assert torch.equal(unmask(a, k.m, k.n), a)
    from tempo.enclave.protection import preset

    other = preset("paper").keys().key(0, 3, 4, 5)
    assert not (other.m.identity and other.n.identity)


def test_the_session_checks_the_asymml_settings_by_name():
    from tempo.session import SessionConfig, SessionError

    with pytest.raises(SessionError) as err:
        SessionConfig(protection="asymml", asymml=AsymmlConfig(noise=-1.0)).validate()
    assert err.value.key == "asymml" and "noise" in str(err.value)
    with pytest.raises(SessionError, match="protection='asymml'"):
        SessionConfig(protection="masking", asymml=AsymmlConfig()).validate()
    assert SessionConfig(protection="asymml").validate().asymml == AsymmlConfig()


def test_light_svd_returns_its_deflated_residual_and_tracks_its_energy():
    x = torch.randn(3, 6, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u, v, rest = light_svd(x, energy=0.7, residual=True)
    assert torch.allclose(rest, x - u @ v, atol=1e-12)
    assert float((rest ** 2).sum()) <= 0.3 * float((x ** 2).sum()) + 1e-9  # the energy kept, as summed afresh
    u2, v2 = light_svd(x, energy=0.7)
    assert torch.equal(u, u2) and torch.equal(v, v2)
