"""Private training: the enclave's loop. Linear and Conv2d products are offloaded masked; the
loss, non-linear layers and the optimizer run here on plaintext (paper §IV-B, §IV-C).

`run` trains with ``mode="tempo"`` through real off-loader and relay processes it starts and
stops itself (Tempo-l), or with ``mode="plain"``: the same loop without any offload, the
pure-TEE baseline on CPU.
"""

from __future__ import annotations

import json
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
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 7
    relays: int = 2
    device: str = "cpu"
    mode: str = "tempo"
    rounds: int = 16
    out: str = "runs/latest"
    arena_mb: int = 256


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
    breakdown: dict = field(default_factory=dict)
    offload: dict = field(default_factory=dict)


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


def run(cfg: TrainConfig, progress: Callable[[dict], None] | None = None, log=None) -> Summary:
    if cfg.mode not in ("tempo", "plain"):
        raise ValueError("mode must be tempo or plain")
    if cfg.device != "cpu":
        raise ValueError("training runs the enclave on the CPU; GPU relays are not wired into `tempo train` yet")
    torch.manual_seed(cfg.seed)
    split = datasets.load(cfg.dataset, cfg.data_dir, seed=cfg.seed)
    model = models.build(cfg.model, split.image_shape, split.classes, cfg.width)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    cluster = client = engine = None
    net = model
    pctx = None
    start = time.perf_counter()
    try:
        if cfg.mode == "tempo":
            from tempo.cluster import LocalCluster
            from tempo.enclave.client import OffloadClient, default_job_id
            from tempo.enclave.private import ClientEngine, PrivateContext, to_private

            cluster = LocalCluster(relays=cfg.relays).start()
            job = default_job_id()
            client = OffloadClient(cluster.enclave_endpoint, job, arena_bytes=cfg.arena_mb << 20,
                                   rounds=cfg.rounds, log=log)
            client.wait_for_relays(cfg.relays)
            engine = ClientEngine(client)
            pctx = PrivateContext(engine, job=job)
            net = to_private(model, pctx)
        opt = _optimizer(cfg, model.parameters())
        g = torch.Generator().manual_seed(cfg.seed)
        steps, loss_value = 0, float("nan")
        n = len(split.train_x)
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=g)
            epoch_loss, batches = 0.0, 0
            for i in range(0, n, cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                loss = F.cross_entropy(net(split.train_x[idx]), split.train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if pctx is not None:
                    pctx.end_step()
                steps += 1
                batches += 1
                loss_f = float(loss.detach())
                epoch_loss += loss_f
                if progress:
                    progress({"epoch": epoch + 1, "epochs": cfg.epochs, "step": steps, "loss": loss_f,
                              "images_per_s": steps * cfg.batch_size / (time.perf_counter() - start)})
            loss_value = epoch_loss / max(1, batches)
            if log:
                log.info("train.epoch", epoch=epoch + 1, loss=round(loss_value, 5))
        accuracy = evaluate(net, split.test_x, split.test_y, cfg.batch_size,
                            after_batch=pctx.end_step if pctx is not None else None)
        wall = time.perf_counter() - start
        breakdown = Breakdown()
        offload = {}
        if client is not None:
            c = client.counters
            breakdown = Breakdown(c.encrypt_s, c.decrypt_s, c.verify_s, c.wait_s,
                                  max(0.0, wall - c.encrypt_s - c.decrypt_s - c.verify_s - c.wait_s))
            offload = asdict(engine.counters)
        else:
            breakdown.enclave_other = wall
        summary = Summary(cfg.mode, cfg.model, cfg.dataset, cfg.epochs, steps, cfg.batch_size,
                          cfg.relays if cfg.mode == "tempo" else 0, cfg.device, loss_value, accuracy,
                          wall, {k: round(v, 4) for k, v in asdict(breakdown).items()}, offload)
        torch.save(model.state_dict(), out / "model.pt")
        (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
        return summary
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.stop()
