import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tempo import __version__
from tempo.cli import main


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_selfcheck_passes_and_reports():
    result = CliRunner().invoke(main, ["--log-format", "json", "selfcheck", "--trials", "20", "--no-bench"])
    assert result.exit_code == 0, result.output
    assert "selfcheck: 20 random products" in result.output
    assert "20/20 tampered results rejected" in result.output


def test_bench_obfuscation_json_last_line_has_the_promised_keys():
    args = ["bench", "obfuscation", "--m", "96", "--n", "130", "--p", "17", "--repeat", "3", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    for key in ("m", "n", "p", "dtype", "enc_s", "enc_copy_s", "dec_s", "dec_copy_s", "verify_s", "matmul_s"):
        assert key in figures
    assert (figures["m"], figures["n"], figures["p"], figures["dtype"]) == (96, 130, 17, "float32")
    assert all(figures[k] > 0 for k in ("enc_s", "enc_copy_s", "dec_s", "dec_copy_s", "verify_s", "matmul_s"))
    assert "encrypt A, B" in result.output


def test_bench_rejects_bad_sizes():
    result = CliRunner().invoke(main, ["bench", "obfuscation", "--m", "0"])
    assert result.exit_code != 0 and "--m" in result.output


def test_options_come_from_tempo_environment_variables():
    result = CliRunner().invoke(
        main, ["selfcheck"], env={"TEMPO_SELFCHECK_TRIALS": "3", "TEMPO_SELFCHECK_BENCH": "false"}
    )
    assert result.exit_code == 0, result.output
    assert "selfcheck: 3 random products" in result.output


def test_tempo_runs_as_a_real_process_with_json_logs():
    exe = Path(sys.executable).with_name("tempo")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tempo"]
    proc = subprocess.run(
        [*cmd, "--log-format", "json", "selfcheck", "--trials", "5", "--no-bench"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    done = [e for e in events if e["event"] == "selfcheck.done"]
    assert done and done[0]["ok"] is True and done[0]["role"] == "selfcheck"
    assert all({"timestamp", "level", "role"} <= set(e) for e in events)


def test_bench_train_puts_the_modes_side_by_side(tmp_path):
    import torch

    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = CliRunner().invoke(main, [
        "--log-level", "warning", "bench", "train", "--model", "mlp", "--width", "32", "--batch-size", "16",
        "--steps", "2", "--relays", "2", "--split-min-mb", "0", "--image-shape", "1x8x8", "--json", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    tempo, plain = figures["modes"]["tempo"], figures["modes"]["plain-cpu"]
    assert len(tempo["steps_s"]) == 2 and tempo["step_s"] > 0 and plain["step_s"] > 0
    assert set(tempo["breakdown"]) == {"encrypt", "decrypt", "verify", "send", "split_gather", "transfer_wait",
                                       "non_linear", "optimizer", "offload_other"}
    assert all(v >= 0 for k, v in tempo["breakdown"].items() if k != "offload_other")
    assert tempo["breakdown"]["encrypt"] > 0 and tempo["breakdown"]["verify"] > 0
    assert tempo["relays"]["relay_compute"] > 0
    # the measured categories and the step are the same seconds, counted once
    total = sum(tempo["breakdown"].values())
    assert abs(total - tempo["mean_step_s"]) < 1e-3 * max(1.0, total)
    assert figures["tempo_over_plain_cpu"] == pytest.approx(tempo["step_s"] / plain["step_s"], rel=1e-3)
    # enclave work, its ratio to a pure-TEE step and its inverse, the floor: the bytes the
    # enclave must touch (each byte sent or received read and written once) at copy bandwidth
    work = figures["enclave_work_s"]
    assert work == pytest.approx(tempo["mean_step_s"] - tempo["breakdown"]["transfer_wait"], abs=1e-5)
    assert figures["projected_speedup_ideal_relays"] == pytest.approx(plain["step_s"] / work, rel=1e-2)
    moved = 2e6 * (tempo["relays"]["mb_sent"] + tempo["relays"]["mb_received"])
    assert figures["copy_bandwidth_gb_s"] > 0
    assert figures["enclave_floor_s"] == pytest.approx(moved / (figures["copy_bandwidth_gb_s"] * 1e9), rel=1e-2)
    assert figures["enclave_work_over_floor"] == pytest.approx(work / figures["enclave_floor_s"], rel=1e-2)
    assert "projected speed-up over pure TEE with ideal relays" in result.output
    if torch.cuda.is_available():
        assert figures["modes"]["plain-cuda"]["step_s"] > 0 and figures["tempo_over_plain_cuda"]
    else:
        assert "no CUDA" in figures["modes"]["plain-cuda"]["note"] and figures["tempo_over_plain_cuda"] is None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_train_refuses_bad_input():
    bad_mode = CliRunner().invoke(main, ["bench", "train", "--modes", "tempo,gpu-magic"])
    assert bad_mode.exit_code != 0 and "unknown mode" in bad_mode.output
    bad_shape = CliRunner().invoke(main, ["bench", "train", "--image-shape", "32x32"])
    assert bad_shape.exit_code != 0 and "C×H×W" in bad_shape.output
