"""A short private training whose relay view and ground truth are captured.

Two ways, the same training: in-process (`InProcessEngine`, the one masked round trip without
processes: fast, for tests) or through real off-loader and relay processes that record what they
receive (`tempo relay --record`), the view then read back from their recording. Either way an
observer on the enclave side keeps the plaintext and each step's data (`RunTruth`) apart from
the view, for scoring. No keys are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tempo import data as datasets
from tempo import models
from tempo.audit.view import ProductTruth, ProductView, RunTruth, RunView, StepTruth, load_recording


@dataclass
class CaptureConfig:
    model: str = "mlp"
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.1
    seed: int = 7
    masking: str = "paper"  # a preset of tempo.enclave.protection
    key_refresh: str | None = None  # options on top of the preset (None: the preset's)
    key_space: str | None = None
    mix: int | None = None
    keep: tuple[str, ...] | None = None
    patch_rows: bool | None = None
    evaluate: bool = True  # evaluation batches (forward only) at the end, as a run makes them
    relays: int = 0  # 0: in-process; N: N real relay processes that record what they receive
    protection: str = "masking"  # or "shares": three relay pools (relays: per pool); or "asymml" (every layer split)
    asymml: object | None = None  # the asymml mode's knobs (tempo.core.asymml.AsymmlConfig; None: its defaults)


def capture(cfg: CaptureConfig, record_dir: str | Path | None = None, log=None) -> tuple[RunView, RunTruth, datasets.Split]:
    """Train `cfg.model` privately on the shipped digits and return what the relays saw, the
    ground truth, and the data split: the victim trains on ``train``, evaluates on ``test``;
    ``val`` (a quarter of the training images, held out) is the attacker's public sample of the
    distribution, which the victim never touches. With ``cfg.relays``, the view is read back
    from the relays' recording in `record_dir`."""
    from tempo.enclave.private import InProcessEngine, PrivateContext
    from tempo.enclave.protection import preset

    torch.manual_seed(cfg.seed)
    split = datasets.hold_out(datasets.load("digits", seed=cfg.seed), 0.25, cfg.seed)
    model = models.build(cfg.model, split.image_shape, split.classes)
    observed, truth = RunView(), RunTruth(cfg.model)

    def observe(event, bind, masked, product) -> None:
        key = (bind.step, bind.layer, bind.part)
        if event == "forward":
            a_enc, b_enc = masked
            observed.products.append(ProductView(*key, a_enc.detach().clone(), b_enc.detach().clone()))
            truth.products[key] = ProductTruth(product.a.detach().clone(), product.b.detach().clone())
        else:
            (e,) = masked
            held = next(p for p in reversed(observed.products) if p.key == key)
            held.e = e.detach().clone()
            truth.products[key].grad_c = product.grad_c.detach().clone()

    if cfg.protection == "shares":
        return _capture_shares(cfg, model, split, truth, record_dir, log)
    if cfg.protection == "asymml":  # every layer split, identity keys: the observer sees what a relay sees
        from tempo.core.asymml import AsymmlConfig
        from tempo.enclave.asymml import AsymmlState, IdentityKeys

        keys, patch_rows, keep, mode = IdentityKeys(), True, (), "asymml"
        # the enclave's noise source (seeded from the OS: never the attacker's)
        state = AsymmlState((cfg.asymml or AsymmlConfig()).validate())
    else:
        masking = preset(cfg.masking).with_options(key_space=cfg.key_space, key_refresh=cfg.key_refresh, mix=cfg.mix,
                                                    keep=cfg.keep, patch_rows=cfg.patch_rows)
        keys, patch_rows, keep, mode, state = masking.keys(), masking.patch_rows, masking.keep, "masked", None
    if not cfg.relays:
        pctx = PrivateContext(InProcessEngine(rounds=8, keys=keys, observer=observe), job="audit",
                              patch_rows=patch_rows, asymml=state)
        _train(model, pctx, keys, split, cfg, truth, log, keep)
        view = observed
    else:
        if record_dir is None:
            raise ValueError("capturing through relays needs a directory for their recording")
        from tempo.cluster import LocalCluster
        from tempo.enclave.client import OffloadClient
        from tempo.enclave.private import ClientEngine

        with LocalCluster(relays=cfg.relays, record_dir=str(record_dir)) as cluster, \
                OffloadClient(cluster.enclave_endpoint, "audit", rounds=8, keys=keys, log=log, mode=mode) as client:
            client.observer = observe
            client.watchdog = cluster.check
            client.wait_for_relays(cfg.relays)
            pctx = PrivateContext(ClientEngine(client, parts=cfg.relays), job="audit", patch_rows=patch_rows,
                                  asymml=state)
            _train(model, pctx, keys, split, cfg, truth, log, keep)
        view = load_recording(record_dir, job="audit")
        _check_same(view, observed)
    if state is not None:
        truth.asymml = state.stats()
    return view, truth, split


