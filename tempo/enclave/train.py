"""Private training: the enclave's loop. Linear and Conv2d products are offloaded masked; the
loss, non-linear layers and the optimizer run here on plaintext (paper §IV-B, §IV-C).

`run` trains with ``mode="tempo"`` through real off-loader and relay processes it starts and
stops itself (Tempo-l), or with ``mode="plain"``: the same loop without any offload, the
pure-TEE baseline on CPU.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tempo import data as datasets
from tempo import models


@dataclass
class TrainConfig:
    model: str = "cnn"
    width: int | None = None
    dataset: str = "digits"
    data_dir: str | None = None
    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.1
    optimizer: str = "sgd"
    schedule: str = "none"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 7
    relays: int = 2
    pipeline: bool = True  # overlap masking, relay compute and unmasking across a product's parts
    split_min_mb: float = 4.0  # products smaller than this (operands + result) are not split
    device: str = "cpu"
    mode: str = "tempo"
    key_refresh: str = "step"
    integrity_t: float = 1e-6
    out: str = "runs/latest"
    resume: bool = False
    checkpoint_every: int = 20
    arena_mb: int = 256
    halt_after_steps: int | None = None  # tests: stop as if killed after this many steps
    inject_fault: str | None = None  # start relay 0 with --fault MODE[:RATE]
    part_timeout_s: float = 30.0
    heartbeat_timeout_s: float = 3.0
    offloader: str | None = None  # a separately started off-loader's enclave endpoint (tempo enclave)
    relay_wait_s: float = 60.0  # with `offloader`: how long to wait for `relays` relays to join


# What a job file may set (`tempo enclave --config`): the job, not the test hooks.
JOB_KEYS = ("model", "width", "dataset", "data_dir", "epochs", "batch_size", "lr", "optimizer", "schedule",
            "momentum", "weight_decay", "seed", "relays", "pipeline", "split_min_mb", "device", "key_refresh", "integrity_t",
            "out", "resume", "checkpoint_every", "arena_mb", "part_timeout_s")


def load_job(path: str | Path, **overrides) -> TrainConfig:
    """A `TrainConfig` from a TOML job file (keys: `JOB_KEYS`, at the top level or under
    ``[job]``); `overrides` that are not ``None`` win. Unknown keys and wrong types are errors."""
    import tomllib

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"job file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"job file {path} is not valid TOML: {exc}") from None
    job = doc.get("job", doc)
    unknown = sorted(set(job) - set(JOB_KEYS))
    if unknown:
        raise ValueError(f"job file {path}: unknown key(s) {unknown}; known: {', '.join(JOB_KEYS)}")
    defaults = TrainConfig()
    values = {}
    for key, value in {**job, **{k: v for k, v in overrides.items() if v is not None}}.items():
        default = getattr(defaults, key, None)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"job file {path}: {key} must be true or false, not {value!r}")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if default is not None and not isinstance(value, type(default)):
            raise ValueError(f"job file {path}: {key} must be a {type(default).__name__}, not {value!r}")
        values[key] = value
    return TrainConfig(**values)


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
    wall_s: float
    median_step_s: float = 0.0  # one training step (forward, backward, update), evaluation excluded
    breakdown: dict = field(default_factory=dict)
    offload: dict = field(default_factory=dict)
    quarantined_relays: list = field(default_factory=list)
    lost_relays: list = field(default_factory=list)


def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; sgd or adamw")


def evaluate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, after_batch=None) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += int((net(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
            if after_batch:
                after_batch()
    return correct / max(1, len(x))


def offloaded_products(module: torch.nn.Module) -> int:
    """Products per forward pass: Linear, Conv2d and Matmul modules (L in Theorem V.2)."""
    from tempo.layers import Matmul

    return sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, Matmul)) for m in module.modules())


def _schedule(cfg: TrainConfig, opt: torch.optim.Optimizer, total_steps: int):
    if cfg.schedule == "none":
        return None
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    if cfg.schedule == "step":
        milestones = [int(total_steps * 0.5), int(total_steps * 0.75)]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; none, cosine or step")


class Halted(RuntimeError):
    """Raised by `halt_after_steps` (tests): the run stops as a killed one would."""


class TrainingStopped(RuntimeError):
    """No healthy relay could compute a step: stopped before any unverified update, with a
    checkpoint to resume from."""


def run(cfg: TrainConfig, progress: Callable[[dict], None] | None = None, log=None) -> Summary:
    from tempo.enclave.client import OffloadError
    from tempo.enclave.keys import KeySchedule
    from tempo.enclave.verify import IntegrityError, freivalds_rounds, training_alpha

    if cfg.mode not in ("tempo", "plain"):
        raise ValueError("mode must be tempo or plain")
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ValueError("device must be cpu, cuda or cuda:i")
    if cfg.device != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: torch sees no CUDA device here")
    torch.manual_seed(cfg.seed)
    split = datasets.load(cfg.dataset, cfg.data_dir, seed=cfg.seed)
    model = models.build(cfg.model, split.image_shape, split.classes, cfg.width)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    n = len(split.train_x)
    steps_per_epoch = -(-n // cfg.batch_size)
    products = offloaded_products(model)
    alpha = training_alpha(cfg.epochs, n, cfg.batch_size)
    rounds = freivalds_rounds(cfg.integrity_t, alpha, cfg.relays if cfg.mode == "tempo" else 1, max(1, products))
    if log:
        log.info("train.integrity", t=cfg.integrity_t, alpha=alpha, relays=cfg.relays, layers=products,
                 freivalds_rounds=rounds)
    # plain mode on CUDA is the non-private GPU baseline; the enclave itself always runs on CPU
    compute = torch.device(cfg.device if cfg.mode == "plain" else "cpu")
    model.to(compute)

    cluster = client = engine = None
    net = model
    pctx = None
    keys = KeySchedule(cfg.key_refresh)
    start = time.perf_counter()
    try:
        if cfg.mode == "tempo":
            from tempo.cluster import LocalCluster
            from tempo.enclave.client import OffloadClient, default_job_id
            from tempo.enclave.private import ClientEngine, PrivateContext, to_private

            from tempo.relay import Fault

            if cfg.offloader:  # Tempo as deployed: off-loader and relays started on their own
                if cfg.inject_fault:
                    raise ValueError("inject_fault starts a local relay; start a relay with --fault instead")
                endpoint = cfg.offloader
            else:  # Tempo-l in one command: start them here
                faults = {0: cfg.inject_fault} if cfg.inject_fault else {}
                if cfg.inject_fault:
                    Fault.parse(cfg.inject_fault)  # a bad spec fails here, clearly
                cluster = LocalCluster(relays=cfg.relays, device=cfg.device, faults=faults,
                                       heartbeat_timeout_s=cfg.heartbeat_timeout_s,
                                       heartbeat_s=min(0.5, cfg.heartbeat_timeout_s / 4)).start()
                endpoint = cluster.enclave_endpoint
            job = default_job_id()
            client = OffloadClient(endpoint, job, arena_bytes=cfg.arena_mb << 20,
                                   rounds=rounds, log=log, keys=keys, part_timeout_s=cfg.part_timeout_s,
                                   max_attempts=cfg.relays + 1)
            if log:
                log.info("train.waiting_for_relays", offloader=endpoint, relays=cfg.relays)
            client.wait_for_relays(cfg.relays, timeout_s=cfg.relay_wait_s if cfg.offloader else 30.0)
            engine = ClientEngine(client, parts=cfg.relays, pipeline=cfg.pipeline, split_min_mb=cfg.split_min_mb)
            pctx = PrivateContext(engine, job=job)
            net = to_private(model, pctx)
        opt = _optimizer(cfg, model.parameters())
        sched = _schedule(cfg, opt, cfg.epochs * steps_per_epoch)
        g = torch.Generator().manual_seed(cfg.seed)
        steps, first_epoch, first_batch, loss_value = 0, 0, 0, float("nan")
        order = None
        epoch_loss, batches = 0.0, 0
        step_times: list[float] = []
        if cfg.resume:
            if not ckpt_path.exists():
                raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
            state = torch.load(ckpt_path, weights_only=False)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if sched is not None and state.get("scheduler"):
                sched.load_state_dict(state["scheduler"])
            g.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            steps, first_epoch, first_batch = state["step"], state["epoch"], state["batch"]
            order, epoch_loss, batches = state["order"], state["epoch_loss"], state["batches"]
            if log:
                log.info("train.resumed", step=steps, epoch=first_epoch + 1, batch=first_batch)

        def save_checkpoint(epoch: int, batch: int, order: torch.Tensor) -> None:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict() if sched is not None else None,
                     "generator": g.get_state(), "torch_rng": torch.get_rng_state(), "step": steps,
                     "epoch": epoch, "batch": batch, "order": order, "epoch_loss": epoch_loss,
                     "batches": batches, "config": asdict(cfg)}
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(ckpt_path)  # atomic: a kill never leaves half a checkpoint

        for epoch in range(first_epoch, cfg.epochs):
            net.train()
            keys.new_epoch()
            if order is None or epoch != first_epoch:
                order = torch.randperm(n, generator=g)
                epoch_loss, batches = 0.0, 0
                start_batch = 0
            else:
                start_batch = first_batch
            for bi in range(start_batch, steps_per_epoch):
                idx = order[bi * cfg.batch_size : (bi + 1) * cfg.batch_size]
                x, y = split.train_x[idx].to(compute), split.train_y[idx].to(compute)
                step_start = time.perf_counter()
                try:
                    loss = F.cross_entropy(net(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                except (OffloadError, IntegrityError) as exc:
                    # nothing of this step was applied: checkpoint the state before it and stop
                    save_checkpoint(epoch, bi, order)
                    events = client.relay_events if client is not None else []
                    raise TrainingStopped(
                        f"step {steps + 1} could not be computed and verified: {exc}. Relays quarantined or "
                        f"lost: {[e['relay'] + ' (' + e['reason'] + ')' for e in events]}. A checkpoint of the "
                        f"state before this step is at {ckpt_path}; fix the relays and resume with --resume"
                    ) from None
                opt.step()
                if sched is not None:
                    sched.step()
                if pctx is not None:
                    pctx.end_step()
                step_times.append(time.perf_counter() - step_start)
                steps += 1
                batches += 1
                loss_f = float(loss.detach())
                epoch_loss += loss_f
                if progress:
                    progress({"epoch": epoch + 1, "epochs": cfg.epochs, "step": steps, "loss": loss_f,
                              "images_per_s": batches * cfg.batch_size / (time.perf_counter() - start)})
                if cfg.checkpoint_every and steps % cfg.checkpoint_every == 0:
                    save_checkpoint(epoch, bi + 1, order)
                if cfg.halt_after_steps is not None and steps >= cfg.halt_after_steps:
                    raise Halted(f"halted after {steps} steps")
            loss_value = epoch_loss / max(1, batches)
            save_checkpoint(epoch + 1, 0, None)
            if log:
                log.info("train.epoch", epoch=epoch + 1, loss=round(loss_value, 5), steps=steps)
        if cfg.resume and first_epoch >= cfg.epochs:
            loss_value = epoch_loss / max(1, batches)
        net.eval()
        test_x, test_y = split.test_x.to(compute), split.test_y.to(compute)
        accuracy = evaluate(net, test_x, test_y, cfg.batch_size,
                            after_batch=pctx.end_step if pctx is not None else None)
        wall = time.perf_counter() - start
        breakdown = Breakdown()
        offload = {}
        if client is not None:
            c = client.counters
            breakdown = Breakdown(c.encrypt_s, c.decrypt_s, c.verify_s, c.wait_s,
                                  max(0.0, wall - c.encrypt_s - c.decrypt_s - c.verify_s - c.wait_s))
            offload = {**asdict(engine.counters), "freivalds_rounds": rounds, "keys_generated": keys.generated,
                       "key_refresh": cfg.key_refresh}
        else:
            breakdown.enclave_other = wall
        events = client.relay_events if client is not None else []
        if client is not None:
            offload.update(failed_verifications=client.counters.failed_verifications,
                           part_timeouts=client.counters.timeouts, pipeline=cfg.pipeline,
                           weights_masked_ahead=engine.prefetch_used, premasks_dropped=client.counters.premasks_dropped,
                           weights_shipped_ahead=client.counters.staged_forwards,
                           parts_by_relay=dict(sorted(client.counters.parts_by_relay.items())))
        summary = Summary(cfg.mode, cfg.model, cfg.dataset, cfg.epochs, steps, cfg.batch_size,
                          cfg.relays if cfg.mode == "tempo" else 0, cfg.device, loss_value, accuracy,
                          wall, round(statistics.median(step_times), 5) if step_times else 0.0,
                          {k: round(v, 4) for k, v in asdict(breakdown).items()}, offload,
                          [e for e in events if e["event"] == "quarantined"],
                          [e for e in events if e["event"] == "lost"])
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out / "model.pt")
        (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
        return summary
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.stop()
