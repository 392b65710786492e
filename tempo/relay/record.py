"""A relay's recording of what it receives (`tempo relay --record DIR`): for audits.

Off by default and loudly logged when on. Every request that carries tensors (``forward``,
``backward``, ``backward_full``, ``stage``) is written, once its digest has been checked and
before it is computed, to ``DIR/<relay name>/<sequence>.pt``: its op, binding, protection ``mode``
(protocol 2.4: ``masked``, or ``asymml``, whose tensors are plaintext weights and noisy residuals
by design; ``masked`` for a sealed part), the header fields that say how its tensors are to be
read (``slot``, ``staged``), and the tensors themselves, as they arrived. A pool member of the shares mode (``sealed``) records its requests as it opened
them: the header (role, seeds, shapes) under ``request`` and the ring tensors. That is exactly what the cloud holds; `tempo.audit.view.load_recording` turns a
recording back into the per-product view the attacks read.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import torch

RECORDED_OPS = ("forward", "backward", "backward_full", "stage", "sealed")
FORMAT = 1


def relay_dir(root: str | Path, name: str) -> Path:
    """Where relay `name` records under `root` (the name made safe as a file name)."""
    return Path(root) / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "relay")


class Recorder:
    """Writes each recorded request of one relay to its own file, in order."""

    def __init__(self, root: str | Path, name: str, device: str) -> None:
        self.dir = relay_dir(root, name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = len(list(self.dir.glob("*.pt")))  # a restarted relay appends
        meta = {"format": FORMAT, "relay": name, "device": device, "pid": os.getpid(), "started": time.time()}
        (self.dir / f"meta-{os.getpid()}.json").write_text(json.dumps(meta) + "\n")

    def write(self, op: str, header: dict, tensors: list[torch.Tensor]) -> None:
        if op not in RECORDED_OPS:
            return
        record = {"op": op, "bind": header.get("bind"), "mode": header.get("mode", "masked"),
                  "slot": header.get("slot"), "staged": header.get("staged"),
                  **({"pool": header["pool"], "part": header["part"], "request": header["request"]}
                     if op == "sealed" else {}),
                  "tensors": [t.detach().to("cpu").clone() for t in tensors]}
        path = self.dir / f"{self.count:09d}.pt"
        torch.save(record, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        self.count += 1
