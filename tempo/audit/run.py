"""`tempo audit`: a short private training whose relays record what they receive, the attacks
run on that record alone, and one number each, scored against the enclave's truth.

The view's products are numbered by the model's layers (a layer kept in the enclave leaves a
gap), so every attack knows what it reads; an attack whose layers never leave the enclave under
the masking is reported as not applicable, with the reason, not as a zero.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from tempo.audit.view import ProductTruth, ProductView, RunTruth, RunView

# which of the model's offloadable layers each attack reads (None: the last one)
NEEDS = {"images": (0,), "labels": (None,), "structure": (0, 1, None), "steal": (0, 1, None),
         "distinguishing": (0,), "hidden": (1,), "hidden_distinguishing": (),  # (): any offloaded layer
         "steal_offloaded": (1,), "unmix": (1,)}
RUN_ATTACKS = ("zeros_signs", "scale_invariant", "images", "labels", "structure", "steal", "distinguishing",
               "hidden", "hidden_distinguishing", "steal_offloaded", "unmix")  # what one run's relay view is attacked with
# what says nothing about the shares mode, and why
SHARES_NOT_APPLICABLE = {
    "structure": "the shares mode permutes nothing: unit and row order are the model's and the batch's own "
                 "(public); the values they index are uniform",
    "distinguishing": "simulates the paper's masking on public images, not this mode (the game on the run, "
                      "hidden_distinguishing, is this mode's)",
}
SCHEME_EXPERIMENTS = ("mixing", "batch_mixing")  # what-if searches against other schemes, on the public sample


def offloaded_layers(layers: int, keep: tuple[str, ...]) -> list[int]:
    """The model's layers (0 … layers-1) that are offloaded when `keep` stays in the enclave."""
    out = list(range(layers))
    if "first" in keep and out:
        out.pop(0)
    if "last" in keep and out:
        out.pop()
    return out


def by_model_layer(view: RunView, truth: RunTruth | None, offloaded: list[int]) -> tuple[RunView, RunTruth | None]:
    """`view` (and `truth`) with each product's layer the model's layer, not its offload order."""
    def layer(i: int) -> int:
        return offloaded[i]

    remapped = RunView([ProductView(p.step, layer(p.layer), p.part, p.a, p.b, p.e, p.relay) for p in view.products])
    if truth is None:
        return remapped, None
    products = {(s, layer(l), part): ProductTruth(t.a, t.b, t.grad_c) for (s, l, part), t in truth.products.items()}
    return remapped, RunTruth(truth.model, products, truth.steps, truth.final_state)


