"""Run files on disk: checkpoints (to resume) and weights (to infer), read with clear errors.

A checkpoint (``checkpoint.pt``) holds the model, the optimizer and scheduler, the random
generators, the position in the epoch, the history so far and the run's configuration; the model
(``model.pt``) is a plain ``state_dict``. Both are read with ``weights_only=True``: a file from
elsewhere cannot run code here. Writes are atomic (a temporary file, then a rename), so a kill
never leaves half a file.
"""

from __future__ import annotations

from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint or model, or one of another run."""


def read(path: str | Path) -> object:
    """Whatever `torch.save` wrote to `path`; `CheckpointError` for a file that is missing,
    truncated, corrupt or not written by torch."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch raise many kinds for bad files
        reason = " ".join(str(exc).split()).split(". ")[0][:160] or type(exc).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint or model (truncated or corrupt? {reason})") from None


def read_checkpoint(path: str | Path) -> dict:
    """A training checkpoint (to resume from), checked to hold what resuming needs."""
    state = read(path)
    needed = {"model", "optimizer", "generator", "torch_rng", "step", "epoch", "batch", "order", "config"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise CheckpointError(f"{path} is not a tempo training checkpoint (it lacks "
                              f"{sorted(needed - set(state)) if isinstance(state, dict) else 'everything'})")
    return state


def read_weights(path: str | Path) -> dict:
    """Model weights from a ``model.pt`` (a state_dict) or a training ``checkpoint.pt`` (its model)."""
    state = read(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "optimizer" in state:
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no model weights (expected a model.pt or checkpoint.pt from tempo train)")
    return state


def save(state: object, path: str | Path) -> None:
    """`torch.save` to a temporary file, then rename over `path` (atomic)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
