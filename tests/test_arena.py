import os
import signal
import subprocess
import sys

import pytest
import torch

from tempo import arena as arena_mod
from tempo.arena import Arena, Descriptor, cleanup_stale, list_segments, segment_name
from tempo.protocol import ProtocolError


def test_create_write_attach_read_and_remove():
    with Arena.create("t-basic", 1 << 20) as owner:
        desc, t = owner.alloc_tensor((4, 5), torch.float32)
        t.copy_(torch.arange(20.0).reshape(4, 5))
        other = Arena.attach(owner.name)
        assert torch.equal(other.tensor(desc), torch.arange(20.0).reshape(4, 5))
        other.tensor(desc).mul_(2)  # the off-loader writes results in place
        assert float(t[3, 4]) == 38.0
        other.close()
        assert owner.path.exists()
    assert not owner.path.exists()


def test_allocator_aligns_reuses_and_merges():
    with Arena.create("t-alloc", 4096) as a:
        x = a.alloc(10)
        y = a.alloc(100)
        z = a.alloc(64)
        assert x % 64 == 0 and y % 64 == 0 and z % 64 == 0 and len({x, y, z}) == 3
        with pytest.raises(MemoryError):
            a.alloc(4096)
        a.free(y)
        a.free(x)
        a.free(z)
        assert a.bytes_in_use == 0 and a.alloc(4096) == 0


def test_descriptors_from_peers_are_checked():
    with pytest.raises(ProtocolError, match="outside"):
        Descriptor.from_wire({"offset": 60, "nbytes": 8, "dtype": "float32", "shape": [2]}, 64)
    with pytest.raises(ProtocolError, match="length"):
        Descriptor.from_wire({"offset": 0, "nbytes": 12, "dtype": "float32", "shape": [2]}, 64)
    with pytest.raises(ProtocolError):
        Descriptor.from_wire({"offset": -8, "nbytes": 8, "dtype": "float32", "shape": [2]}, 64)
    with pytest.raises(ProtocolError):
        Descriptor.from_wire({"offset": 0, "nbytes": 8, "dtype": "int64", "shape": [1]}, 64)
    ok = Descriptor.from_wire({"offset": 0, "nbytes": 8, "dtype": "float32", "shape": [2]}, 64)
    assert ok.shape == (2,)


def test_attach_refuses_foreign_names():
    for name in ("../etc/passwd", "other-1", "tempo-x-1-../../y"):
        with pytest.raises(ProtocolError):
            Arena.attach(name)


def test_stale_segments_of_dead_processes_are_cleaned():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    stale = arena_mod.SHM_DIR / segment_name("t-stale", dead_pid)
    stale.write_bytes(b"\x00" * 64)
    live = Arena.create("t-live", 64)
    try:
        removed = cleanup_stale()
        assert stale.name in removed and not stale.exists()
        assert live.path.exists()
    finally:
        live.close()


def test_segment_of_a_killed_owner_is_left_then_cleaned():
    code = (
        "import os, signal, time; from tempo.arena import Arena; a = Arena.create('t-kill', 4096); "
        "print(a.name, flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    name = proc.stdout.strip()
    assert (arena_mod.SHM_DIR / name).exists()  # SIGKILL leaves it ...
    assert name in cleanup_stale()  # ... and the next start removes it
    assert not (arena_mod.SHM_DIR / name).exists()


def test_segment_is_removed_on_ctrl_c():
    code = (
        "import time; from tempo.arena import Arena; a = Arena.create('t-int', 4096); "
        "print(a.name, flush=True); time.sleep(30)"
    )
    # SIGINT as a terminal delivers it: not ignored, even when the tests run in a background job
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    name = proc.stdout.readline().strip()
    assert (arena_mod.SHM_DIR / name).exists()
    proc.send_signal(2)  # SIGINT: KeyboardInterrupt, then atexit
    proc.wait(10)
    assert not (arena_mod.SHM_DIR / name).exists()


def test_bad_job_ids_are_refused():
    with pytest.raises(ValueError):
        Arena.create("has/slash", 64)
    with pytest.raises(ValueError):
        Arena.create("ok", 0)
    assert all(p.name.startswith("tempo-") for p in list_segments())
    assert os.getpid() > 0


def test_attach_refuses_empty_segments_and_links(tmp_path):
    """An empty file has nothing to map, and a link or a directory is no one's arena: each is a
    ProtocolError (an error reply from the off-loader), never a crash."""
    empty = arena_mod.SHM_DIR / segment_name("t-empty")
    link = arena_mod.SHM_DIR / segment_name("t-link")
    folder = arena_mod.SHM_DIR / segment_name("t-dir")
    target = tmp_path / "elsewhere"
    target.write_bytes(b"\x00" * 4096)
    try:
        empty.write_bytes(b"")
        link.symlink_to(target)
        folder.mkdir()
        for path, why in ((empty, "empty"), (link, "cannot be opened"), (folder, "cannot be opened")):
            with pytest.raises(ProtocolError, match=why):
                Arena.attach(path.name)
    finally:
        empty.unlink(missing_ok=True)
        link.unlink(missing_ok=True)
        folder.rmdir()