def audit(model: str = "mlp", masking: str = "paper", epochs: int = 3, relays: int = 2, out: str | Path = "runs/audit",
          attacks: tuple[str, ...] | None = None, options: dict | None = None, log=None, game_rounds: int = 40,
          pools: tuple[str, ...] | None = None, protection: str = "masking", asymml=None) -> dict:
    """Train `model` privately under `masking` (a preset, with `options`: key_space, key_refresh,
    mix, keep), with `relays` recording relay processes (0: captured in-process), attack what the
    relays received and score it. Writes ``audit.json``, the relays' ``recording/`` and
    ``images.png`` (true, recovered, public mean) under `out`; returns the figures.

    With `pools`, the run uses the shares mode instead (`relays` per pool) and the attacks read
    what those pools hold together: one pool is the mode's claim, two a collusion.

    With ``protection="asymml"`` the run uses the AsymML mode (`asymml`: its knobs, an
    `AsymmlConfig`; None: the defaults; `masking` and `options` do not apply) and the attacks
    are that mode's (`tempo.audit.asymml`): labels, inputs, weights."""
    if protection == "asymml":
        return audit_asymml(model, epochs, relays, out, asymml, log=log, attacks=attacks)
    from tempo.audit import attacks as at
    from tempo.audit import score
    from tempo.audit.capture import CaptureConfig, capture
    from tempo.audit.public import Public
    from tempo.enclave.protection import preset

    options = {k: v for k, v in (options or {}).items() if v is not None}
    shared = pools is not None
    chosen = preset("paper").with_options(keep=()) if shared else preset(masking).with_options(**options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = CaptureConfig(model=model, epochs=epochs, masking=masking, relays=relays,
                        protection="shares" if shared else "masking", **({} if shared else options))
    view, truth, split = capture(cfg, record_dir=out / "recording" if relays else None, log=log)
    view_is = None
    if shared:  # the records of every pool: attack what `pools` hold together
        from tempo.audit.view import pools_view
        from tempo.enclave.pools import POOL_NAMES

        unknown = sorted(set(pools) - set(POOL_NAMES))
        if unknown or not pools:
            raise ValueError(f"pools are {', '.join(POOL_NAMES)}, not {', '.join(unknown) or 'none'}")
        view, view_is = pools_view(view, tuple(pools), {n: i + 1 for i, n in enumerate(POOL_NAMES)})
    captured_s = time.perf_counter() - t0
    layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in _model(model, split).modules())
    offloaded = offloaded_layers(layers, chosen.keep)
    view, truth = by_model_layer(view, truth, offloaded)
    public = Public.from_split(split, model, chosen.key_space, cfg.batch_size)
    public.layers = layers
    public.patch_rows = chosen.patch_rows
    public.mix = chosen.mix
    wanted = attacks or RUN_ATTACKS
    runnable, skipped = [], {}
    for name in wanted:
        needs = [layers - 1 if layer is None else layer for layer in NEEDS.get(name, ())]
        missing = [layer for layer in needs if layer not in offloaded]
        if shared and not view.products:
            skipped[name] = {"applicable": False, "reason": f"pools {'+'.join(pools)} hold {view_is}"}
        elif shared and name in SHARES_NOT_APPLICABLE:
            skipped[name] = {"applicable": False, "reason": SHARES_NOT_APPLICABLE[name]}
        elif not needs and not offloaded:  # () in NEEDS: any offloaded layer will do
            skipped[name] = {"applicable": False, "reason": f"no layer is offloaded under masking {chosen.name}"}
        elif missing:
            skipped[name] = {"applicable": False, "reason": f"reads layer(s) {missing}, which stay in the enclave "
                                                             f"under masking {chosen.name}"}
        else:
            runnable.append(name)
    if log:
        log.info("audit.attacks", masking=chosen.name, run=runnable, not_applicable=sorted(skipped))
    results = at.run_all(view, public, truth, attacks=tuple(runnable), game_rounds=game_rounds) if runnable else {}
    cache = results.pop("_cache", {})
    results.update(skipped)
    images = cache.get("images")
    if images is not None and getattr(images, "images", None):
        score.write_images_png(images, truth, str(out / "images.png"), public=public)
    figures = {"model": model, "epochs": epochs, "relays": relays,
               "masking": ({"masking": "shares", "pools": list(pools), "view": view_is} if shared else chosen.describe()),
               "offloaded_layers": offloaded, "layers": layers, "products": len(view.products),
               "capture_s": round(captured_s, 2), "attack_s": round(time.perf_counter() - t0 - captured_s, 2),
               "attacks": results}
    (out / "audit.json").write_text(json.dumps(figures, indent=2, default=_plain) + "\n")
    return figures


