"""Private inference: the forward pass only, every product masked (or, with ``protection="asymml"``,
split into a low-rank part computed here and a noisy residual), offloaded and verified."""

from __future__ import annotations

import time

from tempo import data as datasets
from tempo import models


def run_inference(checkpoint: str, model_name: str, width: int | None, dataset: str, data_dir: str | None,
                  batch_size: int, relays: int, device: str = "cpu", seed: int = 7, integrity_t: float = 1e-6,
                  log=None, partial_data: bool = False, protection: str = "masking", asymml=None) -> dict:
    """Classify the test images of `dataset` privately with the weights in `checkpoint` (a
    ``model.pt`` or a training ``checkpoint.pt``); returns accuracy and throughput. `protection`:
    ``"masking"`` (the default masking) or ``"asymml"`` (`asymml`: its knobs, an
    `tempo.core.asymml.AsymmlConfig`; None: the defaults), whose DP accounting comes back too."""
    from tempo.core.verify import freivalds_rounds
    from tempo.enclave.checkpoint import read_weights
    from tempo.enclave.private import offloaded_products
    from tempo.session import Session
    from tempo.train import evaluate

    weights = read_weights(checkpoint)  # a file that is not ours fails here, before any process starts
    split = datasets.load(dataset, data_dir, seed=seed, partial=partial_data)
    model = models.build(model_name, split.image_shape, split.classes, width)
    models.load_weights(model, weights, f"{checkpoint} (model {model_name})")
    model.eval()
    rounds = freivalds_rounds(integrity_t, 1, relays, max(1, offloaded_products(model)))  # alpha = 1: inference
    if log:
        log.info("infer.integrity", t=integrity_t, relays=relays, freivalds_rounds=rounds)
    if protection not in ("masking", "asymml"):
        raise ValueError(f"inference protects with masking or asymml, not {protection!r}")
    # the masking's default (or AsymML), every product split across the relays, the default masking's kept layers
    with Session(relays=relays, device=device, rounds=rounds, protection=protection, asymml=asymml,
                 log=log) as session:
        net = session.private(model)
        net.eval()
        start = time.perf_counter()
        accuracy = evaluate(net, split.test_x, split.test_y, batch_size, after_batch=session.end_step)
        seconds = time.perf_counter() - start
    images = len(split.test_x)
    result = {"accuracy": accuracy, "images": images, "seconds": seconds, "images_per_s": images / seconds,
              "relays": relays, "model": model_name, "dataset": dataset, "freivalds_rounds": rounds,
              "protection": protection}
    if session.asymml is not None:
        from tempo.core.asymml import dp_account

        result.update(asymml=session.asymml.stats(),
                      dp=dp_account(session.asymml.layer_entries(), 1, session.asymml.config))  # each image once
    return result
