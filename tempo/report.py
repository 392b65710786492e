"""A run's report: its history as a table and its loss and accuracy curves as a PNG.

`tempo train --plot` draws ``curves.png`` into the run directory at the end; `tempo report RUN_DIR`
prints the table and draws the curves of any finished run (from its ``summary.json``).
matplotlib is optional (``pip install 'tempo-train[plot]'``): `require_matplotlib` is called
before any work starts, so a missing one fails in a second, not after the run.
"""

from __future__ import annotations

import json
from pathlib import Path


def require_matplotlib() -> None:
    """Raise `RuntimeError` with the install command when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'tempo-train[plot]' (or pip install matplotlib)") from None


def load_summary(run_dir: str | Path) -> dict:
    """A run directory's ``summary.json``, with a one-line error when there is none."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{run_dir} holds no finished run (no summary.json)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable: {exc}") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path} is not a tempo summary")
    return summary


def table(summary: dict) -> str:
    """The per-epoch history, one line an epoch, and the final figures."""
    lines = [f"{summary.get('mode')} training of {summary.get('model')} on {summary.get('dataset')}: "
             f"{summary.get('steps')} steps, {summary.get('wall_s', 0):.1f}s"
             + (f" (resumed {summary.get('resumes')}x)" if summary.get("resumed") else ""),
             f"{'epoch':>5} {'steps':>6} {'train loss':>10} {'val acc':>8} {'time s':>8} {'img/s':>8}"]
    for row in summary.get("history", []):
        val = "" if row.get("val_accuracy") is None else f"{row['val_accuracy']:.4f}"
        lines.append(f"{row['epoch']:>5} {row['steps']:>6} {row['train_loss']:>10.4f} {val:>8} "
                     f"{row['epoch_s']:>8.2f} {row['images_per_s']:>8.1f}")
    lines.append(f"test accuracy {summary.get('test_accuracy', float('nan')):.4f}")
    return "\n".join(lines)


def plot_curves(summary: dict, path: str | Path) -> Path:
    """Train loss and validation accuracy per epoch, side by side, as a PNG at `path`."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = summary.get("history", [])
    if not history:
        raise ValueError("the run has no per-epoch history to plot")
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], marker="o", color="tab:blue")
    ax_loss.set(xlabel="epoch", ylabel="train loss (mean over the epoch)", title="loss")
    val = [(row["epoch"], row["val_accuracy"]) for row in history if row.get("val_accuracy") is not None]
    if val:
        ax_acc.plot(*zip(*val), marker="o", color="tab:green", label="validation")
    test = summary.get("test_accuracy")
    if test is not None:
        ax_acc.axhline(test, color="tab:gray", linestyle="--", label=f"test (end): {test:.3f}")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    ax_acc.legend(loc="lower right", fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{summary.get('mode')} training of {summary.get('model')} on {summary.get('dataset')}, "
                 f"batch {summary.get('batch_size')}, {summary.get('relays')} relay(s)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
