"""The trust boundary, in the code: what each trusted package may import.

Read from the source (every import statement, at module level or inside a function), so an
import that only runs on some path counts as much as one at the top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "tempo"
STDLIB = set(sys.stdlib_module_names)

# package -> (third-party top-level modules, tempo modules) it may import; the standard library
# is always allowed. The core: the mathematics the guarantees rest on, nothing that does I/O.
# The enclave: the core, the wire format and the arena (its one channel out), and nothing that
# starts, serves or attacks a process (tempo.cluster, tempo.relay, tempo.offloader, tempo.audit).
# `cryptography`: AES, the shares' counter-mode randomness (a vetted implementation, not our own).
RULES = {
    "core": ({"torch", "numpy", "cryptography"}, ("tempo.core",)),
    "enclave": ({"torch", "numpy", "zmq", "msgpack"}, ("tempo.core", "tempo.enclave", "tempo.protocol", "tempo.arena")),
}


def imports_of(path: Path, root: Path = ROOT.parent) -> list[tuple[int, str]]:
    """Every module `path` (a file under `root`, the folder holding tempo/) imports, as absolute
    names, with the line it is on."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            if name == "__future__":
                continue
            # `from tempo.core import keys` imports tempo.core.keys: check the submodules too
            found += [(node.lineno, f"{name}.{alias.name}" if name in {"tempo", "tempo.core", "tempo.enclave"}
                       else name) for alias in node.names]
    return found


def allowed(name: str, third_party: set[str], tempo: tuple[str, ...]) -> bool:
    top = name.split(".")[0]
    if top == "tempo":
        return any(name == t or name.startswith(t + ".") for t in tempo)
    return top in STDLIB or top in third_party


@pytest.mark.parametrize("package", sorted(RULES))
def test_each_trusted_package_imports_only_what_its_rule_allows(package):
    third_party, tempo = RULES[package]
    files = sorted((ROOT / package).glob("*.py"))
    assert files
    bad = [f"{f.relative_to(ROOT.parent)}:{line}: {name}" for f in files for line, name in imports_of(f)
           if not allowed(name, third_party, tempo)]
    assert not bad, "imports outside the trust boundary:\n" + "\n".join(bad)


def test_the_rule_reads_function_level_and_relative_imports(tmp_path):
    """The checker itself: an import inside a function, and a relative one, are found."""
    probe = tmp_path / "tempo" / "core" / "_probe_for_test.py"  # never in the source tree
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    import zmq\n    from ..cluster import LocalCluster\n")
    names = [n for _, n in imports_of(probe, tmp_path)]
    assert names == ["zmq", "tempo.cluster"]
    assert not allowed("tempo.cluster", *RULES["core"]) and not allowed("zmq", *RULES["core"])
    assert allowed("tempo.core.keys", *RULES["core"]) and allowed("hashlib", *RULES["core"])


def test_the_enclave_processs_entry_modules_load_nothing_that_starts_or_serves_processes():
    """Importing what `tempo enclave` (the process Gramine runs) starts from loads no relay,
    off-loader, local cluster, audit or bench code. (Imports inside functions on its path are
    held by the rules above for the core and the enclave package, not run here.)"""
    code = ("import sys, tempo.cli, tempo.train, tempo.session, tempo.enclave.client, tempo.enclave.pools;"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('tempo'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "tempo.core.keys" in out and "tempo.enclave.private" in out
    leaked = [m for m in out if {"cluster", "relay", "offloader", "audit", "bench"} & set(m.split(".")[1:2])]
    assert not leaked, leaked


def test_every_tempo_module_any_file_imports_exists():
    """A module moved (tempo/core, tempo/train.py) leaves no import behind that would only fail
    on the path that runs it (a relay's sealed request, a lazy import in a handler)."""
    import importlib.util

    missing = []
    for f in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]  # what it takes from the module may be a function or class
            else:
                continue
            missing += [f"{f.relative_to(ROOT.parent)}:{node.lineno}: {n}" for n in names
                        if n.split(".")[0] == "tempo" and importlib.util.find_spec(n) is None]
    assert not missing, missing
