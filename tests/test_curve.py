"""CurveZMQ: a relay without an allow-listed key gets no work; an allowed one serves."""

import time

import torch
from click.testing import CliRunner

from tempo.cli import main
from tempo.cluster import LocalCluster
from tempo.enclave.client import OffloadClient
from tempo.protocol import Binding


def test_only_allow_listed_relays_join_and_strangers_are_logged(tmp_path):
    runner = CliRunner()
    for where, name in (("server", "offloader"), ("allowed", "good"), ("strangers", "bad")):
        result = runner.invoke(main, ["keys", "generate", "--dir", str(tmp_path / where), "--name", name])
        assert result.exit_code == 0, result.output
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "good.key").write_bytes((tmp_path / "allowed" / "good.key").read_bytes())
    server_secret = tmp_path / "server" / "offloader.key_secret"
    server_public = tmp_path / "server" / "offloader.key"
    cluster = LocalCluster(relays=0, offloader_args=["--curve-secret", str(server_secret), "--curve-allow", str(allow)])
    cluster.start()
    try:
        cluster.add_relay(extra_args=["--curve-secret", str(tmp_path / "strangers" / "bad.key_secret"),
                                      "--curve-server-key", str(server_public)])
        cluster.add_relay(extra_args=["--curve-secret", str(tmp_path / "allowed" / "good.key_secret"),
                                      "--curve-server-key", str(server_public)])
        with OffloadClient(cluster.enclave_endpoint, "curve", arena_bytes=1 << 20, part_timeout_s=5) as client:
            client.wait_for_relays(1)
            time.sleep(1.0)  # give the stranger every chance to join
            assert client.ping() == 1
            for i in range(10):  # all work goes to the allowed relay and comes back right
                a, b = torch.randn(4, 3), torch.randn(3, 2)
                assert torch.allclose(client.forward(a, b, Binding("curve", i, 0, 0)), a @ b, atol=1e-5)
    finally:
        cluster.stop()
    lines = "\n".join(cluster.offloader.lines)
    assert "offloader.relay_refused" in lines
    joined = [line for line in cluster.offloader.lines if "relay_joined" in line]
    assert len(joined) == 1 and "relay1-" in joined[0]  # the allowed relay; relay0 had the stranger's key
    assert not any("relay_joined" in line for line in cluster.relays[0].lines)


def test_curve_options_must_come_in_pairs(tmp_path):
    result = CliRunner().invoke(main, ["keys", "generate", "--dir", str(tmp_path), "--name", "x"])
    assert result.exit_code == 0
    half = CliRunner().invoke(main, ["offloader", "--curve-secret", str(tmp_path / "x.key_secret")])
    assert half.exit_code != 0 and "allow-list" in half.output
