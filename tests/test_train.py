"""`tempo train` end to end: real relay processes, summary.json, model.pt."""

import json

import torch
from click.testing import CliRunner

from tempo import models
from tempo.cli import main
from tempo.enclave.train import TrainConfig, run


def test_private_training_matches_plain_training(tmp_path):
    common = dict(model="mlp", epochs=1, batch_size=128, seed=3, lr=0.1)
    private = run(TrainConfig(mode="tempo", relays=2, out=str(tmp_path / "p"), **common))
    plain = run(TrainConfig(mode="plain", out=str(tmp_path / "q"), **common))
    assert private.steps == plain.steps == 12
    assert abs(private.train_loss - plain.train_loss) < 1e-3
    assert abs(private.test_accuracy - plain.test_accuracy) <= 0.01
    assert private.offload["backward_encryptions"] == private.offload["backward_products"]
    assert private.offload["forward_encryptions"] == 2 * private.offload["forward_products"]
    w_private = torch.load(tmp_path / "p" / "model.pt")
    w_plain = torch.load(tmp_path / "q" / "model.pt")
    for k in w_plain:
        assert torch.allclose(w_private[k], w_plain[k], atol=1e-4), k


def test_tempo_train_cli_writes_summary_and_model(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--model", "cnn", "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    for key in ("mode", "model", "dataset", "epochs", "steps", "batch_size", "relays", "device",
                "train_loss", "test_accuracy", "wall_s", "breakdown"):
        assert key in summary
    assert summary["mode"] == "tempo" and summary["relays"] == 2 and summary["test_accuracy"] > 0.5
    assert set(summary["breakdown"]) >= {"encrypt", "decrypt", "verify", "transfer_wait", "enclave_other"}
    net = models.build("cnn", (1, 8, 8), 10)
    net.load_state_dict(torch.load(out / "model.pt"))


def test_train_refuses_bad_options(tmp_path):
    result = CliRunner().invoke(main, ["train", "--dataset", "cifar10", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "data-dir" in result.output