def _check_same(recorded: RunView, sent: RunView) -> None:
    """The relays' recording holds, tensor for tensor, what the enclave sent them."""
    by_key = {p.key: p for p in sent.products}
    if {p.key for p in recorded.products} != set(by_key):
        raise ValueError("the relays' recording does not hold the products the enclave sent")
    for p in recorded.products:
        q = by_key[p.key]
        same_e = (p.e is None) == (q.e is None) and (p.e is None or torch.equal(p.e, q.e))
        if not (torch.equal(p.a, q.a) and torch.equal(p.b, q.b) and same_e):
            raise ValueError(f"the relays' recording of product {p.key} differs from what the enclave sent")


def _train(model, pctx, keys, split, cfg: CaptureConfig, truth: RunTruth, log, keep: tuple[str, ...]) -> None:
    from tempo.enclave.private import to_private

    net = to_private(model, pctx, keep=keep)
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
            log.info("audit.capture.epoch", epoch=epoch + 1, steps=pctx.step)
    if cfg.evaluate:
        net.eval()
        with torch.no_grad():
            for i in range(0, len(split.test_x), cfg.batch_size):
                x, y = split.test_x[i : i + cfg.batch_size], split.test_y[i : i + cfg.batch_size]
                truth.steps[pctx.step] = StepTruth(x.clone(), y.clone(), train=False)
                net(x)
                pctx.end_step()
    truth.final_state = {k: v.detach().clone() for k, v in model.state_dict().items()}


def _capture_shares(cfg: CaptureConfig, model, split, truth: RunTruth, record_dir, log):
    """The shares mode's run: returns the pools' records (what each pool member opened, as
    `tempo.audit.view.shares_records` reads them) in place of a view; in-process, or from
    recording pool relays. As in `tempo train`, a convolution's pools get the images (their
    shares) and unfold them; the view and the truth put it in the paper's layout (weights times
    each image's patches), the one the CNN attacks read (`tempo.audit.view.paper_layout`)."""
    from tempo.audit.view import paper_grads, paper_layout
    from tempo.enclave.pools import POOL_NAMES, LocalPools, RelayPools, SharesEngine
    from tempo.enclave.private import PrivateContext
    from tempo.core.shares import ROLES

    images: dict = {}  # convolutions' batch sizes, by binding, until their backward

    class Observed(SharesEngine):  # the plaintext, for scoring only
        def forward(self, a, b, bind, weight=None):
            truth.products[(bind.step, bind.layer, bind.part)] = ProductTruth(a.detach().clone(), b.detach().clone())
            return super().forward(a, b, bind, weight)

        def conv_forward(self, x, w, conv, bind):  # recorded in the paper's layout, as the view is
            a, b = paper_layout(x.detach(), w.detach(), conv)
            truth.products[(bind.step, bind.layer, bind.part)] = ProductTruth(a.clone(), b.clone())
            images[bind] = x.shape[0]
            return super().conv_forward(x, w, conv, bind)

        def backward(self, grad_c, bind):
            g = grad_c.detach()
            n = images.pop(bind, None)
            if n is not None:
                g = paper_grads(g, n)
            truth.products[(bind.step, bind.layer, bind.part)].grad_c = g.clone()
            return super().backward(grad_c, bind)

    records: list[dict] = []
    names = dict(zip(ROLES, POOL_NAMES))

    def observe(role, bind, what, header, tensors) -> None:
        records.append({"op": "sealed", "bind": bind.to_wire(), "pool": names[role], "part": what,
                        "request": dict(header), "tensors": [t.clone() for t in tensors]})

    class Keys:  # no keys in this mode: the epochs go by
        def new_epoch(self) -> None:
            pass

    if not cfg.relays:
        pctx = PrivateContext(Observed(LocalPools(observer=observe), rounds=8), job="audit", patch_rows=False)
        _train(model, pctx, Keys(), split, cfg, truth, log, ())
        return records, truth, split
    if record_dir is None:
        raise ValueError("capturing through relays needs a directory for their recording")
    from tempo.audit.view import shares_records
    from tempo.cluster import LocalCluster
    from tempo.enclave.client import OffloadClient

    with LocalCluster(relays=0, pools=dict.fromkeys(POOL_NAMES, cfg.relays), record_dir=str(record_dir)) as cluster, \
            OffloadClient(cluster.enclave_endpoint, "audit", log=log) as client:
        client.watchdog = cluster.check
        engine = Observed(RelayPools(client, {r: (n, cluster.pool_keys[n]) for r, n in names.items()}), rounds=8)
        pctx = PrivateContext(engine, job="audit", patch_rows=False)
        _train(model, pctx, Keys(), split, cfg, truth, log, ())
    return shares_records(record_dir, job="audit"), truth, split
