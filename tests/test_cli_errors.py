"""Bad input to `tempo train`, `tempo infer` and `tempo enclave`: one line on stderr, a non-zero
exit, and nothing that existed before is lost."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tempo.cli import main
from tempo.train import TrainConfig, run


def tempo(*args: str):
    """`tempo --log-level error ARGS` in-process; stdout and stderr apart."""
    return CliRunner().invoke(main, ["--log-format", "json", "--log-level", "error", *args])


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def fingerprint(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished plain run of the MLP: model.pt, checkpoint.pt, summary.json, metrics.csv."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run(TrainConfig(model="mlp", mode="plain", epochs=1, out=str(out)))
    return out


def write_cifar(root: Path, batches: int = 5, per_batch: int = 8) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i + 1}" for i in range(batches)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist()}
        (d / name).write_bytes(pickle.dumps(batch))
    return d


def test_out_naming_a_file_or_under_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    one_line_error(tempo("train", "--mode", "plain", "--out", str(afile)), "is a file, not a directory")
    one_line_error(tempo("train", "--mode", "plain", "--out", str(afile / "sub")), f"{afile} is a file")
    assert afile.read_text() == "keep me"


def test_a_run_into_an_existing_out_is_refused_unless_resume_or_overwrite(trained, tmp_path):
    before = fingerprint(trained)
    one_line_error(tempo("train", "--mode", "plain", "--model", "mlp", "--out", str(trained)),
                   "already holds a run", "--resume", "--overwrite")
    assert fingerprint(trained) == before  # nothing replaced
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, _ in before.items():
        (copy / name).write_bytes((trained / name).read_bytes())
    again = tempo("train", "--mode", "plain", "--model", "mlp", "--epochs", "1", "--out", str(copy), "--overwrite")
    assert again.exit_code == 0, again.output
    assert (copy / "model.pt").exists() and fingerprint(copy)["summary.json"] != before["summary.json"]


def test_resume_against_a_checkpoint_of_another_model(trained):
    before = fingerprint(trained)
    one_line_error(tempo("train", "--mode", "plain", "--model", "cnn", "--resume", "--out", str(trained)),
                   "is a run of model 'mlp', not 'cnn'")
    assert fingerprint(trained) == before


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupted_checkpoint_for_resume_and_infer(trained, tmp_path, damage):
    out = tmp_path / "run"
    out.mkdir()
    raw = (trained / "checkpoint.pt").read_bytes()
    bad = {"garbage": b"\x00not a checkpoint" * 50, "truncated": raw[: len(raw) // 3], "empty": b""}[damage]
    (out / "checkpoint.pt").write_bytes(bad)
    one_line_error(tempo("train", "--mode", "plain", "--model", "mlp", "--resume", "--out", str(out)),
                   "is not a readable checkpoint or model")
    one_line_error(tempo("infer", "--checkpoint", str(out / "checkpoint.pt"), "--model", "mlp"),
                   "is not a readable checkpoint or model")
    assert (out / "checkpoint.pt").read_bytes() == bad


def test_infer_refuses_what_is_not_a_checkpoint_and_says_why_weights_do_not_fit(trained, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    one_line_error(tempo("infer", "--checkpoint", str(notes), "--model", "mlp"), "is not a readable checkpoint")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    one_line_error(tempo("infer", "--checkpoint", str(tensor), "--model", "mlp"), "holds no model weights")
    # the whole mismatch, not a message cut off at a colon
    line = one_line_error(tempo("infer", "--checkpoint", str(trained / "model.pt"), "--model", "mlp", "--width", "32"),
                          "does not fit this model")
    assert "1.weight is (128, 64) in the file, (32, 64) in the model" in line
    line = one_line_error(tempo("infer", "--checkpoint", str(trained / "model.pt"), "--model", "cnn"), "missing", "unexpected")


def test_infer_accepts_a_training_checkpoint(trained):
    result = tempo("infer", "--checkpoint", str(trained / "checkpoint.pt"), "--model", "mlp", "--json")
    assert result.exit_code == 0, result.output
    import json

    figures = json.loads(result.stdout.strip().splitlines()[-1])
    summary = json.loads((trained / "summary.json").read_text())
    assert abs(figures["accuracy"] - summary["test_accuracy"]) < 0.01


def test_cifar10_folders_incomplete_or_damaged(tmp_path):
    root = write_cifar(tmp_path / "two", batches=2).parent
    one_line_error(tempo("train", "--mode", "plain", "--dataset", "cifar10", "--data-dir", str(root),
                         "--out", str(tmp_path / "a")), "lacks data_batch_3, data_batch_4, data_batch_5",
                   "--partial-data")
    partial = CliRunner().invoke(main, ["--log-format", "json", "train", "--mode", "plain", "--model", "mlp",
                                        "--dataset", "cifar10", "--data-dir", str(root), "--partial-data",
                                        "--epochs", "1", "--out", str(tmp_path / "b")])
    assert partial.exit_code == 0, partial.output
    assert '"event": "data.loaded"' in partial.stderr and "(16 training images)" in partial.stderr
    full = write_cifar(tmp_path / "five")
    (full / "data_batch_4").write_bytes((full / "data_batch_4").read_bytes()[:100])
    one_line_error(tempo("train", "--mode", "plain", "--dataset", "cifar10", "--data-dir", str(full.parent),
                         "--out", str(tmp_path / "c")), "data_batch_4 is not a readable CIFAR-10 batch")


def test_data_dir_with_the_shipped_digits_is_an_error(tmp_path):
    one_line_error(tempo("train", "--mode", "plain", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")),
                   "--data-dir", "cifar10 only")


@pytest.mark.parametrize("text, key", [
    ("relays = true", "relays"), ("epochs = true", "epochs"), ("data_dir = 5", "data_dir"),
    ('width = "wide"', "width"), ("batch_size = 0", "batch_size"), ("part_timeout_s = 0", "part_timeout_s"),
    ("relays = 0", "relays"), ('optimizer = "adam"', "optimizer"), ("lr = -1", "lr"), ("val_fraction = 1.0", "val_fraction"),
])
def test_the_job_file_is_validated_once_with_the_key_named(tmp_path, text, key):
    job = tmp_path / "job.toml"
    job.write_text(text + "\n")
    one_line_error(tempo("enclave", "--config", str(job), "--offloader", "ipc:///nonexistent"), f"{key} must be")


def test_a_diverging_run_blames_the_model_not_the_relays(tmp_path):
    result = CliRunner().invoke(main, ["--log-format", "json", "train", "--model", "mlp", "--lr", "1e6",
                                       "--epochs", "2", "--out", str(tmp_path / "d")])
    assert result.exit_code != 0
    assert "the model diverged at step" in result.stderr and "No relay is to blame" in result.stderr
    for blame in ("verification_failed", "quarantine", "fix the relays"):
        assert blame not in result.stderr, blame


def test_nan_inputs_through_the_library_never_leave_the_enclave():
    from torch import nn

    from tempo.cluster import LocalCluster
    from tempo.enclave.client import OffloadClient
    from tempo.enclave.private import ClientEngine, InProcessEngine, PrivateContext, to_private
    from tempo.core.verify import NonFiniteError

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    x = torch.rand(8, 1, 8, 8)
    x[3, 0, 2, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="layer 0"):
        to_private(model, PrivateContext(InProcessEngine()), keep=())(x)
    with LocalCluster(relays=1) as cluster, OffloadClient(cluster.enclave_endpoint, "nan") as client:
        client.wait_for_relays(1)
        with pytest.raises(NonFiniteError, match="layer 0"):
            to_private(model, PrivateContext(ClientEngine(client)), keep=())(x)
        assert client.counters.forward == 0 and not client.relay_events  # nothing sent, nobody blamed
        assert client.arena.bytes_in_use == 0


def test_every_option_of_every_command_has_help():
    import click

    def walk(command, path):
        yield path, command
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, f"{path} {name}")

    missing = [f"{path} {param.opts[0]}" for path, command in walk(main, "tempo") for param in command.params
               if isinstance(param, click.Option) and not param.hidden and not param.help]
    assert not missing, missing
