"""Private training: the enclave's loop. Linear and Conv2d products are offloaded masked; the
loss, non-linear layers and the optimizer run here on plaintext (paper §IV-B, §IV-C).

`run` trains with ``mode="tempo"`` through real off-loader and relay processes it starts and
stops itself (Tempo-l), or with ``mode="plain"``: the same loop without any offload, the
pure-TEE baseline on CPU.

A run lives in one directory (``out``): ``checkpoint.pt`` (to resume), ``model.pt`` (a plain
state_dict), ``summary.json`` (figures and the per-epoch ``history``) and ``metrics.csv``. Nothing
there is replaced unless the run resumes it or is told to overwrite it. A run stops with a
message and a checkpoint it can resume from when the relays cannot compute a step, when the
off-loader exits, or on a signal (`RunInterrupted`); a run whose own numbers stop being finite
stops as `Diverged`, keeping the last good checkpoint and blaming no relay.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from tempo import data as datasets
from tempo import interrupt, models
from tempo.enclave import checkpoint as ckpt
from tempo.enclave import protection


@dataclass
class TrainConfig:
    model: str = "cnn"
    width: int | None = None
    dataset: str = "digits"
    data_dir: str | None = None
    partial_data: bool = False  # accept a CIFAR-10 folder that lacks some training batches
    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.1
    optimizer: str = "sgd"
    schedule: str = "none"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 7
    val_fraction: float = 0.1  # of the training images, held out for validation
    val_every: int = 1  # epochs between validations (0: none; the last epoch is always validated)
    relays: int = 2
    pipeline: bool = True  # overlap masking, relay compute and unmasking across a product's parts
    split_min_mb: float = 4.0  # products smaller than this (operands + result) are not split
    device: str = "cpu"
    mode: str = "tempo"
    key_refresh: str = "step"
    masking: str = protection.DEFAULT  # a preset of tempo.enclave.protection: paper, head, edges, mixed
    # "masking" (the preset above) or "shares": every product secret-shared across three relay
    # pools (tempo.enclave.pools); `relays` is then relays per pool. "auto": shares wherever the
    # three pools are configured (their keys, `pool_keys`), else the masking. "asymml": AsymML
    # (tempo.core.asymml): inputs split into a low-rank part computed here and a clipped, noisy
    # residual sent with the plaintext weights; the knobs below, its DP accounting in summary.json
    protection: str = "auto"
    asymml_energy: float = 0.9  # share of each input's energy the low-rank part keeps (the authors' code)
    asymml_rank: int | None = None  # at most this many principal channels (None: up to all of them)
    asymml_noise: float = 0.1  # noise-to-signal ratio z: σ = z · clip per residual entry
    asymml_clip: float = 0.25  # each sample's residual of d entries is clipped to L2 norm clip · √d
    asymml_delta: float = 1e-5  # the δ the run's ε is reported at
    pool_keys: str | None = None  # shares with a separately started off-loader: DIR/p1.key, p2.key, p3.key
    key_space: str | None = None  # the preset's unless given: int:K, signed-int:K, continuous:K
    mix: int | None = None  # orthogonal mixing blocks on every key (the preset's unless given; 0: none)
    keep: str | None = None  # layers kept in the enclave: "first,last", "last", "none" (the preset's unless given)
    integrity_t: float = 1e-6
    out: str | None = None  # None: a new runs/<date-time>, linked as runs/latest (resume: runs/latest)
    resume: bool = False
    overwrite: bool = False  # replace a run already in `out`
    checkpoint_every: int = 20
    arena_mb: int | None = None  # the shared-memory arena: 256 MiB, or 1024 for the shares mode
    halt_after_steps: int | None = None  # tests: stop as if killed after this many steps
    inject_fault: str | None = None  # start relay 0 with --fault MODE[:RATE]
    part_timeout_s: float = 30.0
    heartbeat_timeout_s: float = 3.0
    offloader: str | None = None  # a separately started off-loader's enclave endpoint (tempo enclave)
    relay_wait_s: float = 60.0  # with `offloader`: how long to wait for `relays` relays to join

    def validate(self) -> TrainConfig:
        """Check every setting once (type, range, choice) and return self; `ConfigError` names the
        key. Ints given for floats become floats."""
        for f in fields(self):
            setattr(self, f.name, FIELDS[f.name].check(f.name, getattr(self, f.name)))
        if self.device not in ("cpu", "cuda") and not (self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise ConfigError("device", f"device must be cpu, cuda or cuda:i, not {self.device!r}")
        if self.dataset == "cifar10" and self.data_dir is None:
            raise ConfigError("data_dir", "data_dir (--data-dir) is needed for cifar10: the folder of its "
                                          "python-format batches (nothing is downloaded)")
        if self.dataset != "cifar10" and self.data_dir is not None:
            raise ConfigError("data_dir", f"data_dir (--data-dir) is for cifar10 only; {self.dataset} needs none")
        try:
            self.masking_preset()
        except ValueError as exc:
            raise ConfigError("masking", str(exc)) from None
        if self.protection == "asymml":
            try:
                self.asymml_config()
            except ValueError as exc:
                raise ConfigError("asymml", str(exc)) from None
        if self.inject_fault is not None and self.offloader:
            raise ConfigError("inject_fault", "inject_fault starts a local relay; start a relay with --fault instead")
        if self.offloader and self.mode == "tempo" and self.uses_shares() and self.pool_keys is None:
            raise ConfigError("pool_keys", "the shares mode with a separately started off-loader needs pool_keys "
                                           "(--pool-keys DIR holding p1.key, p2.key and p3.key, the keys its pools' "
                                           "relays use)")
        if self.inject_fault is not None:
            from tempo.relay import Fault

            try:
                Fault.parse(self.inject_fault)
            except ValueError as exc:
                raise ConfigError("inject_fault", str(exc)) from None
        return self

    def uses_shares(self) -> bool:
        """Whether this run secret-shares its products: asked for, or, by default, wherever the
        three pools are configured (the shares mode met its cost goal: README)."""
        return self.protection == "shares" or (self.protection == "auto" and self.pool_keys is not None)

    def asymml_config(self):
        """The AsymML mode's knobs (`tempo.core.asymml.AsymmlConfig`), checked."""
        from tempo.core.asymml import AsymmlConfig

        return AsymmlConfig(energy=self.asymml_energy, max_rank=self.asymml_rank, clip=self.asymml_clip,
                            noise=self.asymml_noise, delta=self.asymml_delta).validate()

    def masking_preset(self) -> protection.Masking:
        """The masking this run uses: its preset with the options given on top."""
        masking = protection.preset(self.masking).with_options(
            key_space=self.key_space, key_refresh=self.key_refresh, mix=self.mix, keep=protection.parse_keep(self.keep))
        masking.keys()  # a bad key space or block size fails here
        return masking


