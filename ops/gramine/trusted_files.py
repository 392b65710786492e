"""Print the files Gramine must trust for `tempo enclave`, one path per line (a directory ends in /).

What the enclave process imports, and nothing else: the tempo modules it loads (the trusted core,
the enclave package, the protocol, the data set, the session and training loop, the command
line), and the directories of the third-party packages they pull in (torch, numpy, pyzmq,
msgpack, cryptography, structlog, click and what those load). Not the relay, the off-loader, the
local cluster, the audit or the benchmarks: the host's copies of those are never measured into
the enclave. The standard library is trusted as a whole by the manifest itself.

    python ops/gramine/trusted_files.py     # the Makefile passes the list as -Dtrusted
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import sysconfig
from pathlib import Path

ENTRY = ("tempo.cli", "tempo.session", "tempo.train", "tempo.progress", "tempo.report")
PACKAGES = ("tempo.core", "tempo.enclave", "tempo.protocol", "tempo.data")  # trusted whole (data: its files)
NEVER = ("tempo.relay", "tempo.offloader", "tempo.cluster", "tempo.audit", "tempo.bench")


def enclave_modules() -> None:
    """Import what the enclave process runs, including what its code imports lazily."""
    for name in ENTRY:
        importlib.import_module(name)
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, package + "."):
            importlib.import_module(info.name)
    from tempo.core.shares import Randomness

    Randomness().uniform((1,))  # loads the AES backend
    import tempo.memory  # noqa: F401 - tempo.cli.main imports it on every command
    import tqdm  # noqa: F401 - the progress bar, on a terminal
    import torch

    w = torch.nn.Parameter(torch.ones(2))  # torch loads more (sympy, mpmath) once optimizers step
    for opt in (torch.optim.SGD([w], lr=0.1, momentum=0.9), torch.optim.AdamW([w])):
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 2)
        w.grad = torch.ones(2)
        opt.step()
        sched.step()


def trusted_paths() -> list[str]:
    enclave_modules()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    import tempo

    root = Path(tempo.__file__).resolve().parent
    paths = {str(root / "__main__.py")}
    paths |= {str(root.joinpath(*p.split(".")[1:])) + "/" for p in PACKAGES}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file or name in ("__main__", "__mp_main__"):
            continue
        path = Path(file).resolve()
        if name == "tempo" or name.startswith("tempo."):
            if any(name == n or name.startswith(n + ".") for n in NEVER):
                raise SystemExit(f"the enclave imports {name}, which it must not")
            if not any(name == p or name.startswith(p + ".") for p in PACKAGES):
                paths.add(str(path))
            continue
        if path.is_relative_to(stdlib) and "site-packages" not in path.parts:
            continue
        top = sys.modules.get(name.split(".")[0])
        top_file = Path(getattr(top, "__file__", None) or file).resolve()
        if top_file.name == "__init__.py":  # a package: its directory, and its vendored libraries
            paths.add(str(top_file.parent) + "/")
            for libs in (f"{top_file.parent.name}.libs", f"py{top_file.parent.name}.libs"):  # numpy.libs, pyzmq.libs
                if top_file.parent.with_name(libs).is_dir():
                    paths.add(str(top_file.parent.with_name(libs)) + "/")
        else:
            paths.add(str(top_file))
    return sorted(paths)


if __name__ == "__main__":
    print("\n".join(trusted_paths()))