def audit_asymml(model: str = "mlp", epochs: int = 3, relays: int = 2, out: str | Path = "runs/audit", config=None,
                 log=None, attacks: tuple[str, ...] | None = None) -> dict:
    """`audit` for the AsymML mode: train with every layer split (relays recording, or
    in-process), run `tempo.audit.asymml`'s attacks on what the relays received, write
    ``audit.json``; returns the figures."""
    from tempo.audit import asymml as am
    from tempo.audit.capture import CaptureConfig, capture
    from tempo.audit.public import Public
    from tempo.core.asymml import AsymmlConfig

    config = (config or AsymmlConfig()).validate()
    unknown = sorted(set(attacks or ()) - set(am.ATTACKS))
    if unknown:
        raise ValueError(f"the asymml audit's attacks are {', '.join(am.ATTACKS)}, not {', '.join(unknown)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = CaptureConfig(model=model, epochs=epochs, relays=relays, protection="asymml", asymml=config)
    view, truth, split = capture(cfg, record_dir=out / "recording" if relays else None, log=log)
    captured_s = time.perf_counter() - t0
    layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in _model(model, split).modules())
    public = Public.from_split(split, model, batch_size=cfg.batch_size)
    public.layers = layers
    public.patch_rows = True
    results = am.run_all(view, public, truth, config, attacks=tuple(attacks or am.ATTACKS), log=log)
    results.pop("_cache", None)
    figures = {"model": model, "epochs": epochs, "relays": relays, "masking": {"masking": "asymml", **config.describe()},
               "offloaded_layers": list(range(layers)), "layers": layers, "products": len(view.products),
               "asymml": truth.asymml, "capture_s": round(captured_s, 2),
               "attack_s": round(time.perf_counter() - t0 - captured_s, 2), "attacks": results}
    (out / "audit.json").write_text(json.dumps(figures, indent=2, default=_plain) + "\n")
    return figures


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _asymml_headline(a: dict) -> list[tuple[str, str, str]]:
    rows = []
    if "inputs" in a:
        r = a["inputs"]
        rows.append(("images: pixels rebuilt exact, in place", _pct(r.get("pixels_exact")),
                     "public mean image: " + _pct(r.get("baseline_exact"))))
        rows.append(("images: pixels within one grey level", _pct(r.get("pixels_within_1_level")),
                     "public mean image: " + _pct(r.get("baseline_within_1_level"))))
        rows.append(("images: correlation with the true image", _num(r.get("correlation")),
                     "public mean image: " + _num(r.get("baseline_correlation"))))
        rows.append(("images: digit named by a public classifier (true images)",
                     f"{_pct(r.get('digit_accuracy'))} ({_pct(r.get('digit_accuracy_true_images'))})", "10%"))
    if "labels" in a:
        rows.append(("labels: recovered exactly, per sample", _pct(a["labels"].get("labels_exact")), "10%"))
    if "weights" in a:
        r = a["weights"]
        got = "exact" if r.get("weights_exact") else f"max diff {r.get('weights_max_abs_diff'):.3g}"
        if r.get("real_accuracy") is not None:
            got += (f"; acc. {_pct(r.get('rebuilt_accuracy'))} (real {_pct(r.get('real_accuracy'))}, "
                    f"zero biases {_pct(r.get('rebuilt_zero_bias_accuracy'))})")
        rows.append(("weights in the clear: rebuilt model (biases fit on public)", got, "10%"))
    return rows


def _model(name: str, split):
    from tempo import models

    return models.build(name, split.image_shape, split.classes)


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def headline(figures: dict) -> list[tuple[str, str, str]]:
    """One line per attack: (attack, what it recovered, chance), for the table."""
    rows = []
    a = figures["attacks"]
    if figures["masking"]["masking"] == "asymml":
        return _asymml_headline(a)
    # a row that does not apply: a layer kept in the enclave, or (shares mode) a reason in audit.json
    off = "n/a (audit.json says why)" if figures["masking"]["masking"] == "shares" else "not offloaded"

    def na(name):
        return a.get(name, {}).get("applicable") is False

    if "images" in a:
        r = a["images"]
        rows.append(("images: pixels rebuilt exact, in place", off if na("images") else _pct(r.get("pixels_exact")),
                     "public mean image: " + _pct(r.get("baseline_exact", 0.3085))))
    if "labels" in a:
        r = a["labels"]
        rows.append(("labels: samples grouped exactly by label", off if na("labels") else _pct(r.get("grouped_exactly")),
                     "0%"))
        if not na("labels"):
            rows.append(("labels: accuracy given 10 known labels", _pct(r.get("label_accuracy_known")), "11.7%"))
    if "scale_invariant" in a and not na("scale_invariant"):
        best = max((v["nn_same_label"] for k, v in a["scale_invariant"].items() if isinstance(v, dict)), default=None)
        rows.append(("same-label neighbours from scale invariants (best layer)", _pct(best), "10.1%"))
    if "zeros_signs" in a and not na("zeros_signs"):
        zs = a["zeros_signs"]
        kinds = [k for k in ("input", "hidden", "delta") if k in zs]
        rows.append(("zeros that survive masking (" + ", ".join(kinds) + ")",
                     ", ".join(_pct(zs[k]["zeros_survive"]) for k in kinds), "0% with mixing"))
    if "structure" in a:
        r = a["structure"]
        if na("structure"):
            rows.append(("hidden units matched across layers", off, ""))
        elif "channels" in r:
            rows.append(("conv1 channels matched to conv2 rows", _pct(r.get("channels")), _pct(r.get("chance"))))
        else:
            units = [v["units_active"] for k, v in r.items() if isinstance(v, dict) and "units_active" in v]
            rows.append(("hidden units matched across layers (active units)", _pct(min(units) if units else None),
                         "0.8%"))
    if "steal" in a:
        r = a["steal"]
        rows.append(("stolen model's accuracy (real / random init)",
                     off if na("steal") else
                     f"{_pct(r.get('stolen_accuracy'))} ({_pct(r.get('real_accuracy'))} / {_pct(r.get('random_init_accuracy'))})",
                     "12.5%"))
    if "distinguishing" in a:
        r = a["distinguishing"]
        rows.append(("distinguishing game advantage (batch / one image / single)",
                     off if na("distinguishing") else
                     " / ".join(f"{r[v]['advantage']:.2f}" for v in ("batch", "one-image", "single") if v in r), "0"))
    if "hidden_distinguishing" in a:
        r = a["hidden_distinguishing"]
        rows.append(("distinguishing game on the run, any offloaded layer (" + " / ".join(GAME_VARIANTS) + ")",
                     off if na("hidden_distinguishing") else
                     " / ".join(_num(r.get(v, {}).get("advantage")) for v in GAME_VARIANTS),
                     "0 (±" + _num(_half_width(r)) + ")" if not na("hidden_distinguishing") else "0"))
    if "hidden" in a:
        r = a["hidden"]
        rows.append(("conv1 maps from conv2's input: correlation / digit named",
                     off if na("hidden") else
                     f"{_num(r.get('map_correlation'))} / {_pct(r.get('digit_accuracy'))}", "— / 10%"))
    if "steal_offloaded" in a:
        r = a["steal_offloaded"]
        for name, what in (("all", "all public images"), ("few", "5 public images per class")):
            if na("steal_offloaded"):
                rows.append((f"stolen layers + {what}: acc. (public-only / random frozen / real)", off, ""))
                break
            q = r.get(name, {})
            rows.append((f"stolen layers + {what}: acc. (public-only / random frozen / real)",
                         f"{_pct(q.get('stolen_accuracy'))} ({_pct(q.get('public_only_accuracy'))} / "
                         f"{_pct(q.get('random_frozen_accuracy'))} / {_pct(q.get('real_accuracy'))})",
                         "worth " + ("n/a" if q.get("worth") is None else f"{100 * q['worth']:+.1f} pt")))
    if "unmix" in a:
        r = a["unmix"]
        if na("unmix"):
            rows.append(("block ranks (mixing-proof): same-label neighbours / dead units", off, ""))
        else:
            nn = [v for k, v in r.items() if k.startswith("layer") and isinstance(v, dict)]
            best = max(nn, key=lambda v: v["nn_same_label"]) if nn else None
            dead = r.get("dead_units")
            got = (_pct(best["nn_same_label"]) if best else "n/a (no per-sample slices)")
            if dead:
                got += f"; dead units counted exactly {_pct(dead['count_exact'])}"
            rows.append(("block ranks (mixing-proof): same-label neighbours / dead units", got,
                         _pct(best["chance"]) if best else "10%"))
    return rows


