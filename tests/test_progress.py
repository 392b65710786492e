"""What a run shows and leaves: a progress bar on a terminal, `train.progress` events off one,
per-epoch history in summary.json and metrics.csv, curves, and an honest summary after a resume."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest
from click.testing import CliRunner

from tempo.cli import main
from tempo.train import Halted, TrainConfig, run


def run_on_a_terminal(args: list[str], timeout_s: float = 240) -> tuple[int, str]:
    """`python -m tempo ARGS` with stdin, stdout and stderr on a pseudo-terminal; its output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 160 columns, as a terminal has
    proc = subprocess.Popen([sys.executable, "-m", "tempo", *args], stdin=slave, stdout=slave, stderr=slave,
                            close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    return proc.returncode, out.decode("utf-8", "replace")


def test_a_terminal_session_shows_a_progress_bar_with_the_true_rate(tmp_path):
    out = tmp_path / "run"
    code, screen = run_on_a_terminal(["--log-format", "json", "train", "--model", "mlp", "--epochs", "2",
                                      "--plot", "--out", str(out)])
    assert code == 0, screen
    summary = json.loads((out / "summary.json").read_text())
    history = summary["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    bars = re.findall(r"epoch (\d)/2: 100%\|[^\r\n]*\| 21/21 [^\r\n]*?(\d+) img/s", screen)
    for epoch, row in zip((1, 2), history):
        shown = [int(rate) for e, rate in bars if int(e) == epoch]
        # the last bar of an epoch shows its rate: its images over its own steps' time
        assert shown and shown[-1] == round(row["images_per_s"]), (epoch, shown, row)
        assert row["images_per_s"] == pytest.approx(summary["images"]["train"] / row["epoch_s"], rel=0.01)
    assert sum(row["epoch_s"] for row in history) < summary["wall_s"]  # start-up is not in the rate
    # log lines are written above the bar, never into it
    for segment in re.split(r"[\r\n]", screen):
        if '"event"' in segment:
            assert segment.strip().startswith("{") and segment.strip().endswith("}"), segment
    assert (out / "curves.png").stat().st_size > 10_000
    report = CliRunner().invoke(main, ["report", str(out), "--plot", str(tmp_path / "again.png")])
    assert report.exit_code == 0, report.output
    assert re.search(r"^\s+2\s+42\s+\d\.\d{4}\s+\d\.\d{4}", report.output, re.M), report.output
    assert (tmp_path / "again.png").exists()


def test_off_a_terminal_progress_is_logged_and_history_is_kept(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "tempo", "--log-format", "json", "train", "--mode", "plain",
                             "--model", "mlp", "--epochs", "3", "--val-every", "2", "--progress-every", "0",
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    progress = [e for e in events if e["event"] == "train.progress"]
    assert len(progress) == 3 * 21 and progress[-1]["step"] == progress[-1]["total_steps"] == 63
    assert all({"epoch", "step", "loss", "images_per_s", "eta_s"} <= set(e) for e in progress)
    assert progress[-1]["eta_s"] == 0 and all(e["images_per_s"] > 0 for e in progress)
    summary = json.loads((out / "summary.json").read_text())
    # validated every 2 epochs, and after the last
    assert [row["val_accuracy"] is not None for row in summary["history"]] == [False, True, True]
    assert summary["val_accuracy"] == summary["history"][-1]["val_accuracy"] > 0.5
    assert summary["images"] == {"train": 1294, "val": 144, "test": 359}
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and rows[0]["val_accuracy"] == ""
    assert float(rows[2]["train_loss"]) == pytest.approx(summary["train_loss"], abs=1e-5)


def test_after_a_resume_the_summary_covers_the_whole_run(tmp_path):
    out = tmp_path / "run"
    common = dict(model="mlp", mode="plain", epochs=2, checkpoint_every=5, out=str(out))
    with pytest.raises(Halted):
        run(TrainConfig(halt_after_steps=30, **common))
    first = torch_load(out / "checkpoint.pt")
    assert first["step"] == 30 and len(first["history"]) == 1
    result = CliRunner().invoke(main, ["train", "--mode", "plain", "--model", "mlp", "--epochs", "2", "--resume",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] is True and summary["resumes"] == 1 and "(resumed)" in result.stdout
    assert summary["steps"] == 42 and [row["epoch"] for row in summary["history"]] == [1, 2]
    assert summary["wall_s"] > first["elapsed_s"]


def torch_load(path):
    import torch

    return torch.load(path, weights_only=True)


def test_plots_without_matplotlib_fail_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    for args in (["train", "--plot", "--out", str(tmp_path / "t")],
                 ["bench", "train", "--model", "mlp", "--modes", "plain-cpu", "--plot", str(tmp_path / "b.png")]):
        start = time.monotonic()
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0 and "matplotlib" in result.output, result.output
        assert time.monotonic() - start < 5 and not (tmp_path / "t").exists()
