"""The `tempo` command: one click group, a subcommand per process and tool."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tempo import __version__
from tempo.enclave import protection
from tempo.log import LOG_FORMATS, configure_logging

_DTYPES = {"float32": "float32", "float64": "float64"}


@click.group(context_settings={"auto_envvar_prefix": "TEMPO", "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tempo")
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="auto",
    show_default=True,
    help="JSON lines, or console text for people (auto: console on a TTY).",
)
@click.option("--log-level", default="info", show_default=True, help="debug, info, warning, error.")
@click.pass_context
def main(ctx: click.Context, log_format: str, log_level: str) -> None:
    """Tempo: confidential neural-network training on untrusted GPUs (arXiv 2401.11531)."""
    from tempo.memory import keep_freed_memory

    keep_freed_memory()  # large tensors come and go every product: reuse their pages (tempo.memory)
    ctx.obj = {"log_format": log_format, "log_level": log_level}


def _logger(ctx: click.Context, role: str, **ids):
    return configure_logging(role, ctx.obj["log_format"], ctx.obj["log_level"], **ids)


@main.command()
@click.option("--trials", default=200, show_default=True, type=click.IntRange(1), help="Random products to check.")
@click.option("--max-dim", default=256, show_default=True, type=click.IntRange(1), help="Largest m, n or p.")
@click.option("--rounds", default=16, show_default=True, type=click.IntRange(1), help="Freivalds rounds per check.")
@click.option("--bench/--no-bench", default=True, show_default=True, help="Also run a small obfuscation benchmark.")
@click.pass_context
def selfcheck(ctx: click.Context, trials: int, max_dim: int, rounds: int, bench: bool) -> None:
    """Check the MM-obfuscation round trip end to end: encrypt, multiply, decrypt, verify,
    backward key-shift reuse against autograd, and tamper detection."""
    from tempo.core import obfuscation
    from tempo.enclave import selfcheck as sc

    log = _logger(ctx, "selfcheck")
    log.info("selfcheck.start", trials=trials, max_dim=max_dim, backend=obfuscation.default_backend())
    step = max(1, trials // 10)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            click.echo(f"  {done}/{total} products checked", err=True)

    report = sc.run(trials=trials, max_dim=max_dim, rounds=rounds, progress=progress)
    click.echo(
        f"selfcheck: {report.trials} random products (forward, backward, tamper) in "
        f"{report.seconds:.1f}s; max relative error {report.max_rel_error:.2e}; "
        f"{report.tamper_detected}/{report.trials} tampered results rejected; "
        f"backend={obfuscation.default_backend()}"
    )
    for failure in report.failures:
        click.echo(f"FAIL {failure}")
    log.info("selfcheck.done", ok=report.ok, failures=len(report.failures), seconds=round(report.seconds, 3))
    if not report.ok:
        sys.exit(1)
    if bench:
        from tempo.bench import obfuscation as bench_obf

        # The reference size (272 MiB of operands): small sizes are all overhead.
        click.echo("benchmark (tempo bench obfuscation --m 4096 --n 8192 --p 256 --repeat 7):", err=True)
        figures = bench_obf.run(4096, 8192, 256, repeat=7)
        click.echo(bench_obf.table(figures))


JSON = click.option("--json", "json_path", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
                    help="Also write the figures as JSON: to FILE, or with no FILE (or '-') as the last line of stdout.")


def _emit_json(figures: dict, json_path: str | None) -> None:
    """The one meaning of --json on every bench command."""
    if json_path == "-":
        click.echo(json.dumps(figures))
    elif json_path:
        with open(json_path, "w") as f:
            json.dump(figures, f, indent=2)
        click.echo(f"figures: {json_path}")


@main.group()
def bench() -> None:
    """Benchmarks that print figures measured in one run (ratios, never timed assertions)."""


@bench.command("obfuscation")
@click.option("--m", "m", default=4096, show_default=True, type=click.IntRange(1), help="Rows of A and C.")
@click.option("--n", "n", default=8192, show_default=True, type=click.IntRange(1), help="Columns of A, rows of B.")
@click.option("--p", "p", default=256, show_default=True, type=click.IntRange(1), help="Columns of B and C.")
@click.option("--dtype", type=click.Choice(sorted(_DTYPES)), default="float32", show_default=True, help="Element type.")
@click.option("--repeat", default=15, show_default=True, type=click.IntRange(1), help="Repetitions (medians).")
@click.option("--rounds", default=20, show_default=True, type=click.IntRange(1), help="Freivalds rounds.")
@click.option("--backend", type=click.Choice(["auto", "c", "torch"]), default="auto", show_default=True,
              help="The masking kernel: the C kernel, the pure-torch fallback, or whichever is built (auto).")
@JSON
@click.pass_context
def bench_obfuscation(
    ctx: click.Context, m: int, n: int, p: int, dtype: str, repeat: int, rounds: int, backend: str, json_path
) -> None:
    """Encrypt, decrypt, verify and the plain matmul against plain copies of the same bytes."""
    import torch

    from tempo.bench import obfuscation as bench_obf

    log = _logger(ctx, "bench")
    nbytes = torch.tensor([], dtype=getattr(torch, dtype)).element_size() * (2 * m * n + 2 * n * p + 3 * m * p)
    log.info("bench.obfuscation.start", m=m, n=n, p=p, dtype=dtype, mib=round(nbytes / 2**20, 1))
    figures = bench_obf.run(
        m, n, p, getattr(torch, dtype), repeat=repeat, rounds=rounds,
        backend=None if backend == "auto" else backend,
        progress=lambda msg: log.debug("bench.progress", msg=msg),
    )
    click.echo(bench_obf.table(figures))
    _emit_json(figures.as_dict(), json_path)


def _install_signal_handlers(parent_pid: int | None = None):
    """SIGTERM, SIGINT and SIGHUP end the process cleanly (sockets closed, arenas removed).
    Returns ``stop()``, true once a signal came or, with `parent_pid`, once that process is gone
    (the liveness check of processes a `LocalCluster` started: they die with their job)."""
    import os
    import signal

    state = {"stop": False}

    def handler(signum, frame):  # noqa: ARG001
        if state["stop"]:  # second signal: leave now
            raise SystemExit(128 + signum)
        state["stop"] = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)

    def stop() -> bool:
        return state["stop"] or (parent_pid is not None and os.getppid() != parent_pid)

    return stop


PARENT_PID = click.option("--parent-pid", default=None, type=int, hidden=True,
                          help="Exit once this process (the one that started this one) is gone.")


@main.command()
@click.option("--relay-bind", default="tcp://127.0.0.1:5555", show_default=True, help="Where relays connect (tcp).")
@click.option("--enclave-bind", default="ipc:///tmp/tempo-offloader.ipc", show_default=True, help="Where the enclave connects.")
@click.option("--heartbeat-timeout", default=3.0, show_default=True, type=click.FloatRange(0.1), help="Seconds of relay silence before its parts are re-dispatched.")
@click.option("--max-frame-mb", default=1024, show_default=True, type=click.IntRange(1), help="Largest tensor frame accepted.")
@click.option("--max-inflight", default=64, show_default=True, type=click.IntRange(1), help="Outstanding parts per relay; more wait.")
@click.option("--input-digest/--no-input-digest", default=True, show_default=True,
              help="Bind each request to a SHA-256 of its inputs (relays check it); costs hashing bandwidth.")
@click.option("--curve-secret", default=None, type=click.Path(exists=True, dir_okay=False), help="CURVE: the off-loader's secret key file.")
@click.option("--curve-allow", default=None, type=click.Path(exists=True, file_okay=False), help="CURVE: directory of allowed relays' public keys.")
@PARENT_PID
@click.option("--cleanup-dir", default=None, hidden=True, help="A work directory to remove on exit (LocalCluster's).")
@click.pass_context
def offloader(ctx: click.Context, relay_bind: str, enclave_bind: str, heartbeat_timeout: float, max_frame_mb: int,
              max_inflight: int, input_digest: bool, curve_secret: str | None, curve_allow: str | None,
              parent_pid: int | None, cleanup_dir: str | None) -> None:
    """Run the off-loader: between the enclave's arena and the relays."""
    from tempo.arena import cleanup_stale
    from tempo.offloader import Offloader

    log = _logger(ctx, "offloader")
    removed = cleanup_stale()
    if removed:
        log.info("offloader.stale_segments_removed", segments=removed)
    stop = _install_signal_handlers(parent_pid)
    try:
        server = Offloader(relay_bind, enclave_bind, heartbeat_timeout, max_frame_mb << 20, log=log,
                           curve_secret=curve_secret, curve_allow=curve_allow, max_inflight=max_inflight,
                           input_digest=input_digest)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if curve_secret:
        log.info("offloader.curve", allow=curve_allow)

    def ready(relays: str, enclave: str) -> None:
        click.echo(f"offloader listening: relays {relays} enclave {enclave}", err=True)

    try:
        server.run(stop=stop, ready=ready)
    finally:
        if cleanup_dir:
            import shutil

            shutil.rmtree(cleanup_dir, ignore_errors=True)
        # a job whose enclave died without a word (SIGKILL) leaves its segment: remove it now
        removed = cleanup_stale()
        if removed:
            log.info("offloader.stale_segments_removed", segments=removed)
    log.info("offloader.stopped", **server.stats)


