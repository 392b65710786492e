"""Deployment files: the Gramine manifest renders to TOML naming what the enclave needs, and every
compose service runs a real `tempo` subcommand whose options parse."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path
from types import SimpleNamespace

import click
import jinja2
import jinja2.meta
import pytest
import yaml
from click.testing import CliRunner

import tempo
from tempo.cli import main

OPS = Path(__file__).resolve().parent.parent / "ops"
GRAMINE = OPS / "gramine"
COMPOSE_FILES = sorted((OPS / "compose").glob("compose.*.yaml"))


def _unparsed(ctx: click.Context) -> list[str]:
    """A group context's subcommand and its arguments (click 8.2 keeps the name apart)."""
    return [*getattr(ctx, "_protected_args", []), *ctx.args]


def trusted_files() -> list[str]:
    """What the Makefile passes as -Dtrusted: ops/gramine/trusted_files.py's lines, run as it runs."""
    out = subprocess.run([sys.executable, str(GRAMINE / "trusted_files.py")], capture_output=True, text=True,
                         check=True, cwd=GRAMINE).stdout
    return out.split()


def makefile_defines() -> set[str]:
    """The -D variables the Makefile passes to gramine-manifest."""
    return set(re.findall(r"-D(\w+)=", (GRAMINE / "Makefile").read_text()))


