"""Tempo-n on one machine: relays in their own network namespaces, at their own addresses,
reached over veth links (ops/netns/tempo-n). Needs root; skipped cleanly where namespaces are
not permitted."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "ops" / "netns" / "tempo-n"
JOB = """[job]
model = "mlp"
epochs = 1
batch_size = 128
relays = 2
seed = 7
"""


def _namespaces_permitted() -> str | None:
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    probe = f"tempo-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"network namespaces not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


SKIP = _namespaces_permitted()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_training_across_relays_in_their_own_namespaces_matches_the_local_run(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(JOB)
    prefix = f"tn{os.getpid() % 100000}"
    env = {**os.environ, "TEMPO": f"{sys.executable} -m tempo", "TEMPO_N_PORT": str(_free_port()),
           "TEMPO_N_PREFIX": prefix}
    result = subprocess.run([str(SCRIPT), "run", "--relays", "2", "--job", str(job), "--out", str(tmp_path / "n"),
                             "--rate", "1gbit"], env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads((tmp_path / "n" / "summary.json").read_text())
    # each relay answered from its own namespace's address
    assert set(remote["offload"]["parts_by_relay"]) == {"relay0@10.77.0.2", "relay1@10.77.1.2"}
    assert all(v > 0 for v in remote["offload"]["parts_by_relay"].values())

    local = subprocess.run([sys.executable, "-m", "tempo", "--log-level", "warning", "train", "--model", "mlp",
                            "--epochs", "1", "--batch-size", "128", "--relays", "2", "--seed", "7",
                            "--out", str(tmp_path / "l")], capture_output=True, text=True, timeout=240)
    assert local.returncode == 0, local.stderr[-3000:]
    here = json.loads((tmp_path / "l" / "summary.json").read_text())
    assert remote["steps"] == here["steps"]
    # fresh keys on each side: the same training up to masking round-off
    assert abs(remote["test_accuracy"] - here["test_accuracy"]) <= 0.01
    assert abs(remote["train_loss"] - here["train_loss"]) <= 1e-3

    # nothing left behind: namespaces, links, processes
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert prefix not in namespaces and prefix not in links


def test_the_script_refuses_bad_usage(tmp_path):
    result = subprocess.run([str(SCRIPT), "run", "--relays", "1"], capture_output=True, text=True)
    assert result.returncode == 2 and "--job" in result.stderr
    result = subprocess.run([str(SCRIPT), "run", "--job", str(tmp_path / "missing.toml")], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "no job file" in result.stderr