@main.command()
@click.option("--connect", default="tcp://127.0.0.1:5555", show_default=True, help="The off-loader's relay endpoint.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:i.")
@click.option("--cache-mb", default=1024, show_default=True, type=click.IntRange(0), help="Bound on cached operands.")
@click.option("--heartbeat", default=0.5, show_default=True, type=click.FloatRange(0.01), help="Seconds between heartbeats.")
@click.option("--max-frame-mb", default=1024, show_default=True, type=click.IntRange(1), help="Largest tensor frame accepted.")
@click.option("--name", default=None, help="The relay's name in logs and quarantine reports (default host:pid).")
@click.option("--fault", default=None, help="Misbehave on purpose (tests, demos): corrupt|nan|lazy|slow|drop|crash|malformed|noise[:RATE].")
@click.option("--curve-secret", default=None, type=click.Path(exists=True, dir_okay=False), help="CURVE: this relay's secret key file.")
@click.option("--curve-server-key", default=None, type=click.Path(exists=True, dir_okay=False), help="CURVE: the off-loader's public key file (pinned).")
@click.option("--record", "record_dir", default=None, type=click.Path(file_okay=False),
              help="Write every request's op, binding and tensors to DIR/<name>/ (audits: what the cloud "
                   "receives; off by default).")
@click.option("--pool", default=None, help="Serve the shares mode as a member of this pool (with --pool-key); "
                                         "a pool member serves nothing else.")