def render(tmp_path: Path, **overrides) -> dict:
    """Render the template as gramine-manifest would (Jinja with its `gramine` and `python`
    globals), with this machine's interpreter and the tempo install, and parse the TOML."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    source = (GRAMINE / "tempo.manifest.template").read_text()
    site = str(Path(tempo.__file__).resolve().parent.parent)
    job = tmp_path / "job.toml"
    job.write_text((GRAMINE / "job.toml").read_text())
    values = dict(
        gramine=SimpleNamespace(libos="/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so",
                                runtimedir=lambda: "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc"),
        python=SimpleNamespace(stdlib=sysconfig.get_paths()["stdlib"], distlib=sysconfig.get_paths()["purelib"]),
        log_level="error", arch_libdir="/lib/x86_64-linux-gnu", entrypoint=os.path.realpath(sys.executable),
        site_packages=site, job=str(job), out_dir=str(tmp_path / "out"), data_dir="", debug="true",
        edmm="false", enclave_size="16G", max_threads=64, compute_threads=8, attestation="none",
        insecure_out_key="", pool_keys_dir="", trusted=" ".join(trusted_files()),
    )
    values.update(overrides)
    return tomllib.loads(env.from_string(source).render(**values)), values


def test_the_template_uses_only_what_the_makefile_defines():
    source = (GRAMINE / "tempo.manifest.template").read_text()
    used = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(source))
    assert used - {"gramine", "python"} == makefile_defines()


def test_the_manifest_renders_to_toml_naming_what_the_enclave_needs(tmp_path):
    manifest, values = render(tmp_path)
    site, entry = values["site_packages"], values["entrypoint"]
    assert manifest["libos"]["entrypoint"] == entry
    assert manifest["loader"]["entrypoint"]["uri"] == "file:" + values["gramine"].libos
    trusted = manifest["sgx"]["trusted_files"]
    for needed in (entry, values["python"].stdlib + "/", values["job"]):
        assert "file:" + needed in trusted, needed
    assert "file:" + site + "/" not in trusted  # not every installed package: what the enclave imports
    # tempo's trusted parts and every dependency it imports in the enclave lie in a trusted path
    import click, msgpack, numpy, structlog, torch, zmq  # noqa: E401
    from tempo import session
    from tempo.core import keys
    from tempo.enclave import private
    paths = [t.removeprefix("file:") for t in trusted]
    for module in (tempo, session, keys, private, torch, numpy, zmq, msgpack, structlog, click):
        path = str(Path(module.__file__).resolve())
        assert any(path == p or (p.endswith("/") and path.startswith(p)) for p in paths), (module.__name__, path)
    root = str(Path(tempo.__file__).resolve().parent)
    for untrusted in ("relay/", "offloader/", "cluster.py", "audit/", "bench/"):  # the host's, never measured in
        assert not any(p.startswith(f"{root}/{untrusted}") for p in paths), untrusted
    mounts = {m["path"]: m for m in manifest["fs"]["mounts"]}
    assert mounts["/dev/shm/"]["type"] == "untrusted_shm"  # the arena
    assert mounts["/tempo/out"]["type"] == "encrypted"  # the trained model leaves sealed
    assert mounts["/tempo/job.toml"]["uri"] == "file:" + values["job"]
    assert "dev:/dev/shm/" in manifest["sgx"]["allowed_files"]
    size = manifest["sgx"]["enclave_size"]
    number = int(size[:-1]) * {"M": 1 << 20, "G": 1 << 30}[size[-1]]
    assert number & (number - 1) == 0, "SGX enclave sizes are powers of two"
    assert manifest["sgx"]["max_threads"] >= 16
    assert manifest["loader"]["env"]["TEMPO_ENCLAVE_OFFLOADER"] == {"passthrough": True}
    assert "fs" in manifest and "insecure__keys" not in manifest["fs"]


def test_the_manifest_command_is_tempo_enclave_and_parses(tmp_path):
    manifest, values = render(tmp_path)
    argv = manifest["loader"]["argv"]
    assert argv[:3] == [values["entrypoint"], "-m", "tempo"]
    job = tmp_path / "stand-in-job.toml"  # /tempo/job.toml exists inside the enclave only
    job.write_text("")
    assert argv[argv.index("--config") + 1] == "/tempo/job.toml"
    argv = [str(job) if a == "/tempo/job.toml" else a for a in argv]
    ctx = main.make_context("tempo", argv[3:])
    name, cmd, rest = main.resolve_command(ctx, _unparsed(ctx))
    assert name == "enclave"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEMPO_ENCLAVE_OFFLOADER", "tcp://127.0.0.1:5556")
        sub = cmd.make_context(name, rest, parent=ctx)
    assert sub.params["config"] == str(job) and sub.params["out"] == "/tempo/out"
    assert sub.params["offloader"] == "tcp://127.0.0.1:5556"


def test_the_manifest_options_render(tmp_path):
    data = tmp_path / "cifar"
    data.mkdir()
    manifest, _ = render(tmp_path, data_dir=str(data), insecure_out_key="00" * 16)
    assert "file:" + str(data) + "/" in manifest["sgx"]["trusted_files"]
    assert manifest["fs"]["insecure__keys"]["tempo_out"] == "00" * 16


def test_the_shipped_job_file_is_a_valid_job():
    from tempo.train import load_job

    cfg = load_job(GRAMINE / "job.toml")
    assert cfg.model == "cnn" and cfg.relays == 2


def test_job_files_with_mistakes_are_refused(tmp_path):
    from tempo.train import load_job

    cases = {"epochs = 'five'": "epochs must be a whole number", "modle = 'cnn'": "unknown key", "pipeline = 1": "true or false",
             "epochs = [": "not valid TOML"}
    for text, message in cases.items():
        path = tmp_path / "job.toml"
        path.write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            load_job(path)
    assert load_job(GRAMINE / "job.toml", epochs=1).epochs == 1  # an override wins


# -- compose --


def services():
    for path in COMPOSE_FILES:
        doc = yaml.safe_load(path.read_text())
        for name, service in doc["services"].items():
            yield path.name, name, service


def test_there_are_local_network_and_shares_compose_files():
    assert {p.name for p in COMPOSE_FILES} == {"compose.local.yaml", "compose.network.yaml", "compose.shares.yaml"}


def test_the_shares_set_up_puts_each_pool_on_its_own_network_with_its_own_key():
    doc = yaml.safe_load((OPS / "compose" / "compose.shares.yaml").read_text())
    pools = {}
    for name, service in doc["services"].items():
        env = service.get("environment") or {}
        if "TEMPO_RELAY_POOL" in env:
            pools[env["TEMPO_RELAY_POOL"]] = (tuple(service["networks"]), env["TEMPO_RELAY_POOL_KEY"])
    assert sorted(pools) == ["p1", "p2", "p3"]
    networks = [n for n, _ in pools.values()]
    assert all(len(n) == 1 for n in networks) and len({n[0] for n in networks}) == 3  # no pool reaches another
    assert len({k for _, k in pools.values()}) == 3
    job = tomllib.loads((OPS / "gramine" / "job-shares.toml").read_text())["job"]
    assert job["protection"] == "shares" and job["pool_keys"] == "/tempo/pool-keys"


def test_the_manifest_mounts_pool_keys_encrypted_when_asked(tmp_path):
    manifest, _ = render(tmp_path, pool_keys_dir=str(tmp_path / "pool-keys"))
    mounts = {m["path"]: m for m in manifest["fs"]["mounts"]}
    assert mounts["/tempo/pool-keys"]["type"] == "encrypted" and mounts["/tempo/pool-keys"]["key_name"] == "tempo_pools"
    plain, _ = render(tmp_path)
    assert "/tempo/pool-keys" not in {m["path"] for m in plain["fs"]["mounts"]}


@pytest.mark.parametrize("where,name,service", list(services()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_service_runs_a_tempo_subcommand_whose_options_parse(where, name, service, monkeypatch, tmp_path):
    command = service["command"]
    assert isinstance(command, list) and command[0] == "tempo", f"{where}:{name} must run tempo"
    env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
    for key in list(os.environ):
        if key.startswith("TEMPO_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = command[1:]
    if service.get("entrypoint") == ["run-enclave"]:
        # under Gramine the command is the manifest's (measured) and only passthrough variables
        # reach it: check exactly that
        manifest, _ = render(tmp_path)
        argv = manifest["loader"]["argv"][3:]
        assert argv[:3] == ["--log-format", "json", "enclave"] and command == ["tempo", "enclave"]
        passthrough = {k for k, v in manifest["loader"]["env"].items() if v == {"passthrough": True}}
        assert set(env) <= passthrough, f"{where}:{name}: {set(env) - passthrough} never reach the enclave"
        stand_in = tmp_path / "job.toml"
        args = [str(stand_in) if a == "/tempo/job.toml" else a for a in argv]
    ctx = main.make_context("tempo", args)
    sub_name, cmd, rest = main.resolve_command(ctx, _unparsed(ctx))
    if isinstance(cmd, type(main)):  # a group such as `keys`
        inner = cmd.make_context(sub_name, rest, parent=ctx)
        sub_name, cmd, rest = cmd.resolve_command(inner, _unparsed(inner))
        ctx = inner
    prefix = f"TEMPO_{sub_name.upper()}_"
    options = {p.name.upper() for p in cmd.params}
    for key in env:
        if key.startswith("TEMPO_"):
            assert key.startswith(prefix) and key[len(prefix):] in options, (
                f"{where}:{name}: {key} is not an option of tempo {sub_name}")
    # files the environment names (keys, job files) live in the containers: stand-ins here
    for param in cmd.params:
        key = prefix + param.name.upper()
        if isinstance(param.type, click.Path) and key in env:
            stand_in = tmp_path / key
            stand_in.mkdir() if not param.type.file_okay else stand_in.write_text("")
            monkeypatch.setenv(key, str(stand_in))
    cmd.make_context(sub_name, rest, parent=ctx)
    help_run = CliRunner().invoke(main, [*command[1:2], "--help"])
    assert help_run.exit_code == 0, help_run.output


def compose_command() -> tuple[list[str] | None, str]:
    """A compose implementation that works here, found by asking it for its version
    (`docker compose version`, then `docker-compose version`), never by parsing the error of a
    real command; ``(None, why)`` when there is none."""
    tried = []
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            tried.append(f"{' '.join(cmd)}: {cmd[0]} not found")
            continue
        try:
            probe = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{' '.join(cmd)} version: {exc}")
            continue
        if probe.returncode == 0:
            return cmd, ""
        tried.append(f"{' '.join(cmd)} version exited {probe.returncode}")
    return None, "no usable compose implementation (" + "; ".join(tried) + ")"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_validate_against_the_compose_specification(path):
    cmd, why = compose_command()
    if cmd is None:
        pytest.skip(why)
    result = subprocess.run([*cmd, "-f", str(path), "config", "-q"], capture_output=True, text=True,
                            cwd=path.parent, timeout=120)
    assert result.returncode == 0, result.stderr
