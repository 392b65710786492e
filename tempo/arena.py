"""Shared-memory arena between the enclave and the off-loader (SPEC §6).

One POSIX shared-memory segment per job, a file under ``/dev/shm`` named
``tempo-<job>-<pid>`` (Gramine maps it as untrusted shared memory). The enclave owns it: it
allocates regions, writes encrypted operands there, and reads results back. The off-loader
attaches by name and reads and writes only the regions a descriptor names, after checking them
against the segment's size.

The owner removes the segment when it closes, at interpreter exit, and on SIGINT/SIGTERM; a
segment left by a process that died (SIGKILL, a crash) is removed by the next `cleanup_stale`
(every `tempo` process start runs it, and `tempo cleanup` does it by hand).
"""

from __future__ import annotations

import atexit
import bisect
import mmap
import os
import re
import stat
import threading
import weakref
from pathlib import Path

import torch

# Descriptor lives with the rest of the wire format; importable from here as before
from tempo.protocol import DTYPES, Descriptor, ProtocolError

__all__ = ["Arena", "Descriptor", "cleanup_stale", "list_segments", "segment_name"]

SHM_DIR = Path(os.environ.get("TEMPO_SHM_DIR", "/dev/shm"))
PREFIX = "tempo-"
ALIGN = 64  # cache-line aligned regions
_NAME_RE = re.compile(r"^tempo-([A-Za-z0-9_.-]{1,64})-(\d+)$")


def segment_name(job: str, pid: int | None = None) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", job):
        raise ValueError(f"job id {job!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return f"{PREFIX}{job}-{pid if pid is not None else os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_segments() -> list[Path]:
    """Tempo segments under the shared-memory directory."""
    if not SHM_DIR.is_dir():
        return []
    return sorted(p for p in SHM_DIR.iterdir() if _NAME_RE.match(p.name))


def cleanup_stale(all_segments: bool = False) -> list[str]:
    """Remove segments whose owner process is gone (or every tempo segment); return their names."""
    removed = []
    for path in list_segments():
        pid = int(_NAME_RE.match(path.name).group(2))
        if all_segments or not _pid_alive(pid):
            try:
                path.unlink()
                removed.append(path.name)
            except FileNotFoundError:
                pass
    return removed


_OWNED: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _remove_owned() -> None:
    for arena in list(_OWNED):
        arena.close()



class ArenaFull(MemoryError):
    """The arena has no room for a tensor: the job needs a larger one (its size is a setting)."""

class Arena:
    """A shared-memory segment with a first-fit allocator (owner side) or a view (attached)."""

    def __init__(self, path: Path, size: int, owner: bool, fd: int) -> None:
        self.path = path
        self.size = size
        self.owner = owner
        self._fd = fd
        self._mm = mmap.mmap(fd, size) if size else None
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, size)]  # sorted (offset, length)
        self._used: dict[int, int] = {}
        self._closed = False
        if owner:
            _OWNED.add(self)

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, job: str, size: int) -> Arena:
        """Create this process's segment for `job` (owner: it allocates, and removes it at the end)."""
        if size <= 0:
            raise ValueError("arena size must be positive")
        path = SHM_DIR / segment_name(job)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return cls(path, size, True, fd)

    @classmethod
    def attach(cls, name: str) -> Arena:
        """Attach to an existing segment by name (the off-loader's side).

        Only a non-empty regular file is a segment: an empty one has nothing to map (and no
        region could lie in it), and a link or a device is no one's arena."""
        if not _NAME_RE.match(name):
            raise ProtocolError(f"{name!r} is not a tempo arena name")
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ProtocolError(f"arena {name} does not exist") from None
        except OSError as exc:
            raise ProtocolError(f"arena {name} cannot be opened: {exc.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            os.close(fd)
            raise ProtocolError(f"arena {name} is {'empty' if stat.S_ISREG(info.st_mode) else 'not a file'}")
        return cls(path, info.st_size, False, fd)

    # -- allocation (owner) --
    def alloc(self, nbytes: int) -> int:
        """Reserve `nbytes` (64-byte aligned); return the offset. Raises MemoryError when full."""
        need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        with self._lock:
            for i, (off, length) in enumerate(self._free):
                if length >= need:
                    if length == need:
                        self._free.pop(i)
                    else:
                        self._free[i] = (off + need, length - need)
                    self._used[off] = need
                    return off
        raise ArenaFull(f"the shared-memory arena {self.name} ({self.size >> 20} MiB) has no free region of "
                        f"{nbytes:,} bytes: give it more (--arena-mb, or arena_mb in the job)")

    def free(self, offset: int) -> None:
        """Return a region; neighbours are merged."""
        with self._lock:
            length = self._used.pop(offset)
            i = bisect.bisect(self._free, (offset, length))
            self._free.insert(i, (offset, length))
            # merge with next, then previous
            if i + 1 < len(self._free) and self._free[i][0] + self._free[i][1] == self._free[i + 1][0]:
                self._free[i] = (self._free[i][0], self._free[i][1] + self._free[i + 1][1])
                self._free.pop(i + 1)
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == self._free[i][0]:
                self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
                self._free.pop(i)

    @property
    def bytes_in_use(self) -> int:
        with self._lock:
            return sum(self._used.values())

    def alloc_tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Descriptor, torch.Tensor]:
        """Allocate a region for a tensor; return its descriptor and a tensor viewing it."""
        nbytes = Descriptor.at(0, shape, dtype).nbytes  # the wire form is the protocol's (it checks the dtype)
        desc = Descriptor.at(self.alloc(nbytes), shape, dtype)
        return desc, self.tensor(desc)

    # -- access (both sides) --
    def tensor(self, desc: Descriptor) -> torch.Tensor:
        """A tensor viewing the region (no copy). The descriptor must lie inside the arena."""
        if self._closed:
            raise ValueError("arena is closed")
        desc.inside(self.size)
        dtype = DTYPES[desc.dtype]
        if desc.nbytes == 0:
            return torch.empty(desc.shape, dtype=dtype)
        flat = torch.frombuffer(self._mm, dtype=torch.uint8, count=desc.nbytes, offset=desc.offset)
        return flat.view(dtype).reshape(desc.shape)

    def buffer(self, desc: Descriptor) -> memoryview:
        """The region's bytes as a memoryview (to send as a frame without a copy)."""
        desc.inside(self.size)
        return memoryview(self._mm)[desc.offset : desc.offset + desc.nbytes]

    def close(self) -> None:
        """Unmap; the owner also removes the segment. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._mm is not None:
                try:
                    self._mm.close()
                except BufferError:
                    pass  # views still exported; the mapping goes with the process
            os.close(self._fd)
        finally:
            if self.owner:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