@click.option("--pool-key", default=None, type=click.Path(exists=True, dir_okay=False),
              help="The pool's key file (hex, 16 bytes): requests are sealed under it.")
@PARENT_PID
@click.pass_context
def relay(ctx: click.Context, connect: str, device: str, cache_mb: int, heartbeat: float, max_frame_mb: int,
          name: str | None, fault: str | None, curve_secret: str | None, curve_server_key: str | None,
          record_dir: str | None, pool: str | None, pool_key: str | None, parent_pid: int | None) -> None:
    """Run a relay: multiply masked operands on DEVICE for the off-loader at CONNECT."""
    import os

    from tempo.relay import Fault, Relay

    name = name or f"{os.uname().nodename}:{os.getpid()}"
    log = _logger(ctx, "relay", relay=name)
    stop = _install_signal_handlers(parent_pid)
    try:
        from tempo.protocol.sealed import read_key

        if (pool is None) != (pool_key is None):
            raise ValueError("--pool and --pool-key go together")
        injected = Fault.parse(fault) if fault else None
        worker = Relay(connect, device, cache_mb << 20, heartbeat, max_frame_mb << 20, log=log, name=name,
                       fault=injected, curve_secret=curve_secret, curve_server_key=curve_server_key,
                       record_dir=record_dir, pool=pool, pool_key=read_key(pool_key) if pool_key else None)
    except (RuntimeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    worker.run(stop=stop)
    log.info("relay.stopped", served=worker.served, cache_evictions=worker.cache.evicted)


@main.command()
@click.option("--all", "all_segments", is_flag=True, help="Remove every tempo segment, not only those of dead processes.")
@click.pass_context
def cleanup(ctx: click.Context, all_segments: bool) -> None:
    """Remove shared-memory segments left by tempo processes that died."""
    from tempo.arena import cleanup_stale

    removed = cleanup_stale(all_segments)
    click.echo(f"removed {len(removed)} segment(s)" + (": " + " ".join(removed) if removed else ""))


@bench.command("transport")
@click.option("--relays", default=2, show_default=True, type=click.IntRange(1, 16), help="Local CPU relays to start.")
@click.option("--mb", default=16.0, show_default=True, type=click.FloatRange(0.01, 4096), help="MiB of operands per relay per round.")
@click.option("--rounds", default=20, show_default=True, type=click.IntRange(1), help="Timed rounds (median).")
@click.option("--input-digest/--no-input-digest", default=True, show_default=True, help="As the off-loader's option.")
@JSON
@click.pass_context
def bench_transport(ctx: click.Context, relays: int, mb: float, rounds: int, input_digest: bool, json_path) -> None:
    """Round trips of masked operands through a real off-loader and relays vs a plain copy."""
    from tempo.bench import transport

    log = _logger(ctx, "bench")
    log.info("bench.transport.start", relays=relays, mb=mb, rounds=rounds)
    try:
        figures = transport.run(relays, mb, rounds, progress=lambda m: log.debug("bench.progress", msg=m),
                                input_digest=input_digest)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(transport.table(figures))
    _emit_json(figures.as_dict(), json_path)


MODEL_CHOICES = click.Choice(["mlp", "cnn", "resnet18", "resnet50", "vit"])
# options `train` and `bench train` share
PIPELINE = click.option("--pipeline/--no-pipeline", default=True, show_default=True,
                        help="Overlap masking, relay compute and unmasking across a product's parts, and ship the "
                             "next layer's masked weights ahead (off: one part after another).")
SPLIT_MIN_MB = click.option("--split-min-mb", default=4.0, show_default=True, type=click.FloatRange(0),
                            help="Split a product across the relays only when its operands and result reach this "
                                 "size (0 over slow links: every product split).")


# what relays see: a preset, and options on top of it (tempo.enclave.protection)
MASKING = click.option("--masking", type=click.Choice(list(protection.PRESETS)), default=protection.DEFAULT,
                       show_default=True, help="Masking preset: paper (the paper's scheme), head (classifier in the "
                       "enclave), edges (first layer and head in the enclave), mixed (edges, keys that mix "
                       "blocks of 16 positions, a convolution's patches as one matrix). README: what a relay learns.")
KEY_SPACE = click.option("--key-space", default=None,
                         help="Key coefficients: int:K (the paper's), signed-int:K, continuous:K (default: the preset's).")
MIX = click.option("--mix", default=None, type=click.IntRange(0),
                   help="Mix blocks of this many positions of every axis with random orthogonal matrices (0: none; "
                        "default: the preset's).")
KEEP = click.option("--keep", default=None,
                    help="Layers computed in the enclave instead of offloaded: first, last, first,last or none "
                         "(default: the preset's).")


# AsymML's knobs (tempo.core.asymml.AsymmlConfig; defaults from the authors' code, clip ours)
ASYMML_OPTIONS = (
    click.option("--asymml-energy", default=0.9, show_default=True, type=click.FloatRange(0, 1),
                 help="asymml: share of each input's energy its low-rank part (computed in the enclave) keeps."),
    click.option("--asymml-rank", default=None, type=click.IntRange(1),
                 help="asymml: at most this many principal channels in the low-rank part (default: as many as the energy needs)."),
    click.option("--asymml-noise", default=0.1, show_default=True, type=click.FloatRange(0),
                 help="asymml: noise-to-signal ratio z (the authors' nsr): N(0, (z·clip)²) on every entry of "
                      "each clipped residual, a noise of norm about z times the clipping norm."),
    click.option("--asymml-clip", default=0.25, show_default=True, type=click.FloatRange(0, min_open=True),
                 help="asymml: each sample's residual of d entries is clipped to L2 norm clip·√d (a root mean "
                      "square of at most clip per entry: the DP sensitivity's bound)."),
    click.option("--asymml-delta", default=1e-5, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
                 help="asymml: the δ at which the run's ε is reported."),
)


def asymml_options(command):
    for option in reversed(ASYMML_OPTIONS):
        command = option(command)
    return command


def _asymml_config(energy, rank, noise, clip, delta):
    from tempo.core.asymml import AsymmlConfig

    try:
        return AsymmlConfig(energy=energy, max_rank=rank, noise=noise, clip=clip, delta=delta).validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def masking_options(command):
    """--masking and the options on top of it, in that order, for every command that masks."""
    for option in (KEEP, MIX, KEY_SPACE, MASKING):
        command = option(command)
    return command

@bench.command("train")
@click.option("--model", type=MODEL_CHOICES, default="resnet18", show_default=True, help="The model to time.")
@click.option("--width", default=None, type=click.IntRange(1), help="Model width (as for train).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Images per step.")
@click.option("--steps", default=3, show_default=True, type=click.IntRange(1), help="Timed steps per mode (after one warm-up).")
@click.option("--modes", default="tempo,plain-cpu,plain-cuda", show_default=True,
              help="Comma-separated: tempo (the --masking), shares (three relay pools, --relays each), plain-cpu "
                   "(pure TEE), plain-cuda (non-private GPU).")
@click.option("--protection", type=click.Choice(["masking", "shares", "asymml"]), default="masking", show_default=True,
              help="shares or asymml: time that mode beside the masking (adds it to --modes).")
@click.option("--relays", default=2, show_default=True, type=click.IntRange(1, 16), help="Local relays for tempo; products split across them (as for train).")
@click.option("--device", default="cpu", show_default=True, help="The relays' device (and plain-cuda's): cpu, cuda, cuda:i.")
@PIPELINE
@SPLIT_MIN_MB
@click.option("--image-shape", default="3x32x32", show_default=True, help="C×H×W of the synthetic batch (CIFAR's by default).")
@click.option("--arena-mb", default=4096, show_default=True, type=click.IntRange(16), help="Shared-memory arena for masked operands.")
@masking_options
@asymml_options
@JSON
@click.option("--plot", "plot_path", default=None, help="Draw the breakdown as a PNG (needs matplotlib).")
@click.pass_context
def bench_train(ctx: click.Context, model, width, batch_size, steps, modes, relays, device, pipeline, split_min_mb,
                image_shape, arena_mb, masking, key_space, mix, keep, json_path, plot_path, protection,
                asymml_energy, asymml_rank, asymml_noise, asymml_clip, asymml_delta) -> None:
    """Training steps side by side: tempo, pure TEE (plain-cpu), non-private GPU (plain-cuda)."""
    from tempo.bench import train as bench

    masking = _masking(masking, key_space, mix, keep)

    log = _logger(ctx, "bench")
    try:
        shape = tuple(int(v) for v in image_shape.lower().split("x"))
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{image_shape!r}: expected C×H×W such as 3x32x32", param_hint="--image-shape") from None
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    if protection in ("shares", "asymml") and protection not in chosen:
        chosen.insert(chosen.index("tempo") + 1 if "tempo" in chosen else 0, protection)
    asymml = _asymml_config(asymml_energy, asymml_rank, asymml_noise, asymml_clip, asymml_delta)
    if plot_path:
        _require_matplotlib()
    log.info("bench.train.start", model=model, batch_size=batch_size, steps=steps, modes=chosen, relays=relays,
             device=device, pipeline=pipeline)
    try:
        figures = bench.run(model, batch_size, steps, chosen, relays, device, pipeline, width, shape, masking=masking,
                            arena_mb=arena_mb, split_min_mb=split_min_mb, progress=lambda m: log.info("bench.progress", msg=m), log=log,
                            asymml=asymml)
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(bench.table(figures))
    if plot_path:
        bench.plot(figures, plot_path)
        click.echo(f"plot: {plot_path}")
    _emit_json(figures, json_path)


def _masking(name: str, key_space: str | None, mix: int | None, keep: str | None):
    """The masking preset `name` with the key options given on top; bad ones are a usage error."""
    from tempo.enclave.protection import parse_keep, preset

    try:
        masking = preset(name).with_options(key_space=key_space, mix=mix, keep=parse_keep(keep))
        masking.keys()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return masking


def _require_matplotlib() -> None:
    """Fail in a second, before any work, when a plot is asked for and matplotlib is missing."""
    from tempo.report import require_matplotlib

    try:
        require_matplotlib()
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


DATASET_CHOICES = click.Choice(["digits", "cifar10", "synthetic"])
DATA_DIR = click.option("--data-dir", default=None,
                        help="Where CIFAR-10's python batches are (cifar10 only; nothing is downloaded).")
PARTIAL_DATA = click.option("--partial-data", is_flag=True, default=None,
                            help="Accept a CIFAR-10 folder that lacks some of data_batch_1..5.")


@main.command()
@click.option("--model", type=MODEL_CHOICES, default="cnn", show_default=True, help="The model to train.")
@click.option("--width", default=None, type=click.IntRange(1), help="Model width: hidden units (mlp), channels (cnn, ResNet base), dim (vit).")
@click.option("--dataset", type=DATASET_CHOICES, default="digits", show_default=True, help="digits ships with the package.")
@DATA_DIR
@PARTIAL_DATA
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(1), help="Passes over the training images.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1), help="Images per step.")
@click.option("--lr", default=0.1, show_default=True, type=click.FloatRange(0, min_open=True), help="Learning rate.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True, help="SGD with momentum, or AdamW.")
@click.option("--schedule", type=click.Choice(["none", "cosine", "step"]), default="none", show_default=True, help="Learning-rate schedule.")
@click.option("--seed", default=7, show_default=True, type=int, help="Seeds the data split, the order of batches and the initial weights.")
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Share of the training images held out for validation (0: none).")
@click.option("--val-every", default=1, show_default=True, type=click.IntRange(0),
              help="Validate every N epochs (and after the last; 0: never).")
@click.option("--relays", default=2, show_default=True, type=click.IntRange(1, 16), help="Local relays to start; each product is split across them.")
@PIPELINE
@SPLIT_MIN_MB
@click.option("--device", default="cpu", show_default=True, help="Relays' device (tempo) or the training device (plain): cpu, cuda, cuda:i.")
@click.option("--mode", type=click.Choice(["tempo", "plain"]), default="tempo", show_default=True,
              help="tempo: offload the products masked (--masking says which and how); plain: no offload (pure-TEE baseline on cpu, non-private on cuda).")
@click.option("--key-refresh", type=click.Choice(["step", "epoch"]), default="step", show_default=True,
              help="Fresh keys for every product, or one key per layer for an epoch (the paper's).")
@masking_options
@click.option("--protection", type=click.Choice(["auto", "masking", "shares", "asymml"]), default="auto", show_default=True,
              help="shares: every product secret-shared across three relay pools that must not collude (--relays is "
                   "then relays per pool); masking: the --masking preset; asymml: AsymML, each layer's input split "
                   "into a low-rank part computed here and a clipped noisy residual the relays get with the "
                   "weights in the clear (the --asymml-* knobs; (ε, δ) in summary.json); auto: shares wherever the "
                   "three pools are configured (a job's pool_keys), else the masking. README: which protection to choose.")
@asymml_options
@click.option("--arena-mb", default=None, type=click.IntRange(16),
              help="Shared-memory arena for what goes to the relays (default 256; 1024 with --protection shares).")
@click.option("--integrity-t", default=1e-6, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Target probability that any wrong result goes undetected in the run (Theorem V.2 sets the Freivalds rounds).")
@click.option("--out", default=None,
              help="The run directory for checkpoint.pt, model.pt, summary.json, metrics.csv (default: a new "
                   "runs/<date-time>, linked as runs/latest).")
@click.option("--resume", is_flag=True, help="Continue the run in --out (default runs/latest) from its checkpoint.pt.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out (otherwise refused).")
@click.option("--checkpoint-every", default=20, show_default=True, type=click.IntRange(0), help="Steps between checkpoints (0: epoch ends only).")
@click.option("--inject-fault", default=None, help="Start one local relay misbehaving: corrupt|nan|lazy|slow|drop|crash|malformed|noise[:RATE].")
@click.option("--part-timeout", "part_timeout_s", default=30.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds a relay may take for one part before it is quarantined and the part sent elsewhere.")
@click.option("--plot", is_flag=True, help="Draw the loss and accuracy curves to OUT/curves.png at the end (needs matplotlib).")
@click.option("--progress-every", default=10.0, show_default=True, type=click.FloatRange(0),
              help="Off a terminal: seconds between train.progress log events.")
@click.option("--halt-after-steps", default=None, type=click.IntRange(1), hidden=True)
@click.pass_context
def train(ctx: click.Context, plot: bool, progress_every: float, **options) -> None:
    """Train privately: Linear and Conv2d products masked and offloaded to local relays."""
    from tempo.train import TrainConfig

    log = _logger(ctx, "enclave")
    options["partial_data"] = bool(options["partial_data"])
    cfg = TrainConfig(**options)
    log.info("train.start", **{k: v for k, v in options.items() if v is not None})
    _run_training(cfg, log, plot, progress_every, "tempo train")


@main.command()
@click.option("--config", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The job: a TOML file of training settings (model, dataset, epochs, batch_size, lr, …).")
@click.option("--offloader", required=True, help="The off-loader's enclave endpoint, e.g. ipc:///tmp/tempo/offloader.ipc.")
@click.option("--relays", default=None, type=click.IntRange(1, 16), help="Relays to wait for and split products across (default: the job's).")
@click.option("--relay-wait", default=60.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds to wait for the relays to join.")
@click.option("--out", default=None, help="Where summary.json, model.pt and checkpoint.pt go (default: the job's).")
@DATA_DIR
@PARTIAL_DATA
@click.option("--arena-mb", default=None, type=click.IntRange(16), help="Shared-memory arena size (default: the job's).")
@click.option("--resume/--no-resume", default=None, help="Continue from OUT/checkpoint.pt (default: the job's).")
@click.option("--overwrite/--no-overwrite", default=None, help="Replace a run already in OUT (default: the job's).")
@click.option("--progress-every", default=10.0, show_default=True, type=click.FloatRange(0),
              help="Off a terminal: seconds between train.progress log events.")
@click.pass_context
def enclave(ctx: click.Context, config, offloader, relays, relay_wait, out, data_dir, partial_data, arena_mb, resume,
            overwrite, progress_every) -> None:
    """The enclave process as deployed: train the job in CONFIG through a separately started
    off-loader (and its relays). Runs under Gramine in ops/gramine."""
    from tempo.train import load_job

    log = _logger(ctx, "enclave")
    try:
        cfg = load_job(config, relays=relays, out=out, data_dir=data_dir, partial_data=partial_data,
                       arena_mb=arena_mb, resume=resume, overwrite=overwrite)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    cfg.offloader, cfg.relay_wait_s, cfg.mode = offloader, relay_wait, "tempo"
    log.info("enclave.start", config=config, offloader=offloader, relays=cfg.relays, model=cfg.model,
             dataset=cfg.dataset, epochs=cfg.epochs)
    _run_training(cfg, log, False, progress_every, "tempo enclave")


def _run_training(cfg, log, plot: bool, progress_every: float, command: str) -> None:
    """Run `cfg` with a progress display and signal handling; every failure is one line on
    stderr and a non-zero exit (a signal: 128 + its number, after saying how to resume)."""
    from tempo import interrupt, report
    from tempo.arena import ArenaFull
    from tempo.enclave.client import OffloadError
    from tempo.train import Diverged, Halted, RunInterrupted, TrainingStopped, run
    from tempo.progress import ProgressView

    if plot:
        _require_matplotlib()
    view = ProgressView(log, every_s=progress_every)
    try:
        with interrupt.handle_signals():
            summary = run(cfg, progress=view, log=log)
    except RunInterrupted as exc:
        view.close()
        if exc.checkpoint is not None:
            how = f"{command} --resume --out {exc.out}" if command == "tempo train" else f"{command} ... --resume"
            click.echo(f"{command}: interrupted by {exc.signal_name}: checkpoint at {exc.checkpoint} (step {exc.step}); "
                       f"resume with: {how}", err=True)
        else:
            click.echo(f"{command}: {exc}", err=True)
        log.warning("train.interrupted", signal=exc.signal_name, step=exc.step,
                    checkpoint=str(exc.checkpoint) if exc.checkpoint else None)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:  # before the run had anything to keep
        name = getattr(exc, "name", "SIGINT")
        click.echo(f"{command}: interrupted by {name} before training started: nothing to resume", err=True)
        sys.exit(128 + getattr(exc, "signum", 2))
    except (ValueError, FileNotFoundError, TrainingStopped, OffloadError, Diverged, ArenaFull) as exc:  # ClusterDied too
        view.close()
        raise click.ClickException(" ".join(str(exc).split())) from None
    except Halted as exc:
        raise click.ClickException(f"{exc}; resume with --resume") from None
    finally:
        view.close()
    click.echo(f"{summary.mode} training of {summary.model} on {summary.dataset}: {summary.steps} steps in "
               f"{summary.wall_s:.1f}s{' (resumed)' if summary.resumed else ''}, train loss {summary.train_loss:.4f}, "
               + ("" if summary.val_accuracy is None else f"validation accuracy {summary.val_accuracy:.4f}, ")
               + f"test accuracy {summary.test_accuracy:.4f}; wrote {summary.out}/ (summary.json, model.pt, "
               "metrics.csv, checkpoint.pt)")
    if summary.dp is not None:
        eps = summary.dp["epsilon"]
        click.echo(f"asymml: each training image's residual went to the relays {summary.dp['releases_per_sample']} "
                   f"time(s): ({'∞' if eps is None else f'{eps:.4g}'}, {summary.dp['delta']:g})-DP for what the "
                   "accounting covers (summary.json: dp)")
    for event in summary.quarantined_relays:
        click.echo(f"quarantined relay {event['relay']}: {event['reason']}")
    for event in summary.lost_relays:
        click.echo(f"lost relay {event['relay']}: {event['reason']}")
    if plot:
        path = report.plot_curves(report.load_summary(summary.out), f"{summary.out}/curves.png")
        click.echo(f"curves: {path}")
    log.info("train.done", test_accuracy=summary.test_accuracy, wall_s=round(summary.wall_s, 2), out=summary.out)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--plot", "plot_path", default=None, help="Where to draw the curves (default: RUN_DIR/curves.png).")
@click.option("--no-plot", is_flag=True, help="Print the table only.")
def report(run_dir: str, plot_path: str | None, no_plot: bool) -> None:
    """A finished run's history as a table, and its loss and accuracy curves as a PNG."""
    from tempo import report as rep

    if not no_plot:
        _require_matplotlib()
    try:
        summary = rep.load_summary(run_dir)
        click.echo(rep.table(summary))
        if not no_plot:
            click.echo(f"curves: {rep.plot_curves(summary, plot_path or f'{run_dir}/curves.png')}")
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A model.pt (state_dict) or checkpoint.pt from tempo train.")
@click.option("--model", type=MODEL_CHOICES, required=True, help="The model the weights belong to.")
@click.option("--width", default=None, type=click.IntRange(1), help="Model width, as in training.")
@click.option("--dataset", type=DATASET_CHOICES, default="digits", show_default=True, help="Whose test images to classify.")
@DATA_DIR
@PARTIAL_DATA
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1), help="Images per private forward pass.")
@click.option("--relays", default=2, show_default=True, type=click.IntRange(1, 16), help="Local relays to start.")
@click.option("--device", default="cpu", show_default=True, help="Relays' device.")
@click.option("--seed", default=7, show_default=True, type=int, help="The data split's seed (as in training).")
@click.option("--integrity-t", default=1e-6, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Target probability that any wrong result goes undetected (Theorem V.2, alpha = 1).")
@click.option("--protection", type=click.Choice(["masking", "asymml"]), default="masking", show_default=True,
              help="masking: the default masking; asymml: AsymML's split (the --asymml-* knobs).")
@asymml_options
@JSON
@click.pass_context
def infer(ctx: click.Context, checkpoint, model, width, dataset, data_dir, partial_data, batch_size, relays, device,
          seed, integrity_t, json_path, protection, asymml_energy, asymml_rank, asymml_noise, asymml_clip,
          asymml_delta) -> None:
    """Private inference: forward passes only, every product masked (or split, AsymML) and offloaded."""
    from tempo.enclave.client import OffloadError
    from tempo.infer import run_inference

    log = _logger(ctx, "enclave")
    try:
        result = run_inference(checkpoint, model, width, dataset, data_dir, batch_size, relays, device, seed,
                               integrity_t=integrity_t, log=log, partial_data=bool(partial_data), protection=protection,
                               asymml=_asymml_config(asymml_energy, asymml_rank, asymml_noise, asymml_clip, asymml_delta)
                               if protection == "asymml" else None)
    except (ValueError, FileNotFoundError, OffloadError) as exc:  # ClusterDied is an OffloadError
        raise click.ClickException(" ".join(str(exc).split())) from None
    click.echo(f"private inference of {model} on {dataset}: accuracy {result['accuracy']:.4f} over "
               f"{result['images']} images, {result['images_per_s']:.1f} images/s with {relays} relay(s)")
    _emit_json(result, json_path)


@main.command()
@click.option("--model", type=click.Choice(["mlp", "cnn"]), default="mlp", show_default=True,
              help="The model trained privately on the shipped digits, and attacked.")
@masking_options
@click.option("--key-refresh", type=click.Choice(["step", "epoch"]), default=None,
              help="Fresh keys for every product, or one per layer for an epoch (default: the preset's).")
@click.option("--epochs", default=3, show_default=True, type=click.IntRange(1), help="Epochs of the audited training.")
@click.option("--relays", default=2, show_default=True, type=click.IntRange(0, 16),
              help="Relay processes that record what they receive (0: the same view captured in-process).")
@click.option("--attacks", default=None, help="Comma-separated subset of the attacks (default: all that apply).")
@click.option("--game-rounds", default=40, show_default=True, type=click.IntRange(2),
              help="Rounds per variant of the distinguishing game on the run (95% interval about ±0.3 at 40, "
                   "±0.14 at 200).")
@click.option("--out", default=None, help="Where audit.json, images.png and the relays' recording go "
                                          "(default: runs/audit-MODEL-MASKING-<date-time>).")
@click.option("--protection", type=click.Choice(["masking", "shares", "asymml"]), default="masking", show_default=True,
              help="shares: audit the shares mode (three pools; --relays per pool) instead of a masking; asymml: "
                   "audit the AsymML mode (the masking options do not apply; its attacks: labels, inputs, weights).")
@click.option("--pools", default="p1", show_default=True,
              help="With --protection shares: the pools whose views the attacks read together (p1, p2, p3; "
                   "two or more is a collusion).")
@asymml_options
@JSON
@click.pass_context
def audit(ctx: click.Context, model, masking, key_space, mix, keep, key_refresh, epochs, relays, attacks, game_rounds,
          out, protection, pools, asymml_energy, asymml_rank, asymml_noise, asymml_clip, asymml_delta,
          json_path) -> None:
    """What relays learn: train privately with relays that record what they receive, attack that
    record alone (public knowledge, never the keys) and score each attack against the truth."""
    import datetime

    from tempo.audit.run import RUN_ATTACKS, SCHEME_EXPERIMENTS
    from tempo.audit.run import audit as run_audit
    from tempo.audit.run import table
    from tempo.enclave.protection import parse_keep

    log = _logger(ctx, "audit")
    try:
        import scipy  # noqa: F401
    except ImportError:
        raise click.ClickException("tempo audit needs scipy: pip install 'tempo-train[audit]'") from None
    if protection == "asymml":
        from tempo.audit import asymml as am

        config = _asymml_config(asymml_energy, asymml_rank, asymml_noise, asymml_clip, asymml_delta)
        chosen = tuple(a.strip() for a in attacks.split(",") if a.strip()) if attacks else None
        unknown = sorted(set(chosen or ()) - set(am.ATTACKS))
        if unknown:
            raise click.BadParameter(f"unknown attack(s) {unknown}; the asymml audit's: {', '.join(am.ATTACKS)}",
                                     param_hint="--attacks")
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = out or f"runs/audit-{model}-asymml-{stamp}"
        log.info("audit.start", model=model, protection=protection, epochs=epochs, relays=relays, out=out)
        try:
            figures = run_audit(model, masking, epochs, relays, out, chosen, log=log, protection="asymml",
                                asymml=config)
        except (ValueError, RuntimeError) as exc:
            raise click.ClickException(" ".join(str(exc).split())) from None
        click.echo(table(figures))
        click.echo(f"wrote {out}/audit.json" + (f", the relays' recording in {out}/recording/" if relays else ""))
        _emit_json(figures, json_path)
        return
    _masking(masking, key_space, mix, keep)  # a bad option fails before any work
    chosen = None
    if attacks:
        chosen = tuple(a.strip() for a in attacks.split(",") if a.strip())
        unknown = sorted(set(chosen) - set(RUN_ATTACKS) - set(SCHEME_EXPERIMENTS))
        if unknown:
            raise click.BadParameter(f"unknown attack(s) {unknown}; known: {', '.join(RUN_ATTACKS + SCHEME_EXPERIMENTS)}",
                                     param_hint="--attacks")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    chosen_pools = tuple(p.strip() for p in pools.split(",") if p.strip()) if protection == "shares" else None
    out = out or f"runs/audit-{model}-{'shares-' + '+'.join(chosen_pools) if chosen_pools else masking}-{stamp}"
    options = {"key_space": key_space, "mix": mix, "keep": parse_keep(keep), "key_refresh": key_refresh}
    log.info("audit.start", model=model, masking=masking, protection=protection, epochs=epochs, relays=relays, out=out)
    try:
        figures = run_audit(model, masking, epochs, relays, out, chosen, options, log=log, game_rounds=game_rounds,
                            pools=chosen_pools)
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None
    click.echo(table(figures))
    click.echo(f"wrote {out}/audit.json" + (f", {out}/images.png" if (Path(out) / "images.png").exists() else "")
               + (f", the relays' recording in {out}/recording/" if relays else ""))
    _emit_json(figures, json_path)


@main.group()
def keys() -> None:
    """CurveZMQ keys for authenticated, encrypted relay links."""


@keys.command("generate")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False), help="Where to write the key files.")
@click.option("--name", required=True, help="Key name: NAME.key (public) and NAME.key_secret are written.")
def keys_generate(directory: str, name: str) -> None:
    """Generate a CURVE key pair (for the off-loader or a relay)."""
    from tempo import curve

    public, secret = curve.generate(directory, name)
    click.echo(f"public key {public}\nsecret key {secret} (keep it on its host; mode 600)")