GAME_VARIANTS = ("batch", "swap-labels", "swap-same-label")  # tempo.audit.game.VARIANTS


def _half_width(r: dict) -> float | None:
    """The widest half-width of the game's 95% intervals (None: none)."""
    widths = [(v["interval"][1] - v["interval"][0]) / 2 for v in r.values()
              if isinstance(v, dict) and v.get("interval")]
    return max(widths) if widths else None


def _num(x) -> str:
    return "none found" if x is None else f"{x:.2f}"


def table(figures: dict) -> str:
    m = figures["masking"]
    if m["masking"] == "asymml":
        lines = [f"tempo audit: {figures['model']}, {figures['epochs']} epochs, asymml (energy {m['energy']}, clip "
                 f"{m['clip']}, noise {m['noise']}, every layer split), {figures['products']} products seen by "
                 f"{figures['relays'] or 'in-process'} relay(s)"]
    elif m["masking"] == "shares":
        lines = [f"tempo audit: {figures['model']}, {figures['epochs']} epochs, shares mode, the view of pool(s) "
                 f"{'+'.join(m['pools'])} ({m['view']}), {figures['products']} products, "
                 f"{figures['relays'] or 'in-process'} relay(s) per pool"]
    else:
        lines = [f"tempo audit: {figures['model']}, {figures['epochs']} epochs, masking {m['masking']} (keys "
                 f"{m['key_space']}, refresh {m['key_refresh']}, mix {m['mix']}, kept in the enclave: "
                 f"{', '.join(m['keep']) or 'none'}), {figures['products']} products seen by "
                 f"{figures['relays'] or 'in-process'} relay(s)"]
    rows = headline(figures)
    width = max((len(r[0]) for r in rows), default=10)
    lines.append(f"  {'attack':<{width}}  {'recovered':<28}  chance / baseline")
    for what, got, chance in rows:
        lines.append(f"  {what:<{width}}  {got:<28}  {chance}")
    return "\n".join(lines)
