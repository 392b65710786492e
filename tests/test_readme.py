"""The README's library example runs as written (real off-loader and relays)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_training_your_own_module_example_runs_and_offloads(tmp_path, monkeypatch):
    text = README.read_text()
    section = text.split("## Training your own module", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README example", "exec"), scope)
    assert (tmp_path / "mine.pt").exists()
    assert scope["ctx"].engine.counters.forward_products >= 1  # the middle layer left the enclave
    state = torch.load(tmp_path / "mine.pt")
    assert set(state) == set(scope["model"].state_dict())
