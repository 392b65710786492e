"""`tempo audit --protection asymml`: the AsymML mode's relay view captured (in-process and through
real recording relays), attacked with public knowledge only, and scored: labels from the last
layer's dL/dy, the weights in the clear, the images from the residuals."""

import json

import pytest
import torch

pytest.importorskip("scipy")

from tempo.audit import asymml as am  # noqa: E402
from tempo.audit.capture import CaptureConfig, capture  # noqa: E402
from tempo.audit.public import Public  # noqa: E402
from tempo.core.asymml import AsymmlConfig  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Small products: one thread (on a shared machine torch's threads fight over the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs():
    out = {}
    for model in ("mlp", "cnn"):
        view, truth, split = capture(CaptureConfig(model=model, epochs=1, protection="asymml"))
        out[model] = (view, truth, Public.from_split(split, model))
    return out


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_the_view_is_the_residual_the_weights_and_dl_dy_in_the_clear(runs, model):
    view, truth, public = runs[model]
    assert truth.asymml["releases"] > 0 and len(view.products) == 3 * len(truth.steps)
    for p in view.products:
        t = truth.products[p.key]
        assert torch.equal(p.a, t.a) and torch.equal(p.b, t.b)  # identity keys: what the relay gets is the plaintext
        assert (p.e is None) == (t.grad_c is None) and (p.e is None or torch.equal(p.e, t.grad_c))
    seen = am.joined(view)
    first = next(p for p in view.products if p.layer == 0 and p.step == 0)
    x = truth.steps[0].x
    if model == "mlp":  # the first Linear's residual is not the image, but close to its details
        assert first.a.shape == (len(x), 64) and not torch.allclose(first.a, x.reshape(len(x), -1), atol=0.1)
    assert set(am.train_steps(seen, 2)) == {s for s, t in truth.steps.items() if t.train}


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_labels_are_recovered_exactly_from_the_last_layers_gradient(runs, model):
    view, truth, public = runs[model]
    seen = am.joined(view)
    got = am.score_labels(am.recover_labels(seen, 2), truth)
    assert got["samples"] == sum(len(t.y) for t in truth.steps.values() if t.train)
    assert got["labels_exact"] == 1.0


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_the_weights_are_in_the_clear(runs, model):
    view, truth, public = runs[model]
    got = am.score_weights(am.joined(view), truth, public, fit_steps=40)  # the audit fits 300
    assert got["weights_exact"] and got["weights_max_abs_diff"] == 0.0
    assert 0.0 <= got["real_accuracy"] <= 1.0 and 0.0 <= got["rebuilt_accuracy"] <= 1.0
    assert got["rebuilt_accuracy"] > 0.2  # far above chance: the model is the relay's


def test_mlp_images_are_rebuilt_better_than_the_public_mean(runs):
    view, truth, public = runs["mlp"]
    got = am.run_all(view, public, truth, AsymmlConfig(), attacks=("inputs",))
    rec = got.pop("_cache")["inputs"]
    r = got["inputs"]
    assert r["images"] == sum(len(t.y) for t in truth.steps.values() if t.train)
    for k in ("pixels_exact", "pixels_within_1_level", "baseline_exact", "digit_accuracy", "correlation"):
        assert 0.0 <= r[k] <= 1.0, k
    assert r["correlation"] > r["baseline_correlation"] + 0.1
    assert r["pixels_exact"] > r["baseline_exact"]
    assert r["digit_accuracy"] > 0.5  # chance 10%
    s = next(iter(rec.images))
    assert rec.images[s].shape == truth.steps[s].x.shape


def test_cnn_images_are_rebuilt_from_the_second_convolutions_residual(runs):
    view, truth, public = runs["cnn"]
    seen = am.joined(view)
    steps = am.train_steps(seen, 2)[:3]
    rec = am.reconstruct(seen, public, AsymmlConfig(), steps=steps)
    r = am.score_reconstruction(rec.images, truth, public)
    assert r["images"] == sum(len(truth.steps[s].y) for s in steps)
    assert r["correlation"] > r["baseline_correlation"]
    assert r["pixels_exact"] > r["baseline_exact"]
    assert r["digit_accuracy"] > 0.5


def test_parts_split_by_rows_are_joined_in_batch_order():
    from tempo.audit.view import ProductView, RunView

    a, b, e = torch.randn(6, 4), torch.randn(4, 3), torch.randn(6, 3)
    view = RunView([ProductView(0, 0, 1, a[3:], b, e[3:]), ProductView(0, 0, 0, a[:3], b, e[:3])])
    got = am.joined(view)[(0, 0)]
    assert torch.equal(got.a, a) and torch.equal(got.b, b) and torch.equal(got.e, e)
    cols = RunView([ProductView(0, 0, 0, a, b[:, :2], e[:, :2]), ProductView(0, 0, 1, a, b[:, 2:], e[:, 2:])])
    got = am.joined(cols)[(0, 0)]
    assert torch.equal(got.b, b) and torch.equal(got.e, e)


def test_tempo_audit_asymml_through_real_relays_writes_audit_json(tmp_path):
    out = tmp_path / "audit"
    from click.testing import CliRunner

    from tempo.cli import main

    # in this process (CliRunner); the off-loader and the recording relay are real processes
    proc = CliRunner().invoke(main, ["audit", "--protection", "asymml", "--model", "mlp", "--relays", "1",
                                     "--epochs", "1", "--out", str(out)], env={"TEMPO_LOG_LEVEL": "warning"})
    assert proc.exit_code == 0, proc.output[-3000:]
    assert "labels: recovered exactly" in proc.output and "pixels rebuilt exact" in proc.output
    figures = json.loads((out / "audit.json").read_text())
    assert figures["masking"]["masking"] == "asymml" and figures["relays"] == 1
    a = figures["attacks"]
    assert a["labels"]["labels_exact"] == 1.0 and a["weights"]["weights_exact"]
    assert a["inputs"]["correlation"] > a["inputs"]["baseline_correlation"]
    records = [p for p in (out / "recording").rglob("*.pt")]
    assert records and all(torch.load(p, weights_only=True).get("mode") == "asymml" for p in records[:20])


def test_unknown_asymml_attacks_are_usage_errors():
    from click.testing import CliRunner

    from tempo.cli import main

    result = CliRunner().invoke(main, ["audit", "--protection", "asymml", "--attacks", "steal"])
    assert result.exit_code == 2 and "labels, inputs, weights" in result.output