class ConfigError(ValueError):
    """A setting that is wrong, named by its key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Field:
    """What one setting may hold: its type, whether it may be unset, and its range or choices."""

    kind: type
    optional: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        what = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[self.kind]
        if self.low is not None:
            what += f" {'>' if self.low_open else '≥'} {self.low:g}"
        if self.high is not None:
            what += f"{' and' if self.low is not None else ''} {'<' if self.high_open else '≤'} {self.high:g}"
        return what + (" (or unset)" if self.optional else "")

    def check(self, key: str, value: object) -> object:
        """`value` if it fits (an int for a float becomes a float), else `ConfigError`."""
        if value is None and self.optional:
            return None
        ok = {bool: lambda v: isinstance(v, bool),
              int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
              str: lambda v: isinstance(v, str) and v != ""}[self.kind](value)
        if ok and self.kind is float:
            value = float(value)
        if ok and self.choices:
            ok = value in self.choices
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            raise ConfigError(key, f"{key} must be {self.describe()}, not {value!r}")
        return value


def _int(low=None, high=None, optional=False) -> Field:
    return Field(int, optional, low, high)


def _float(low=None, high=None, low_open=False, high_open=False) -> Field:
    return Field(float, False, low, high, low_open, high_open)


FIELDS: dict[str, Field] = {
    "model": Field(str, choices=models.MODELS),
    "width": _int(1, optional=True),
    "dataset": Field(str, choices=datasets.DATASETS),
    "data_dir": Field(str, optional=True),
    "partial_data": Field(bool),
    "epochs": _int(1),
    "batch_size": _int(1),
    "lr": _float(0, low_open=True),
    "optimizer": Field(str, choices=("sgd", "adamw")),
    "schedule": Field(str, choices=("none", "cosine", "step")),
    "momentum": _float(0, 1),
    "weight_decay": _float(0),
    "seed": _int(),
    "val_fraction": _float(0, 1, high_open=True),
    "val_every": _int(0),
    "relays": _int(1, 16),
    "pipeline": Field(bool),
    "split_min_mb": _float(0),
    "device": Field(str),
    "mode": Field(str, choices=("tempo", "plain")),
    "key_refresh": Field(str, choices=("step", "epoch")),
    "masking": Field(str, choices=tuple(protection.PRESETS)),
    "protection": Field(str, choices=("auto", "masking", "shares", "asymml")),
    "asymml_energy": _float(0, 1),
    "asymml_rank": _int(1, optional=True),
    "asymml_noise": _float(0),
    "asymml_clip": _float(0, low_open=True),
    "asymml_delta": _float(0, 1, low_open=True, high_open=True),
    "pool_keys": Field(str, optional=True),
    "key_space": Field(str, optional=True),
    "mix": _int(0, optional=True),
    "keep": Field(str, optional=True),
    "integrity_t": _float(0, 1, low_open=True, high_open=True),
    "out": Field(str, optional=True),
    "resume": Field(bool),
    "overwrite": Field(bool),
    "checkpoint_every": _int(0),
    "arena_mb": _int(16, optional=True),
    "halt_after_steps": _int(1, optional=True),
    "inject_fault": Field(str, optional=True),
    "part_timeout_s": _float(0, low_open=True),
    "heartbeat_timeout_s": _float(0, low_open=True),
    "offloader": Field(str, optional=True),
    "relay_wait_s": _float(0, low_open=True),
}

# What a job file may set (`tempo enclave --config`): the job, not the test hooks.
JOB_KEYS = ("model", "width", "dataset", "data_dir", "partial_data", "epochs", "batch_size", "lr", "optimizer",
            "schedule", "momentum", "weight_decay", "seed", "val_fraction", "val_every", "relays", "pipeline",
            "split_min_mb", "device", "key_refresh", "masking", "protection", "pool_keys", "key_space", "mix", "keep", "integrity_t", "out",
            "asymml_energy", "asymml_rank", "asymml_noise", "asymml_clip", "asymml_delta", "resume", "overwrite",
            "checkpoint_every", "arena_mb", "part_timeout_s")


def load_job(path: str | Path, **overrides) -> TrainConfig:
    """A `TrainConfig` from a TOML job file (keys: `JOB_KEYS`, at the top level or under
    ``[job]``); `overrides` that are not ``None`` win. Every value is checked once, here: unknown
    keys, wrong types and values out of range are errors that name the key."""
    import tomllib

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"job file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"job file {path} is not valid TOML: {exc}") from None
    job = doc.get("job", doc)
    if not isinstance(job, dict):
        raise ValueError(f"job file {path}: [job] must be a table of settings")
    unknown = sorted(set(job) - set(JOB_KEYS))
    if unknown:
        raise ValueError(f"job file {path}: unknown key(s) {unknown}; known: {', '.join(JOB_KEYS)}")
    values = {**job, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return TrainConfig(**values).validate()
    except ConfigError as exc:
        raise ValueError(f"job file {path}: {exc}") from None


@dataclass
class Breakdown:
    encrypt: float = 0.0
    decrypt: float = 0.0
    verify: float = 0.0
    transfer_wait: float = 0.0
    enclave_other: float = 0.0  # non-linear layers, loss, optimizer, data


@dataclass
class Summary:
    mode: str
    model: str
    dataset: str
    epochs: int
    steps: int
    batch_size: int
    relays: int
    device: str
    train_loss: float
    test_accuracy: float
    wall_s: float  # the whole run's time, over every resume
    median_step_s: float = 0.0  # one training step (forward, backward, update), evaluation excluded
    val_accuracy: float | None = None  # on the held-out images, after the last epoch
    out: str = ""
    resumed: bool = False
    resumes: int = 0
    images: dict = field(default_factory=dict)  # train, val, test counts
    data: str = ""  # what was read
    history: list = field(default_factory=list)  # one row per epoch (HISTORY_COLUMNS)
    breakdown: dict = field(default_factory=dict)
    offload: dict = field(default_factory=dict)
    quarantined_relays: list = field(default_factory=list)
    lost_relays: list = field(default_factory=list)
    dp: dict | None = None  # AsymML: the run's (ε, δ) differential privacy and what it does not cover


HISTORY_COLUMNS = ("epoch", "steps", "train_loss", "val_accuracy", "epoch_s", "images_per_s", "lr")
RUN_FILES = ("checkpoint.pt", "model.pt", "summary.json", "metrics.csv", "curves.png")


def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def evaluate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, after_batch=None) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += int((net(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
            if after_batch:
                after_batch()
    return correct / max(1, len(x))


def _schedule(cfg: TrainConfig, opt: torch.optim.Optimizer, total_steps: int):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    if cfg.schedule == "step":
        milestones = [int(total_steps * 0.5), int(total_steps * 0.75)]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    return None


class Halted(RuntimeError):
    """Raised by `halt_after_steps` (tests): the run stops as a killed one would."""


class TrainingStopped(RuntimeError):
    """A step could not be computed and verified (no healthy relay, the off-loader gone):
    stopped before any unverified update, with a checkpoint to resume from."""


class Diverged(RuntimeError):
    """The enclave's own numbers stopped being finite (loss, activations, gradients): the model
    diverged, or its inputs hold NaN. The last good checkpoint is kept; no relay is blamed."""


class RunInterrupted(RuntimeError):
    """A signal (Ctrl-C, SIGTERM, SIGHUP) stopped the run; `checkpoint` is where it can resume
    from (``None`` when no step was taken since the last start)."""

    def __init__(self, signal_name: str, exit_code: int, step: int, checkpoint: Path | None, out: Path) -> None:
        where = (f"checkpoint at {checkpoint} (step {step}); resume with --resume (--out {out})"
                 if checkpoint else "no step was taken, so there is nothing to resume")
        super().__init__(f"interrupted by {signal_name}: {where}")
        self.signal_name, self.exit_code, self.step, self.checkpoint, self.out = (
            signal_name, exit_code, step, checkpoint, out)


def resolve_out(cfg: TrainConfig, runs: Path = Path("runs")) -> Path:
    """The run directory, checked before any work: not a file, not under a file, and not a run
    already there unless this one resumes it or overwrites it. ``out=None`` is a new
    ``runs/<date-time>`` (``runs/latest`` when resuming). Creates nothing."""
    if cfg.out is None:
        if cfg.resume:
            latest = runs / "latest"
            if not latest.exists():
                raise ConfigError("out", f"--resume without --out continues {latest}, which does not exist")
            return latest.resolve()
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        out, i = runs / stamp, 1
        while out.exists():
            i += 1
            out = runs / f"{stamp}-{i}"
        return out
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"--out {out} is a file, not a directory")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError("out", f"--out {out} cannot be made: {parent} is a file")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not (cfg.resume or cfg.overwrite):
        raise ConfigError("out", f"--out {out} already holds a run ({', '.join(held)}); resume it with --resume, "
                                 "replace it with --overwrite, or choose another --out")
    return out


def _make_out(out: Path, cfg: TrainConfig, runs: Path = Path("runs")) -> None:
    """Create the run directory; with --overwrite clear the old run's files; point runs/latest
    at a new default run directory."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("out", f"--out {out} cannot be made: {exc.strerror}") from None
    if cfg.overwrite and not cfg.resume:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    if cfg.out is None and not cfg.resume:
        latest = runs / "latest"
        if latest.is_symlink() or not latest.exists():
            tmp = runs / f".latest-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(out.name)
            tmp.replace(latest)


