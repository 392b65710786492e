"""`tempo bench train`: private training steps beside the pure-TEE and non-private baselines.

One run, one data shape, the same model and seed for every mode:

- ``tempo``: the enclave's loop through a real off-loader and `relays` relay processes (Tempo-l),
  each product split across the relays, pipelined or not;
- ``shares``: the same loop in the shares mode (`tempo.enclave.pools`): every product
  secret-shared across three relay pools of `relays` relays each; its breakdown: open (encoding,
  seeds, ``E = A − U``), seal (sealing requests, opening answers), combine_verify (the exact
  check and decoding), transfer_wait; and what the mode moves: bytes per step each way, and the
  relays' compute over the same products' plain work (fp32 matmuls of the same shapes timed
  here, forward and both backward products);
- ``asymml``: the ``tempo`` loop in the AsymML mode (`tempo.enclave.asymml`): no masking; its
  breakdown adds decompose (the light SVD, clipping and noise) and low_rank (the low-rank
  products the enclave computes itself) to the ``tempo`` categories;
- ``plain-cpu``: the same steps in plaintext on the CPU — the pure-TEE baseline (the enclave
  doing everything itself);
- ``plain-cuda``: the same steps on the GPU without any privacy — the limit. Skipped, with a
  note, where torch sees no CUDA device.

Per mode: the median step time, and a breakdown of the mean step. For ``tempo`` the enclave's
categories are measured where the work happens (encrypt — keys and masking —, decrypt,
verify, send — encoding and sending requests —, split_gather — cutting products into parts and
joining results —, transfer_wait — blocked on replies —, the optimizer step); ``non_linear`` is
the rest of the step outside offloaded products (the enclave's plaintext layers, loss,
autograd); ``offload_other`` is time inside the offload path no category covers (arena
bookkeeping, Python overhead per part) — the part of the step the breakdown does not explain. On the relays' side: their reported compute time, the
transfer time (the off-loader's dispatch-to-result turnaround minus that), and their idle time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tempo import models

MODES = ("tempo", "shares", "asymml", "plain-cpu", "plain-cuda")
SHARES_CATEGORIES = ("open", "seal", "combine_verify", "transfer_wait", "non_linear", "optimizer", "offload_other")
TEMPO_CATEGORIES = ("encrypt", "decrypt", "verify", "send", "split_gather", "transfer_wait", "decompose", "low_rank",
                    "non_linear", "optimizer", "offload_other")
PLAIN_CATEGORIES = ("forward_backward", "optimizer")


@dataclass
class ModeResult:
    mode: str
    step_s: float | None = None  # median
    mean_step_s: float | None = None
    steps: list[float] = field(default_factory=list)
    breakdown: dict = field(default_factory=dict)  # mean seconds per step, by category
    relays: dict = field(default_factory=dict)  # tempo: relay compute, transfer, idle (mean per step)
    explained: float | None = None  # tempo: share of the mean step the measured categories cover
    note: str = ""

    def as_dict(self) -> dict:
        def r(x):
            return None if x is None else round(x, 6)

        return {"mode": self.mode, "step_s": r(self.step_s), "mean_step_s": r(self.mean_step_s),
                "steps_s": [r(s) for s in self.steps],
                "breakdown": {k: r(v) for k, v in self.breakdown.items()},
                "relays": {k: r(v) for k, v in self.relays.items()},
                "explained": r(self.explained), "note": self.note}


def _data(shape: tuple[int, ...], classes: int, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    return x.to(device), y.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_label(mode: str, i: int, warmup: int, steps: int, seconds: float) -> str:
    """Progress wording: warm-up steps are named as such and not counted among the timed ones."""
    if i < warmup:
        return f"{mode} warm-up step {i + 1}/{warmup} (not timed): {seconds:.3f}s"
    return f"{mode} timed step {i - warmup + 1}/{steps}: {seconds:.3f}s"


def _plain(model_name, shape, classes, width, batch, steps, warmup, device, say) -> ModeResult:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = models.build(model_name, shape, classes, width).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = _data(shape, classes, batch, dev)
    times, fb, op = [], [], []
    for i in range(warmup + steps):
        _sync(dev)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _sync(dev)
        t1 = time.perf_counter()
        opt.step()
        _sync(dev)
        t2 = time.perf_counter()
        if i >= warmup:
            times.append(t2 - t0)
            fb.append(t1 - t0)
            op.append(t2 - t1)
        say(_step_label(device, i, warmup, steps, t2 - t0))
    mode = "plain-cuda" if dev.type == "cuda" else "plain-cpu"
    return ModeResult(mode, statistics.median(times), statistics.fmean(times), times,
                      {"forward_backward": statistics.fmean(fb), "optimizer": statistics.fmean(op)})


def _session(relays: int, device: str, arena_mb: int, log, **settings):
    """A session on local processes as `tempo train` starts them, with 16 Freivalds rounds and
    patience for large products (a part may take 5 minutes: the shares mode's CPU relays on a
    loaded 2-core machine took over 30 s for one of ResNet-18's, and a quarantine ends a bench)."""
    from tempo.session import Session

    return Session(relays=relays, device=device, arena_mb=arena_mb, log=log, rounds=16, reply_timeout_s=600.0,
                   part_timeout_s=300.0, **settings)


def _timed_steps(label, net, opt, x, y, warmup, steps, say, counters) -> tuple[dict, list[float]]:
    """The loop both offloading modes time (`opt` wrapped by the session: its step ends the
    session's): over the timed steps, the mean of how much each of `counters()` moved per step,
    of the step and of the optimizer's share; and the step times."""
    rows: list[dict] = []
    for i in range(warmup + steps):
        before = counters()
        t0 = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        row = {k: v - before[k] for k, v in counters().items()}
        row.update(step=t2 - t0, optimizer=t2 - t1)
        if i >= warmup:
            rows.append(row)
        say(_step_label(label, i, warmup, steps, t2 - t0))
    return {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}, [r["step"] for r in rows]


_CLIENT_FIELDS = ("encrypt_s", "decrypt_s", "verify_s", "wait_s", "send_s", "relay_compute_s", "turnaround_s",
                  "bytes_sent", "bytes_received")


def _tempo(model_name, shape, classes, width, batch, steps, warmup, relays, device, pipeline, arena_mb, say,
           log, split_min_mb, masking, asymml=None) -> ModeResult:
    """The ``tempo`` mode (the masking), or with `asymml` (its knobs) the ``asymml`` mode."""
    torch.manual_seed(0)
    model = models.build(model_name, shape, classes, width)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = _data(shape, classes, batch, torch.device("cpu"))
    label = "tempo" if asymml is None else "asymml"
    settings = ({"protection": "masking", "masking": masking} if asymml is None
                else {"protection": "asymml", "asymml": asymml})
    with _session(relays, device, arena_mb, log, pipeline=pipeline, split_min_mb=split_min_mb, **settings) as session:
        client, engine, state = session.client, session.engine, session.asymml
        net = session.private(model)
        session.wrap(opt)
        means, times = _timed_steps(label, net, opt, x, y, warmup, steps, say, lambda: {
            **{k: getattr(client.counters, k) for k in _CLIENT_FIELDS}, "offload": engine.offload_s,
            "split_gather": engine.gather_s, "decompose": state.split_s if state else 0.0,
            "low_rank": state.lowrank_s if state else 0.0})
    mean = means.__getitem__
    step = mean("step")
    measured_offload = sum(mean(k) for k in ("encrypt_s", "decrypt_s", "verify_s", "send_s", "split_gather", "wait_s"))
    breakdown = {
        "encrypt": mean("encrypt_s"),
        "decrypt": mean("decrypt_s"),
        "verify": mean("verify_s"),
        "send": mean("send_s"),
        "split_gather": mean("split_gather"),
        "transfer_wait": mean("wait_s"),
        "non_linear": step - mean("offload") - mean("optimizer") - mean("decompose") - mean("low_rank"),
        "optimizer": mean("optimizer"),
        "offload_other": mean("offload") - measured_offload,
    }
    if asymml is not None:
        breakdown.update(decompose=mean("decompose"), low_rank=mean("low_rank"))
    compute = mean("relay_compute_s")
    relay_side = {
        "relay_compute": compute,  # summed over relays
        "transfer": max(0.0, mean("turnaround_s") - compute),  # summed over parts (they overlap)
        "relay_idle": max(0.0, step - compute / relays),  # per relay
        "mb_sent": mean("bytes_sent") / 1e6,  # masked operands handed to the off-loader, per step
        "mb_received": mean("bytes_received") / 1e6,
    }
    explained = 1.0 - breakdown["offload_other"] / step
    note = "" if asymml is None else f"AsymML: mean rank {state.stats()['mean_rank']}, {asymml.describe()}"
    return ModeResult(label, statistics.median(times), step, times, breakdown, relay_side, explained, note=note)


def _product_work(shapes: list[tuple], repeat: int = 3) -> float:
    """Seconds of fp32 matmuls for these products, forward and both backward products each (the
    plain work the relays' share of the shares mode is compared with): best of `repeat`."""
    g = torch.Generator().manual_seed(0)
    ops = []
    for a_shape, b_shape in shapes:
        a, b = torch.randn(a_shape, generator=g), torch.randn(b_shape, generator=g)
        c = torch.matmul(a, b)
        ops.append((a, b, torch.randn(c.shape, generator=g)))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for a, b, d in ops:
            torch.matmul(a, b)
            torch.matmul(d, b.mT)
            torch.matmul(a.mT, d)
        best = min(best, time.perf_counter() - t0)
    return best


def _shares(model_name, shape, classes, width, batch, steps, warmup, relays, device, arena_mb, say, log) -> ModeResult:
    from tempo.core import im2col

    torch.manual_seed(0)
    model = models.build(model_name, shape, classes, width)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = _data(shape, classes, batch, torch.device("cpu"))
    shapes: list[tuple] = []
    with _session(relays, device, arena_mb, log, protection="shares") as session:
        client, engine = session.client, session.engine
        forward, conv_forward = engine.forward, engine.conv_forward

        def traced(a, b, bind, weight=None):  # the products' shapes, for their plain work
            if len(shapes) < 10_000 and bind.step == 0:
                shapes.append((tuple(a.shape), tuple(b.shape)))
            return forward(a, b, bind, weight)

        def traced_conv(x, w, conv, bind):  # the pools' product: patch rows times the weight
            if len(shapes) < 10_000 and bind.step == 0:
                shapes.append((im2col.rows_shape(tuple(x.shape), conv), tuple(w.shape)))
            return conv_forward(x, w, conv, bind)

        engine.forward, engine.conv_forward = traced, traced_conv
        net = session.private(model)
        session.wrap(opt)
        fields = ("open_s", "seal_s", "combine_s", "blame_s", "wait_s", "bytes_sent", "bytes_received")
        means, times = _timed_steps("shares", net, opt, x, y, warmup, steps, say, lambda: {
            **{k: getattr(engine.shares, k) for k in fields}, "relay_compute": client.counters.relay_compute_s})

    mean = means.__getitem__
    step = mean("step")
    offload = sum(mean(k) for k in ("open_s", "seal_s", "combine_s", "blame_s", "wait_s"))
    breakdown = {"open": mean("open_s"), "seal": mean("seal_s"), "combine_verify": mean("combine_s") + mean("blame_s"),
                 "transfer_wait": mean("wait_s"), "non_linear": step - offload - mean("optimizer"),
                 "optimizer": mean("optimizer"), "offload_other": 0.0}
    plain_work = _product_work(shapes)
    relay_side = {"relay_compute": mean("relay_compute"), "plain_product_work": plain_work,
                  "relay_over_plain_products": mean("relay_compute") / plain_work if plain_work > 0 else None,
                  "bytes_sent": mean("bytes_sent"), "bytes_received": mean("bytes_received")}
    return ModeResult("shares", statistics.median(times), step, times, breakdown, relay_side, None,
                      note=f"three pools of {relays} relay(s); {len(shapes)} products per step")


def copy_bandwidth(nbytes: int = 256 << 20, repeat: int = 3) -> float:
    """This machine's copy bandwidth in bytes touched per second (a copy reads and writes each
    byte: 2·size per copy), best of `repeat` copies of `nbytes`, from pages already touched."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def floor_bytes(sent: float, received: float) -> float:
    """The bytes the enclave must touch per step at the least: every byte it sends is read from
    its plaintext source and written masked (or opened), every byte that comes back is read and
    written as a result: ``2 · (sent + received)``. Verification, encoding and the layers it
    keeps come on top unless they ride along those passes."""
    return 2.0 * (sent + received)


def run(model: str = "resnet18", batch_size: int = 32, steps: int = 3, modes=MODES, relays: int = 2,
        device: str = "cpu", pipeline: bool = True, width: int | None = None,
        shape: tuple[int, ...] = (3, 32, 32), classes: int = 10, warmup: int = 1, arena_mb: int = 4096,
        split_min_mb: float = 4.0, progress: Callable[[str], None] | None = None, log=None, masking=None,
        asymml=None) -> dict:
    """Every requested mode on the same model and batch; returns the JSON-ready figures."""
    say = progress or (lambda _m: None)
    if masking is None:
        from tempo.enclave.protection import DEFAULT, preset

        masking = preset(DEFAULT)
    if asymml is None:
        from tempo.core.asymml import AsymmlConfig

        asymml = AsymmlConfig()
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    cuda = torch.cuda.is_available()
    if device != "cpu" and not cuda:
        raise ValueError(f"--device {device}: torch sees no CUDA device here")
    results: dict[str, ModeResult] = {}
    for mode in modes:
        if mode == "plain-cuda" and not cuda:
            results[mode] = ModeResult(mode, note="skipped: no CUDA device here")
            say("plain-cuda skipped: no CUDA device")
            continue
        if mode == "tempo":
            results[mode] = _tempo(model, shape, classes, width, batch_size, steps, warmup, relays, device,
                                   pipeline, arena_mb, say, log, split_min_mb, masking)
        elif mode == "asymml":
            results[mode] = _tempo(model, shape, classes, width, batch_size, steps, warmup, relays, device,
                                   pipeline, arena_mb, say, log, split_min_mb, masking, asymml)
        elif mode == "shares":
            results[mode] = _shares(model, shape, classes, width, batch_size, steps, warmup, relays, device,
                                    arena_mb, say, log)
        else:
            results[mode] = _plain(model, shape, classes, width, batch_size, steps, warmup,
                                   "cpu" if mode == "plain-cpu" else ("cuda" if device == "cpu" else device), say)

    def ratio(a: str, b: str) -> float | None:
        ra, rb = results.get(a), results.get(b)
        if ra is None or rb is None or ra.step_s is None or rb.step_s is None:
            return None
        # from the figures as reported, so the JSON's ratio is the ratio of its own step times
        return round(ra.as_dict()["step_s"] / rb.as_dict()["step_s"], 4)

    def work(mode: str) -> float | None:  # the enclave's own work per step: the step less its waiting
        r = results.get(mode)
        return round(r.mean_step_s - r.breakdown["transfer_wait"], 6) if r is not None and r.step_s is not None else None

    enclave_work = work("tempo")
    shares_work = work("shares")
    asymml_work = work("asymml")
    plain_cpu = results["plain-cpu"].step_s if "plain-cpu" in results else None
    bandwidth = copy_bandwidth() if any(w is not None for w in (enclave_work, shares_work, asymml_work)) else None

    def floor(mode: str) -> float | None:  # seconds the enclave's bytes take at copy bandwidth
        r = results.get(mode)
        if r is None or r.step_s is None or not bandwidth:
            return None
        sent, received = ((r.relays["mb_sent"] * 1e6, r.relays["mb_received"] * 1e6) if mode in ("tempo", "asymml")
                          else (r.relays["bytes_sent"], r.relays["bytes_received"]))
        return round(floor_bytes(sent, received) / bandwidth, 9)

    def over(a, b):
        return round(a / b, 4) if a is not None and b else None

    enclave_floor, shares_floor = floor("tempo"), floor("shares")
    return {
        "model": model, "width": width, "batch_size": batch_size, "steps": steps, "warmup": warmup,
        "shape": list(shape), "relays": relays, "device": device, "pipeline": pipeline,
        "split_min_mb": split_min_mb,
        "torch_threads": torch.get_num_threads(),
        "modes": {m: r.as_dict() for m, r in results.items()},
        "masking": masking.describe(),
        "tempo_over_plain_cpu": ratio("tempo", "plain-cpu"),
        "tempo_over_plain_cuda": ratio("tempo", "plain-cuda"),
        # the enclave's own work per step (the step less the time blocked on replies) over a whole
        # pure-TEE step: its inverse is the speed-up infinitely fast relays would give (SPEC §11)
        "enclave_work_s": enclave_work,
        "enclave_work_over_plain_cpu": over(enclave_work, plain_cpu),
        # what infinitely fast relays would make of a pure-TEE step: pure-TEE step ÷ enclave work
        "projected_speedup_ideal_relays": over(plain_cpu, enclave_work),
        # the floor: the bytes the enclave must touch per step (`floor_bytes`) at this machine's
        # copy bandwidth; enclave work ÷ floor says how close the work is to that limit
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 3) if bandwidth else None,
        "enclave_floor_s": enclave_floor,
        "enclave_work_over_floor": over(enclave_work, enclave_floor),
        "shares_enclave_work_s": shares_work,
        "shares_enclave_work_over_plain_cpu": over(shares_work, plain_cpu),
        "shares_projected_speedup_ideal_relays": over(plain_cpu, shares_work),
        "shares_enclave_floor_s": shares_floor,
        "shares_enclave_work_over_floor": over(shares_work, shares_floor),
        # the shares mode's goal (issue 15): at most 2x the masking's enclave work
        "shares_over_masking_enclave_work": (round(shares_work / enclave_work, 4)
                                             if shares_work is not None and enclave_work else None),
        "asymml": asymml.describe(),
        "asymml_enclave_work_s": asymml_work,
        "asymml_enclave_work_over_plain_cpu": over(asymml_work, plain_cpu),
        "asymml_projected_speedup_ideal_relays": over(plain_cpu, asymml_work),
        "asymml_enclave_floor_s": floor("asymml"),
        "asymml_enclave_work_over_floor": over(asymml_work, floor("asymml")),
        "asymml_over_masking_enclave_work": over(asymml_work, enclave_work),
        "masking_mb_per_step": (round(results["tempo"].relays["mb_sent"] + results["tempo"].relays["mb_received"], 3)
                                if "tempo" in results and results["tempo"].step_s is not None else None),
    }


def table(figures: dict) -> str:
    lines = [f"model {figures['model']}  batch {figures['batch_size']}  relays {figures['relays']} on "
             f"{figures['device']}  pipeline {'on' if figures['pipeline'] else 'off'}  "
             f"({figures['steps']} timed steps after {figures['warmup']} warm-up)"]
    for mode, r in figures["modes"].items():
        if r["step_s"] is None:
            lines.append(f"  {mode:<11} {r['note']}")
            continue
        parts = "  ".join(f"{k} {v:.3f}" for k, v in r["breakdown"].items())
        lines.append(f"  {mode:<11} step {r['step_s']:.3f}s   {parts}")
        if r["relays"] and mode == "shares":
            rs = r["relays"]
            lines.append("  " + " " * 11 + f" relays: compute {rs['relay_compute']:.3f}s = "
                         f"{rs['relay_over_plain_products'] or 0:.1f}x the same products in fp32 here "
                         f"({rs['plain_product_work']:.3f}s); {rs['bytes_sent'] / 1e6:.1f} MB sent, "
                         f"{rs['bytes_received'] / 1e6:.1f} MB back per step")
        elif r["relays"]:
            lines.append("  " + " " * 11 + " relays: " + "  ".join(f"{k} {v:.3f}" for k, v in r["relays"].items())
                         + f"   breakdown explains {100 * r['explained']:.1f}% of the step")
    for key, label in (("tempo_over_plain_cpu", "tempo / plain-cpu (pure TEE)"),
                       ("tempo_over_plain_cuda", "tempo / plain-cuda (non-private GPU)"),
                       ("enclave_work_over_plain_cpu", f"enclave work ({figures.get('enclave_work_s') or 0:.3f}s, masking "
                                                       f"{figures['masking']['masking']}) / plain-cpu"),
                       ("shares_enclave_work_over_plain_cpu", f"enclave work, shares "
                                                              f"({figures.get('shares_enclave_work_s') or 0:.3f}s) / plain-cpu"),
                       ("shares_over_masking_enclave_work", "enclave work, shares / masking"),
                       ("asymml_enclave_work_over_plain_cpu", f"enclave work, asymml "
                                                              f"({figures.get('asymml_enclave_work_s') or 0:.3f}s) / plain-cpu"),
                       ("asymml_over_masking_enclave_work", "enclave work, asymml / masking")):
        if figures.get(key) is not None:
            lines.append(f"  {label}: {figures[key]:.2f}")
    for prefix, what in (("", "masking"), ("shares_", "shares"), ("asymml_", "asymml")):
        if figures.get(f"{prefix}enclave_floor_s") is not None:
            speedup = figures.get(f"{prefix}projected_speedup_ideal_relays")
            lines.append(f"  {what}: projected speed-up over pure TEE with ideal relays "
                         f"{speedup if speedup is not None else float('nan'):.2f}x; floor "
                         f"{figures[f'{prefix}enclave_floor_s']:.3f}s (the bytes it must touch at "
                         f"{figures['copy_bandwidth_gb_s']:.1f} GB/s), work = "
                         f"{figures[f'{prefix}enclave_work_over_floor']:.1f}x the floor")
    return "\n".join(lines)


def plot(figures: dict, path: str) -> None:
    """The breakdown as stacked bars, one per mode (like the paper's Fig. 11)."""
    from tempo.report import require_matplotlib

    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = [(m, r) for m, r in figures["modes"].items() if r["step_s"] is not None]
    categories = [*TEMPO_CATEGORIES, *[c for c in PLAIN_CATEGORIES if c not in TEMPO_CATEGORIES]]
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.8 * len(modes)))
    colors = plt.get_cmap("tab10").colors
    for row, (mode, r) in enumerate(modes):
        left = 0.0
        for ci, cat in enumerate(categories):
            v = r["breakdown"].get(cat, 0.0)
            if v <= 0:
                continue
            ax.barh(row, v, left=left, color=colors[ci % len(colors)], label=cat)
            left += v
        floor = figures.get({"tempo": "enclave_floor_s", "shares": "shares_enclave_floor_s",
                             "asymml": "asymml_enclave_floor_s"}.get(mode, ""))
        if floor:  # the enclave's floor: its bytes at copy bandwidth
            ax.plot([floor, floor], [row - 0.45, row + 0.45], color="black", linewidth=2,
                    label="enclave floor (bytes at copy bandwidth)")
    ax.set_yticks(range(len(modes)), [m for m, _ in modes])
    ax.set_xlabel("seconds per training step (mean)")
    ax.set_title(f"{figures['model']}, batch {figures['batch_size']}, {figures['relays']} relay(s) on "
                 f"{figures['device']}, pipeline {'on' if figures['pipeline'] else 'off'}")
    handles, labels = ax.get_legend_handles_labels()
    seen = {}
    for h, lab in zip(handles, labels):
        seen.setdefault(lab, h)
    ax.legend(seen.values(), seen.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
