"""A short private training whose relay view and ground truth are captured in-process.

The products go through the one masked round trip (`InProcessEngine`), exactly as relays would
receive them; an observer keeps what a relay would hold (`RunView`) and, apart from it, the
enclave's plaintext and each step's data (`RunTruth`), for scoring. No keys are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tempo import data as datasets
from tempo import models
from tempo.audit.view import ProductTruth, ProductView, RunTruth, RunView, StepTruth


@dataclass
class CaptureConfig:
    model: str = "mlp"
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.1
    seed: int = 7
    key_refresh: str = "step"  # or "epoch" (the paper's)
    key_space: str = "int:256"  # tempo.enclave.keys.KeySpace.parse
    evaluate: bool = True  # evaluation batches (forward only) at the end, as a run makes them


def capture(cfg: CaptureConfig, log=None) -> tuple[RunView, RunTruth, datasets.Split]:
    """Train `cfg.model` privately on the shipped digits and return what the relays saw, the
    ground truth, and the data split: the victim trains on ``train``, evaluates on ``test``;
    ``val`` (a quarter of the training images, held out) is the attacker's public sample of the
    distribution, which the victim never touches."""
    from tempo.enclave.keys import KeySchedule, KeySpace
    from tempo.enclave.private import InProcessEngine, PrivateContext, to_private

    torch.manual_seed(cfg.seed)
    split = datasets.hold_out(datasets.load("digits", seed=cfg.seed), 0.25, cfg.seed)
    model = models.build(cfg.model, split.image_shape, split.classes)
    view, truth = RunView(), RunTruth(cfg.model)

    def observe(event, bind, masked, product) -> None:
        key = (bind.step, bind.layer, bind.part)
        if event == "forward":
            a_enc, b_enc = masked
            view.products.append(ProductView(*key, a_enc.detach().clone(), b_enc.detach().clone()))
            truth.products[key] = ProductTruth(product.a.detach().clone(), product.b.detach().clone())
        else:
            (e,) = masked
            held = next(p for p in reversed(view.products) if p.key == key)
            held.e = e.detach().clone()
            truth.products[key].grad_c = product.grad_c.detach().clone()

    keys = KeySchedule(cfg.key_refresh, KeySpace.parse(cfg.key_space))
    pctx = PrivateContext(InProcessEngine(rounds=8, keys=keys, observer=observe), job="audit")
    net = to_private(model, pctx)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(cfg.seed)
    n = len(split.train_x)
    for epoch in range(cfg.epochs):
        keys.new_epoch()
        net.train()
        order = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x, y = split.train_x[idx], split.train_y[idx]
            truth.steps[pctx.step] = StepTruth(x.clone(), y.clone(), train=True)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pctx.end_step()
        if log:
            log.info("audit.capture.epoch", epoch=epoch + 1, products=len(view.products))
    if cfg.evaluate:
        net.eval()
        with torch.no_grad():
            for i in range(0, len(split.test_x), cfg.batch_size):
                x, y = split.test_x[i : i + cfg.batch_size], split.test_y[i : i + cfg.batch_size]
                truth.steps[pctx.step] = StepTruth(x.clone(), y.clone(), train=False)
                net(x)
                pctx.end_step()
    truth.final_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return view, truth, split
