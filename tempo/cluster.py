"""Start and stop a local off-loader and relays as real processes (Tempo-l on one machine).

Used by `tempo train`, `tempo infer`, the benchmarks and the integration tests. Each process is
``python -m tempo …``; its stderr (JSON log lines) is collected so a failure can show it, and the
off-loader's readiness is its ``offloader.listening`` event read from those lines. `stop`
sends SIGINT, waits, then SIGKILLs whatever is left, so nothing outlives the cluster.

The processes belong to the one that started them: each gets ``--parent-pid`` and exits by itself
within a second or so once that process is gone, even when it died without a word (SIGKILL, the
OOM killer), and the off-loader then removes the cluster's work directory and the dead job's
shared-memory segment (``--cleanup-dir``). A relay started by hand has no parent to watch and keeps
reconnecting to its off-loader, which is its job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from tempo.enclave.client import OffloaderGone


class ClusterDied(OffloaderGone):
    """A process of the local cluster exited (or did not start) while the job needed it: to the
    enclave's side, the off-loader is gone."""


def _event(line: str) -> dict | None:
    """A structured log line (a JSON object) read back, or None for any other line."""
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def exit_status(returncode: int | None) -> str:
    """A process's exit status in words: ``exit status 3``, ``killed by SIGKILL``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


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
        faults: dict[int, str] | None = None,
        offloader_args: list[str] | None = None,
        record_dir: str | None = None,
        pools: dict[str, int] | None = None,
    ) -> None:
        # the shares mode: relays per pool name, each pool with a fresh key (in the work directory)
        self.pools = pools or {}
        self.pool_keys: dict[str, bytes] = {}
        self.offloader_args = offloader_args or []
        self.n_relays = relays
        self.device = device
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.heartbeat_s = heartbeat_s
        self.cache_mb = cache_mb
        self.faults = faults or {}  # relay index -> --fault MODE[:RATE]
        self.record_dir = record_dir  # relays record what they receive there (tempo relay --record)
        self.workdir: str | None = None  # made by `start`, so a cluster never started leaves nothing
        self.offloader: Proc | None = None
        self.relays: list[Proc] = []
        self.relay_endpoint = ""
        self.enclave_endpoint = ""

    def _spawn(self, name: str, args: list[str], wait_for: str | None = None,
               timeout_s: float = 60.0) -> tuple[Proc, dict | None]:
        """Start ``tempo ARGS``; with `wait_for`, wait until it logs that structured event (a JSON
        line whose ``event`` is `wait_for`) and return the event's fields."""
        cmd = [sys.executable, "-m", "tempo", "--log-format", "json", "--log-level", "info", *args,  # readiness is an info event
               "--parent-pid", str(os.getpid())]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, env=env)
        proc = Proc(name, popen)
        found: dict[str, dict] = {}
        seen = threading.Event()

        def drain() -> None:
            for line in popen.stderr:
                proc.lines.append(line.rstrip("\n"))
                if wait_for and not seen.is_set():
                    event = _event(line)
                    if event is not None and event.get("event") == wait_for:
                        found["m"] = event
                        seen.set()
            seen.set()

        threading.Thread(target=drain, name=f"drain-{name}", daemon=True).start()
        if wait_for:
            try:
                started = seen.wait(timeout_s) and "m" in found
            except BaseException:  # interrupted while it starts: it is not ours to stop yet
                popen.kill()
                popen.wait(5)
                raise
            if not started:
                popen.kill()
                popen.wait(5)
                self.stop()
                raise ClusterDied(f"{name} did not start:\n" + "\n".join(proc.lines[-20:]))
        return proc, found.get("m")

    def start(self) -> LocalCluster:
        """Start the off-loader, then the relays; on any failure or interrupt (Ctrl-C in the
        first seconds) stop what was started and remove the work directory before re-raising."""
        try:
            self.workdir = tempfile.mkdtemp(prefix="tempo-cluster-")
            ipc = os.path.join(self.workdir, "offloader.ipc")
            self.offloader, m = self._spawn(
                "offloader",
                ["offloader", "--relay-bind", "tcp://127.0.0.1:*", "--enclave-bind", f"ipc://{ipc}",
                 "--heartbeat-timeout", str(self.heartbeat_timeout_s), "--cleanup-dir", self.workdir,
                 *self.offloader_args],
                wait_for="offloader.listening",
            )
            self.relay_endpoint, self.enclave_endpoint = m["relays"], m["enclave"]
            for i in range(self.n_relays):
                self.add_relay(fault=self.faults.get(i))
            for pool, count in self.pools.items():
                for _ in range(count):
                    self.add_pool_relay(pool, fault=self.faults.get(len(self.relays)))
        except BaseException:
            self.stop()
            raise
        return self

    def check(self) -> None:
        """Raise `ClusterDied` if the off-loader has exited (its exit status says how)."""
        if self.offloader is not None and not self.offloader.alive():
            raise ClusterDied(f"the off-loader exited ({exit_status(self.offloader.popen.returncode)})")

    def add_relay(self, device: str | None = None, fault: str | None = None, extra_args: list[str] | None = None,
                  name: str | None = None) -> Proc:
        name = name or f"relay{len(self.relays)}-{os.getpid()}"
        args = ["relay", "--connect", self.relay_endpoint, "--device", device or self.device,
                "--heartbeat", str(self.heartbeat_s), "--cache-mb", str(self.cache_mb), "--name", name]
        if fault:
            args += ["--fault", fault]
        if self.record_dir:
            args += ["--record", self.record_dir]
        args += extra_args or []
        proc, _ = self._spawn(name, args)
        self.relays.append(proc)
        return proc

    def add_pool_relay(self, pool: str, fault: str | None = None, extra_args: list[str] | None = None) -> Proc:
        """A relay of `pool` (the shares mode), holding the pool's key (made on first use)."""
        from tempo.protocol.sealed import new_key, write_key

        if pool not in self.pool_keys:
            self.pool_keys[pool] = new_key()
        path = write_key(os.path.join(self.workdir, f"{pool}.key"), self.pool_keys[pool])
        return self.add_relay(fault=fault, extra_args=["--pool", pool, "--pool-key", str(path), *(extra_args or [])],
                              name=f"{pool}-relay{len(self.relays)}-{os.getpid()}")

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
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"[{p.name}] {line}" for p in self.processes() for line in p.lines[-40:])

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
