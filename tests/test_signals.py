"""`tempo train` as schedulers and people stop it: SIGTERM, SIGHUP, SIGKILL, Ctrl-C while the cluster
starts, and the off-loader dying under it. Real processes, real signals; nothing may be left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tempo.arena import SHM_DIR


def start_train(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    """`tempo train` in its own temp dir (so its cluster directory can be found), logging JSON."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    log = tmp_path / "train.log"
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tempo", "--log-format", "json", "train", *args],
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env)
    return proc, tmpdir, log


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def children_of(pid: int) -> list[int]:
    """Processes started with --parent-pid PID (the cluster of that `tempo train`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--parent-pid" in cmd and cmd[cmd.index(b"--parent-pid") + 1] == str(pid).encode():
            found.append(int(entry.name))
    return found


def segments_of(pid: int) -> list[str]:
    return [p.name for p in SHM_DIR.iterdir() if p.name.startswith("tempo-") and p.name.endswith(f"-{pid}")]


def leftovers(pid: int, tmpdir: Path) -> dict:
    return {"processes": children_of(pid), "segments": segments_of(pid),
            "cluster_dirs": cluster_dirs(tmpdir)}


def cluster_dirs(tmpdir: Path) -> list[str]:
    return [p.name for p in tmpdir.glob("tempo-cluster-*")]


def training(log: Path) -> bool:
    return "train.progress" in log.read_text()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGKILL, -9)])
def test_a_signal_stops_the_run_and_leaves_nothing_behind(tmp_path, sig, code):
    out = tmp_path / "run"
    proc, tmpdir, log = start_train(tmp_path, "--model", "mlp", "--epochs", "40", "--checkpoint-every", "2",
                                    "--progress-every", "0", "--out", str(out))
    try:
        wait_for(lambda: training(log) or proc.poll() is not None, 120, "training to start")
        assert proc.poll() is None, log.read_text()
        assert children_of(proc.pid) and segments_of(proc.pid) and cluster_dirs(tmpdir)  # a cluster runs
        proc.send_signal(sig)
        proc.wait(10)
        assert proc.returncode == code, log.read_text()
        # the cluster goes with it: at once for TERM/HUP, on its own within seconds after a SIGKILL
        wait_for(lambda: not any(leftovers(proc.pid, tmpdir).values()), 10,
                 f"the cluster to go: {leftovers(proc.pid, tmpdir)}")
    finally:
        if proc.poll() is None:
            proc.kill()
        for child in children_of(proc.pid):
            os.kill(child, signal.SIGKILL)
    if sig != signal.SIGKILL:
        text = log.read_text()
        assert f"interrupted by {sig.name}: checkpoint at {out}/checkpoint.pt" in text
        assert f"resume with: tempo train --resume --out {out}" in text
        assert (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()


def test_the_run_resumes_after_sigterm(tmp_path):
    out = tmp_path / "run"
    proc, _, log = start_train(tmp_path, "--mode", "plain", "--model", "mlp", "--epochs", "300",
                               "--checkpoint-every", "0", "--progress-every", "0", "--out", str(out))
    wait_for(lambda: training(log) or proc.poll() is not None, 60, "training to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 143, log.read_text()
    resumed = subprocess.run([sys.executable, "-m", "tempo", "train", "--mode", "plain", "--model", "mlp",
                              "--epochs", "1", "--resume", "--out", str(out)], capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "(resumed)" in resumed.stdout and (out / "model.pt").exists()


def test_ctrl_c_while_the_cluster_starts_leaves_no_temp_dir(tmp_path):
    proc, tmpdir, log = start_train(tmp_path, "--model", "mlp", "--epochs", "1", "--out", str(tmp_path / "run"))
    try:
        wait_for(lambda: cluster_dirs(tmpdir) or proc.poll() is not None, 60, "the cluster directory")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 130, log.read_text()
        wait_for(lambda: not any(leftovers(proc.pid, tmpdir).values()), 10,
                 f"the cluster to go: {leftovers(proc.pid, tmpdir)}")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "nothing to resume" in log.read_text()


def test_the_off_loader_dying_is_noticed_within_seconds(tmp_path):
    out = tmp_path / "run"
    proc, tmpdir, log = start_train(tmp_path, "--model", "mlp", "--epochs", "40", "--progress-every", "0",
                                    "--out", str(out))
    try:
        wait_for(lambda: log.read_text().count("train.progress") >= 10 or proc.poll() is not None, 120, "step 10")
        offloader = [pid for pid in children_of(proc.pid)
                     if b"offloader" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        assert len(offloader) == 1, log.read_text()
        os.kill(offloader[0], signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(30)
        noticed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 1 and noticed < 8, (noticed, text)
    assert "the off-loader exited (killed by SIGKILL)" in text and "--resume" in text
    assert (out / "checkpoint.pt").exists()
    wait_for(lambda: not any(leftovers(proc.pid, tmpdir).values()), 10, "the cluster to go")


def test_a_relay_started_by_hand_keeps_waiting_for_its_off_loader_one_with_a_parent_does_not(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = [sys.executable, "-m", "tempo", "relay", "--connect", f"tcp://127.0.0.1:{port}"]
    standalone = subprocess.Popen(base, stderr=subprocess.DEVNULL)
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = subprocess.Popen([*base, "--parent-pid", str(gone.pid)], stderr=subprocess.DEVNULL)
    try:
        assert orphan.wait(20) == 0  # its parent is gone: it leaves by itself
        time.sleep(1.0)
        assert standalone.poll() is None  # no parent to watch: it keeps reconnecting
    finally:
        for p in (standalone, orphan):
            if p.poll() is None:
                p.kill()
                p.wait()