def _write_metrics(path: Path, history: list[dict]) -> None:
    with open(path.with_suffix(".tmp"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in HISTORY_COLUMNS})
    path.with_suffix(".tmp").replace(path)


def _interrupted(exc: KeyboardInterrupt, last_ckpt: tuple[int, Path] | None, out: Path) -> RunInterrupted:
    """The `RunInterrupted` for a signal (`tempo.interrupt.Interrupted`) or a bare Ctrl-C."""
    signum = getattr(exc, "signum", 2)
    return RunInterrupted(getattr(exc, "name", "SIGINT"), 128 + signum, last_ckpt[0] if last_ckpt else 0,
                          last_ckpt[1] if last_ckpt else None, out)


def _diverged(step: int, what: str, last_ckpt: tuple[int, Path] | None) -> Diverged:
    kept = (f"the last good checkpoint (step {last_ckpt[0]}) is at {last_ckpt[1]}" if last_ckpt
            else "no checkpoint was written before it")
    return Diverged(f"the model diverged at step {step}: {what}. No relay is to blame; {kept}. "
                    "Try a lower learning rate (--lr) or check the inputs for NaN")


def run(cfg: TrainConfig, progress: Callable[[dict], None] | None = None, log=None) -> Summary:
    """Train as `cfg` says; returns the `Summary` it also writes to ``out/summary.json``.

    `progress` gets an event after every step (``kind="step"``: epoch, batch of batches, step of
    total, loss, images per second over this epoch's steps, ETA) and after every epoch
    (``kind="epoch"``: the epoch's history row)."""
    from tempo.core.verify import IntegrityError, NonFiniteError, freivalds_rounds, training_alpha
    from tempo.enclave.client import OffloadError, OffloaderGone
    from tempo.enclave.pools import POOL_NAMES
    from tempo.enclave.private import offloaded_products

    cfg.validate()
    out = resolve_out(cfg)
    if cfg.device != "cpu" and not torch.cuda.is_available():
        raise ConfigError("device", f"--device {cfg.device}: torch sees no CUDA device here")
    ckpt_path = out / "checkpoint.pt"
    state = None
    if cfg.resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = ckpt.read_checkpoint(ckpt_path)
        theirs = state["config"] if isinstance(state["config"], dict) else {}
        for key in ("model", "width", "dataset", "val_fraction", "seed"):
            if key in theirs and theirs[key] != getattr(cfg, key):
                raise ckpt.CheckpointError(
                    f"{ckpt_path} is a run of {key} {theirs[key]!r}, not {getattr(cfg, key)!r}: resume it with the "
                    f"same --{key.replace('_', '-')}, or start a new run with another --out")
    torch.manual_seed(cfg.seed)
    split = datasets.hold_out(datasets.load(cfg.dataset, cfg.data_dir, seed=cfg.seed, partial=cfg.partial_data),
                              cfg.val_fraction, cfg.seed)
    if log:
        log.info("data.loaded", source=split.source, **split.counts())
    model = models.build(cfg.model, split.image_shape, split.classes, cfg.width)
    if state is not None:
        models.load_weights(model, state["model"], str(ckpt_path))
    _make_out(out, cfg)
    n = len(split.train_x)
    steps_per_epoch = -(-n // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    masking = cfg.masking_preset()
    shared = cfg.uses_shares()
    asym = cfg.asymml_config() if cfg.protection == "asymml" else None
    # shares hide every product: nothing need stay in the enclave; AsymML splits every layer's input
    kept = () if shared or asym is not None else masking.keep
    products = max(1, offloaded_products(model) - len(kept))  # L in Theorem V.2: what is offloaded
    if log and cfg.mode == "tempo":  # once: what this protection leaks, measured, or the mode's premise
        if asym is not None:
            from tempo.core.asymml import DP_DOES_NOT_COVER

            log.info("train.protection", weights="in the clear on the relays, by design",
                     notice="relays see each layer's clipped residual plus Gaussian noise; the DP guarantee "
                            f"(summary.json) does not cover {DP_DOES_NOT_COVER}", **asym.describe())
        elif shared:
            log.info("train.protection", protection="shares", holds_while="no two of the pools p1, p2, p3 collude "
                     "(any two rebuild every operand: docs/SHARES.md)")
        else:
            log.info("train.protection", protection="masking", notice=protection.leak_notice(masking))
    rounds = 0
    if cfg.mode == "tempo":
        alpha = training_alpha(cfg.epochs, n, cfg.batch_size)
        rounds = freivalds_rounds(cfg.integrity_t, alpha, cfg.relays, max(1, products))
        if log:
            log.info("train.integrity", t=cfg.integrity_t, alpha=alpha, relays=cfg.relays, layers=products,
                     freivalds_rounds=rounds)
    # plain mode on CUDA is the non-private GPU baseline; the enclave itself always runs on CPU
    compute = torch.device(cfg.device if cfg.mode == "plain" else "cpu")
    model.to(compute)

    session = client = engine = None
    net = model
    keys = None  # the session's masking keys (none in plain or the shares mode; identities in AsymML)
    start = time.perf_counter()
    try:
        try:  # the set-up: a signal here (Ctrl-C while the cluster starts) leaves nothing behind
            if cfg.mode == "tempo":
                from tempo.session import Session, SessionConfig

                session = Session(SessionConfig(
                    relays=cfg.relays, offloader=cfg.offloader, protection=cfg.protection, masking=masking, asymml=asym,
                    pool_keys=cfg.pool_keys, device=cfg.device, integrity_t=cfg.integrity_t, rounds=rounds,
                    pipeline=cfg.pipeline, split_min_mb=cfg.split_min_mb, part_timeout_s=cfg.part_timeout_s,
                    heartbeat_timeout_s=cfg.heartbeat_timeout_s,
                    relay_wait_s=cfg.relay_wait_s if cfg.offloader else 30.0, arena_mb=cfg.arena_mb,
                    faults={0: cfg.inject_fault} if cfg.inject_fault else {}), log=log)
                keys = session.keys
                net = session.private(model, keep=kept)
                client, engine = session.client, session.engine
            opt = _optimizer(cfg, model.parameters())
            if session is not None:
                session.wrap(opt)  # each optimizer step ends the session's step
            sched = _schedule(cfg, opt, total_steps)
            g = torch.Generator().manual_seed(cfg.seed)
            steps, first_epoch, first_batch, loss_value = 0, 0, 0, float("nan")
            order = None
            epoch_loss, batches, epoch_time, epoch_images = 0.0, 0, 0.0, 0
            history: list[dict] = []
            elapsed_before, resumes = 0.0, 0
            step_times: list[float] = []
            if state is not None:
                opt.load_state_dict(state["optimizer"])
                if sched is not None and state.get("scheduler"):
                    sched.load_state_dict(state["scheduler"])
                g.set_state(state["generator"])
                torch.set_rng_state(state["torch_rng"])
                steps, first_epoch, first_batch = state["step"], state["epoch"], state["batch"]
                order, epoch_loss, batches = state["order"], state["epoch_loss"], state["batches"]
                epoch_time, epoch_images = state.get("epoch_time_s", 0.0), state.get("epoch_images", 0)
                history = list(state.get("history", []))
                elapsed_before, resumes = state.get("elapsed_s", 0.0), state.get("resumes", 0) + 1
                if log:
                    log.info("train.resumed", step=steps, epoch=first_epoch + 1, batch=first_batch, resumes=resumes)
        except KeyboardInterrupt as exc:
            raise _interrupted(exc, (state["step"], ckpt_path) if state is not None else None, out) from None
        steps_at_start = steps
        last_ckpt: tuple[int, Path] | None = (steps, ckpt_path) if state is not None else None

        def save_checkpoint(epoch: int, batch: int, order: torch.Tensor | None) -> None:
            nonlocal last_ckpt
            ckpt.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                       "scheduler": sched.state_dict() if sched is not None else None,
                       "generator": g.get_state(), "torch_rng": torch.get_rng_state(), "step": steps,
                       "epoch": epoch, "batch": batch, "order": order, "epoch_loss": epoch_loss,
                       "batches": batches, "epoch_time_s": epoch_time, "epoch_images": epoch_images,
                       "history": history, "elapsed_s": elapsed_before + time.perf_counter() - start,
                       "resumes": resumes, "config": asdict(cfg)}, ckpt_path)
            last_ckpt = (steps, ckpt_path)

        resume_point = (first_epoch, first_batch, order)  # where the next step starts, for a checkpoint
        try:
            for epoch in range(first_epoch, cfg.epochs):
                net.train()
                if keys is not None:
                    keys.new_epoch()
                if order is None or epoch != first_epoch:
                    order = torch.randperm(n, generator=g)
                    epoch_loss, batches, epoch_time, epoch_images = 0.0, 0, 0.0, 0
                    start_batch = 0
                else:
                    start_batch = first_batch
                resume_point = (epoch, start_batch, order)
                for bi in range(start_batch, steps_per_epoch):
                    idx = order[bi * cfg.batch_size : (bi + 1) * cfg.batch_size]
                    x, y = split.train_x[idx].to(compute), split.train_y[idx].to(compute)
                    step_start = time.perf_counter()
                    try:
                        loss = F.cross_entropy(net(x), y)
                        if not math.isfinite(float(loss.detach())):
                            raise NonFiniteError(f"the loss is {float(loss.detach())}")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                    except NonFiniteError as exc:
                        raise _diverged(steps + 1, str(exc), last_ckpt) from None
                    except (OffloadError, IntegrityError) as exc:
                        # nothing of this step was applied: checkpoint the state before it and stop
                        save_checkpoint(*resume_point)
                        events = client.relay_events if client is not None else []
                        if isinstance(exc, OffloaderGone):  # a local cluster's death too (ClusterDied)
                            what = str(exc)
                            fix = "start the off-loader again" if session.cluster is None else "fix what killed it"
                        else:
                            what = f"{exc}. Relays quarantined or lost: {[e['relay'] + ' (' + e['reason'] + ')' for e in events]}"
                            fix = "fix the relays"
                        raise TrainingStopped(
                            f"step {steps + 1} could not be computed and verified: {what}. A checkpoint of the state "
                            f"before this step is at {ckpt_path}; {fix} and resume with --resume"
                        ) from None
                    with interrupt.deferred():  # an update and its bookkeeping are never cut in half
                        opt.step()
                        if sched is not None:
                            sched.step()
                        took = time.perf_counter() - step_start
                        step_times.append(took)
                        steps += 1
                        batches += 1
                        epoch_time += took
                        epoch_images += len(idx)
                        loss_f = float(loss.detach())
                        epoch_loss += loss_f
                        resume_point = (epoch, bi + 1, order)
                        if cfg.checkpoint_every and steps % cfg.checkpoint_every == 0:
                            save_checkpoint(*resume_point)
                    if progress:
                        rate = epoch_images / epoch_time if epoch_time > 0 else 0.0
                        mean_step = epoch_time / max(1, batches)
                        progress({"kind": "step", "epoch": epoch + 1, "epochs": cfg.epochs, "batch": bi + 1,
                                  "batches": steps_per_epoch, "step": steps, "total_steps": total_steps,
                                  "loss": loss_f, "images_per_s": rate,
                                  "eta_s": mean_step * (total_steps - steps)})
                    if cfg.halt_after_steps is not None and steps >= cfg.halt_after_steps:
                        raise Halted(f"halted after {steps} steps")
                loss_value = epoch_loss / max(1, batches)
                val_accuracy = None
                validate = cfg.val_every and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs)
                if split.val_x is not None and validate:
                    net.eval()
                    val_accuracy = evaluate(net, split.val_x.to(compute), split.val_y.to(compute), cfg.batch_size,
                                            after_batch=session.end_step if session is not None else None)
                row = {"epoch": epoch + 1, "steps": steps, "train_loss": round(loss_value, 6),
                       "val_accuracy": val_accuracy, "epoch_s": round(epoch_time, 4),
                       "images_per_s": round(epoch_images / epoch_time, 2) if epoch_time > 0 else 0.0,
                       "lr": opt.param_groups[0]["lr"]}
                with interrupt.deferred():
                    history.append(row)
                    resume_point = (epoch + 1, 0, None)
                    save_checkpoint(*resume_point)
                    _write_metrics(out / "metrics.csv", history)
                if log:
                    log.info("train.epoch", **row)
                if progress:
                    progress({"kind": "epoch", "epochs": cfg.epochs, **row})
            if cfg.resume and first_epoch >= cfg.epochs:
                loss_value = history[-1]["train_loss"] if history else epoch_loss / max(1, batches)
            net.eval()
            test_x, test_y = split.test_x.to(compute), split.test_y.to(compute)
            accuracy = evaluate(net, test_x, test_y, cfg.batch_size,
                                after_batch=session.end_step if session is not None else None)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP under interrupt.handle_signals
            if steps > steps_at_start:
                save_checkpoint(*resume_point)
            raise _interrupted(exc, last_ckpt, out) from None
        this_run = time.perf_counter() - start
        breakdown = Breakdown()
        offload, dp = {}, None
        if client is not None and shared:
            s = engine.shares
            breakdown = Breakdown(s.open_s + s.seal_s, 0.0, s.combine_s + s.blame_s, s.wait_s,
                                  max(0.0, this_run - s.open_s - s.seal_s - s.combine_s - s.blame_s - s.wait_s))
            offload = {**asdict(engine.counters), "freivalds_rounds": rounds, "protection": "shares",
                       "pools": list(POOL_NAMES), "bytes_sent": s.bytes_sent, "bytes_received": s.bytes_received,
                       "failed_sums": s.failed_sums, "blamed_by_pool": {str(k): v for k, v in s.blamed.items()}}
        elif client is not None:
            c = client.counters
            breakdown = Breakdown(c.encrypt_s, c.decrypt_s, c.verify_s, c.wait_s,
                                  max(0.0, this_run - c.encrypt_s - c.decrypt_s - c.verify_s - c.wait_s))
            offload = {**asdict(engine.counters), "freivalds_rounds": rounds, "keys_generated": keys.generated}
            if asym is not None:
                from tempo.core.asymml import dp_account

                # each training image's residual goes out once per AsymML layer per epoch begun
                dp = dp_account(session.asymml.layer_entries(), -(-steps // steps_per_epoch), asym)
                offload.update(asym.describe(), asymml=session.asymml.stats())
            else:
                offload.update(protection="masking", **masking.describe())
        else:
            breakdown.enclave_other = this_run
        events = client.relay_events if client is not None else []
        if client is not None:
            offload.update(failed_verifications=client.counters.failed_verifications,
                           part_timeouts=client.counters.timeouts, pipeline=cfg.pipeline,
                           weights_masked_ahead=getattr(engine, "prefetch_used", 0),
                           premasks_dropped=client.counters.premasks_dropped,
                           weights_shipped_ahead=client.counters.staged_forwards,
                           parts_by_relay=dict(sorted(client.counters.parts_by_relay.items())))
        summary = Summary(
            mode=cfg.mode, model=cfg.model, dataset=cfg.dataset, epochs=cfg.epochs, steps=steps,
            batch_size=cfg.batch_size, relays=cfg.relays if cfg.mode == "tempo" else 0, device=cfg.device,
            train_loss=loss_value, test_accuracy=accuracy, wall_s=elapsed_before + this_run,
            median_step_s=round(statistics.median(step_times), 5) if step_times else 0.0,
            val_accuracy=history[-1]["val_accuracy"] if history else None, out=str(out), resumed=state is not None,
            resumes=resumes, images=split.counts(), data=split.source, history=history,
            breakdown={k: round(v, 4) for k, v in asdict(breakdown).items()}, offload=offload,
            quarantined_relays=[e for e in events if e["event"] == "quarantined"],
            lost_relays=[e for e in events if e["event"] == "lost"], dp=dp)
        ckpt.save({k: v.cpu() for k, v in model.state_dict().items()}, out / "model.pt")
        (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
        return summary
    finally:
        if session is not None:
            session.close()
