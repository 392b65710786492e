"""Hostile relays in real training runs: every fault mode, quarantine, stop-and-resume."""

import json

import pytest
import torch
from click.testing import CliRunner

from tempo.cli import main
from tempo.train import TrainConfig, TrainingStopped, run
from tempo.relay import FAULT_MODES, Fault

FAST = dict(model="mlp", epochs=1, batch_size=256, seed=5, relays=2, part_timeout_s=2.0, heartbeat_timeout_s=1.0,
            masking="paper")  # every layer offloaded: faults can strike any of them


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    out = tmp_path_factory.mktemp("honest")
    summary = run(TrainConfig(out=str(out), **FAST))
    return summary, torch.load(out / "model.pt")


def assert_honest_and_relay0_named(summary, out, honest, mode):
    """The run's weights are the honest run's, and only relay 0 was quarantined or lost."""
    honest_summary, honest_weights = honest
    weights = torch.load(out / "model.pt")
    for k in honest_weights:
        assert torch.allclose(weights[k], honest_weights[k], rtol=1e-4, atol=1e-4), (mode, k)
    assert summary.steps == honest_summary.steps
    named = summary.quarantined_relays + summary.lost_relays
    assert [e["relay"] for e in named] and all(e["relay"].startswith("relay0-") for e in named), named


@pytest.mark.parametrize("mode", FAULT_MODES)
def test_training_with_a_faulty_relay_ends_with_honest_weights(mode, honest, tmp_path, monkeypatch):
    monkeypatch.setenv("TEMPO_FAULT_SLOW_S", "6")  # slow: well past the 2 s part timeout
    summary = run(TrainConfig(out=str(tmp_path), inject_fault=mode, **FAST))
    assert_honest_and_relay0_named(summary, tmp_path, honest, mode)
    if mode in ("corrupt", "nan", "lazy", "noise"):
        assert "failed verification" in summary.quarantined_relays[0]["reason"]
    if mode == "drop":
        assert "no answer" in summary.quarantined_relays[0]["reason"]
    if mode == "malformed":  # caught by the off-loader, before the enclave sees the result
        assert "wrong shape or dtype" in summary.quarantined_relays[0]["reason"]
        assert summary.offload["failed_verifications"] == 0


def test_fault_specs_are_checked():
    assert Fault.parse("lazy:0.25").rate == 0.25
    for bad in ("melt", "corrupt:2", "corrupt:x"):
        with pytest.raises(ValueError):
            Fault.parse(bad)
    result = CliRunner().invoke(main, ["train", "--inject-fault", "melt", "--out", "/tmp/never"])
    assert result.exit_code != 0 and "fault mode" in result.output


def test_only_relay_corrupt_stops_with_a_checkpoint_that_resumes_on_honest_relays(tmp_path):
    cfg = dict(FAST, relays=1, epochs=2)
    with pytest.raises(TrainingStopped, match="failed verification") as info:
        run(TrainConfig(out=str(tmp_path), inject_fault="corrupt:1.0", **cfg))
    assert "resume" in str(info.value) and (tmp_path / "checkpoint.pt").exists()
    assert not (tmp_path / "model.pt").exists()  # no model from a run that could not verify
    resumed = run(TrainConfig(out=str(tmp_path), resume=True, **cfg))
    plain = run(TrainConfig(out=str(tmp_path / "plain"), **dict(cfg, mode="plain")))
    assert resumed.steps == plain.steps
    assert abs(resumed.train_loss - plain.train_loss) < 1e-3


def test_cli_names_the_quarantined_relay_and_exits_non_zero_when_none_is_left(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["train", "--model", "mlp", "--epochs", "1", "--relays", "2", "--inject-fault", "corrupt",
                              "--out", str(tmp_path / "a")])
    assert ok.exit_code == 0, ok.output
    assert "quarantined relay relay0-" in ok.output
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["quarantined_relays"]
    stopped = runner.invoke(main, ["train", "--model", "mlp", "--epochs", "1", "--relays", "1", "--inject-fault",
                                   "nan:1.0", "--part-timeout", "2", "--out", str(tmp_path / "b")])
    assert stopped.exit_code != 0 and "failed verification" in stopped.output and "--resume" in stopped.output


@pytest.mark.parametrize("mode", ["corrupt", "crash"])
def test_a_faulty_relay_among_three_with_every_product_split(mode, honest, tmp_path):
    """Partitioned products: a bad part is quarantined and recomputed; the others stand."""
    # 3 relays, the off-loader and the enclave on 2 cores: a heartbeat can be late by over 1 s
    cfg = dict(FAST, relays=3, split_min_mb=0.0, heartbeat_timeout_s=3.0)
    summary = run(TrainConfig(out=str(tmp_path), inject_fault=mode, **cfg))
    assert_honest_and_relay0_named(summary, tmp_path, honest, mode)
    # every product went out in 3 parts, and the two honest relays answered
    by_relay = summary.offload["parts_by_relay"]
    assert sum(v for k, v in by_relay.items() if not k.startswith("relay0-")) > 0
    assert summary.offload["forward_products"] >= 3 * 3 * summary.steps


def test_balanced_noise_on_wide_products_is_caught_through_the_off_loader(monkeypatch):
    """A real relay adds +s, -s, +s, ... (s = 10, 1e3, 1e6 x max|C|) along every row of products
    with 65,536 and 131,072 output columns; each is caught (Freivalds with k rounds misses with
    probability 2^-k at most), the relay quarantined with the evidence. The old tolerance, which
    grew with the relay's own |C|, let these through (docs/BENCHMARKS.md)."""
    from tempo.cluster import LocalCluster
    from tempo.enclave.client import OffloadClient
    from tempo.core.verify import IntegrityError
    from tempo.protocol import Binding

    with LocalCluster(relays=0) as cluster, OffloadClient(cluster.enclave_endpoint, "wide", rounds=20,
                                                         arena_bytes=64 << 20, part_timeout_s=20.0,
                                                         max_attempts=1) as client:
        trials = [("10", 65_536), ("1e3", 131_072), ("1e6", 65_536)]  # each noise size, each width
        for step, (times, p) in enumerate(trials):
            monkeypatch.setenv("TEMPO_FAULT_NOISE_X", times)  # read by the relay as it starts
            cluster.add_relay(fault="noise")
            client.wait_for_relays(1)
            a, b = torch.randn(4, 16), torch.randn(16, p)
            with pytest.raises(IntegrityError, match="failed verification"):  # one attempt: caught, not retried
                client.forward(a, b, Binding("wide", step, 0, 0))
            assert client.counters.failed_verifications == step + 1
            client.ping()  # the off-loader's word that it quarantined the relay comes in with the pong
            assert "exceeds the rounding bound" in client.relay_events[-1]["reason"], (times, p)
            assert client.relay_events[-1]["event"] == "quarantined"


def test_wide_products_from_an_honest_relay_pass():
    from tempo.cluster import LocalCluster
    from tempo.enclave.client import OffloadClient
    from tempo.protocol import Binding

    with LocalCluster(relays=1) as cluster, OffloadClient(cluster.enclave_endpoint, "wide", rounds=20,
                                                         arena_bytes=64 << 20) as client:
        client.wait_for_relays(1)
        for step, p in enumerate((65_536, 131_072)):
            a, b = torch.randn(4, 16), torch.randn(16, p)
            c = client.forward(a, b, Binding("wide", step, 0, 0))
            assert torch.allclose(c, a @ b, rtol=1e-4, atol=1e-4)
            client.release(Binding("wide", step, 0, 0))
        assert client.counters.failed_verifications == 0
