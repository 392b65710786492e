"""Start and stop a local off-loader and relays as real processes (Tempo-l on one machine).

Used by `tempo bench transport`, the integration tests, and later `tempo train`. Each process is
``python -m tempo …``; its stderr (JSON log lines) is collected so a failure can show it. `stop`
sends SIGINT, waits, then SIGKILLs whatever is left, so nothing outlives the cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        return self.popen.poll() is None


class LocalCluster:
    def __init__(
        self,
        relays: int = 2,
        device: str = "cpu",
        heartbeat_timeout_s: float = 3.0,
        heartbeat_s: float = 0.5,
        cache_mb: int = 1024,
        log_format: str = "json",
        faults: dict[int, str] | None = None,
        offloader_args: list[str] | None = None,
    ) -> None:
        self.offloader_args = offloader_args or []
        self.n_relays = relays
        self.device = device
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.heartbeat_s = heartbeat_s
        self.cache_mb = cache_mb
        self.log_format = log_format
        self.faults = faults or {}  # relay index -> --fault MODE[:RATE]
        self.workdir = tempfile.mkdtemp(prefix="tempo-cluster-")
        self.offloader: Proc | None = None
        self.relays: list[Proc] = []
        self.relay_endpoint = ""
        self.enclave_endpoint = ""

    def _spawn(self, name: str, args: list[str], wait_for: str | None = None, timeout_s: float = 60.0) -> tuple[Proc, re.Match | None]:
        cmd = [sys.executable, "-m", "tempo", "--log-format", self.log_format, *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, env=env)
        proc = Proc(name, popen)
        found: dict[str, re.Match] = {}
        seen = threading.Event()

        def drain() -> None:
            for line in popen.stderr:
                proc.lines.append(line.rstrip("\n"))
                if wait_for and not seen.is_set():
                    m = re.search(wait_for, line)
                    if m:
                        found["m"] = m
                        seen.set()
            seen.set()

        threading.Thread(target=drain, name=f"drain-{name}", daemon=True).start()
        if wait_for:
            if not seen.wait(timeout_s) or "m" not in found:
                self.stop()
                raise RuntimeError(f"{name} did not start:\n" + "\n".join(proc.lines[-20:]))
        return proc, found.get("m")

    def start(self) -> LocalCluster:
        ipc = os.path.join(self.workdir, "offloader.ipc")
        self.offloader, m = self._spawn(
            "offloader",
            ["offloader", "--relay-bind", "tcp://127.0.0.1:*", "--enclave-bind", f"ipc://{ipc}",
             "--heartbeat-timeout", str(self.heartbeat_timeout_s), *self.offloader_args],
            wait_for=r"offloader listening: relays (\S+) enclave (\S+)",
        )
        self.relay_endpoint, self.enclave_endpoint = m.group(1), m.group(2)
        for i in range(self.n_relays):
            self.add_relay(fault=self.faults.get(i))
        return self

    def add_relay(self, device: str | None = None, fault: str | None = None, extra_args: list[str] | None = None) -> Proc:
        name = f"relay{len(self.relays)}-{os.getpid()}"
        args = ["relay", "--connect", self.relay_endpoint, "--device", device or self.device,
                "--heartbeat", str(self.heartbeat_s), "--cache-mb", str(self.cache_mb), "--name", name]
        if fault:
            args += ["--fault", fault]
        args += extra_args or []
        proc, _ = self._spawn(name, args)
        self.relays.append(proc)
        return proc

    def kill_relay(self, index: int, sig: int = signal.SIGKILL) -> None:
        self.relays[index].popen.send_signal(sig)
        self.relays[index].popen.wait(10)

    def processes(self) -> list[Proc]:
        return ([self.offloader] if self.offloader else []) + self.relays

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGINT every process, wait, SIGKILL what is left; remove the work directory."""
        procs = self.processes()
        for p in procs:
            if p.alive():
                p.popen.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"[{p.name}] {line}" for p in self.processes() for line in p.lines[-40:])

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
