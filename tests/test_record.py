"""`tempo relay --record`: relays keep exactly what they receive, and the audit reads it back."""

from __future__ import annotations

import torch

from tempo.audit.capture import CaptureConfig, capture


def test_a_recording_holds_exactly_what_the_enclave_sent(tmp_path):
    """Through real relays (the pipeline ships weights ahead with stage): the view read back from
    the recording equals, tensor for tensor, what the enclave put in the arena for them
    (`capture` checks it, and refuses a recording that differs)."""
    import os

    view, truth, _ = capture(CaptureConfig(model="mlp", epochs=1, relays=2), record_dir=tmp_path / "rec")
    assert {p.relay for p in view.products} == {f"relay{i}-{os.getpid()}" for i in range(2)}
    assert len(view.products) == len(truth.products)
    train_steps = [s for s, t in truth.steps.items() if t.train]
    assert all(view.at(s, layer)[0].e is not None for s in train_steps for layer in (0, 1, 2))
    assert len(list((tmp_path / "rec").glob("*/meta-*.json"))) == 2


def test_a_recording_that_differs_from_what_was_sent_is_refused():
    from tempo.audit.capture import _check_same
    from tempo.audit.view import ProductView, RunView

    a, b = torch.ones(2, 3), torch.ones(3, 4)
    sent = RunView([ProductView(0, 0, 0, a, b)])
    _check_same(RunView([ProductView(0, 0, 0, a.clone(), b.clone())]), sent)
    import pytest

    with pytest.raises(ValueError, match="differs"):
        _check_same(RunView([ProductView(0, 0, 0, a * 2, b)]), sent)


def test_the_in_process_capture_sees_what_relays_would():
    view, truth, split = capture(CaptureConfig(model="cnn", epochs=1))
    first = view.at(0, 0)[0]
    assert first.b.shape == (64, 9, 64) and first.e.shape == (64, 16, 64)  # conv1 patches, its masked Δ
    assert split.counts()["val"] > 0 and truth.steps[0].train


def test_each_record_says_its_protection_mode(tmp_path):
    """A relay's recording names each request's mode: ``asymml`` records hold plaintext weights and
    noisy residuals by design, and an audit must be able to tell them from masked products."""
    from tempo.protocol import Binding, Forward, ReleaseJob, Stage
    from tempo.relay import Relay

    relay = Relay("tcp://unused", name="recorder", record_dir=str(tmp_path))
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    for msg in (Stage(Binding("asym", 0, 0, 0), "b", tensors=(b,), mode="asymml"),
                Forward(id="f" * 24, bind=Binding("asym", 0, 0, 0), staged="b", tensors=(a,), mode="asymml"),
                Forward(id="g" * 24, bind=Binding("masked", 0, 0, 0), tensors=(a, b)),  # the default: masked
                Forward(id="h" * 24, bind=Binding("asym", 0, 1, 0), tensors=(a, b), mode="masked"),  # refused
                ReleaseJob("asym")):
        relay.handle([bytes(f) for f in msg.to_frames()])
    records = [torch.load(p) for p in sorted((tmp_path / "recorder").glob("*.pt"))]
    assert [(r["op"], r["bind"][0], r["mode"]) for r in records] == [
        ("stage", "asym", "asymml"), ("forward", "asym", "asymml"), ("forward", "masked", "masked"),
        ("forward", "asym", "masked")]  # what it received, refused or not
    assert torch.equal(records[0]["tensors"][0], b) and records[1]["staged"] == "b"
