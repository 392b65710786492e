"""Training progress for people and for machines.

On a terminal, a bar per epoch (tqdm: steps done of the epoch's, loss, images per second, the
epoch's ETA and the whole run's), with log lines written above the bar instead of through it
(`tempo.log` routes them through ``tqdm.write`` on a terminal). Elsewhere (CI, nohup, docker
logs) a ``train.progress`` event every `every_s` seconds, so a long run is visibly alive.

tqdm because it is small, has no dependencies, is everywhere PyTorch users are, and computes
rates and ETAs from its own clock, redrawing at most a few times a second.
"""

from __future__ import annotations

import shutil
import sys
import time


def duration(seconds: float) -> str:
    """``1:02:03`` or ``2:03``."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressView:
    """The `progress` callback of `tempo.train.run`: call it with each event."""

    def __init__(self, log=None, tty: bool | None = None, every_s: float = 10.0, stream=None) -> None:
        self.log = log
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s
        self._bar = None
        self._epoch = None
        self._last = None  # when the last progress event was logged

    def __call__(self, event: dict) -> None:
        if event["kind"] == "step":
            self._bar_step(event) if self.tty else self._log_step(event)
        elif event["kind"] == "epoch" and self.tty:
            self._bar_epoch(event)

    def _log_step(self, e: dict) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.every_s and e["step"] != e["total_steps"]:
            return
        self._last = now
        if self.log is not None:
            self.log.info("train.progress", epoch=e["epoch"], epochs=e["epochs"], step=e["step"],
                          total_steps=e["total_steps"], loss=round(e["loss"], 5),
                          images_per_s=round(e["images_per_s"], 1), eta_s=round(e["eta_s"], 1))

    def _bar_step(self, e: dict) -> None:
        from tqdm import tqdm

        if self._bar is None or self._epoch != e["epoch"]:
            self.close()
            self._epoch = e["epoch"]
            # a terminal that reports no size (a bare pty) gets 100 columns rather than an empty bar
            sized = shutil.get_terminal_size((0, 0)).columns > 0
            self._bar = tqdm(total=e["batches"], initial=e["batch"] - 1, desc=f"epoch {e['epoch']}/{e['epochs']}",
                             unit="step", file=self.stream, dynamic_ncols=sized, ncols=None if sized else 100,
                             nrows=None if sized else 24,
                             leave=True)
        self._bar.set_postfix_str(f"loss {e['loss']:.4f}, {e['images_per_s']:.0f} img/s, "
                                  f"run ETA {duration(e['eta_s'])}", refresh=False)
        self._bar.update(1)

    def _bar_epoch(self, e: dict) -> None:
        if self._bar is None:
            return
        val = "" if e.get("val_accuracy") is None else f", val acc {e['val_accuracy']:.3f}"
        self._bar.set_postfix_str(f"loss {e['train_loss']:.4f}{val}, {e['images_per_s']:.0f} img/s", refresh=False)
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
