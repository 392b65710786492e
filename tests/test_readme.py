"""The README's library example runs as written (real off-loader and relays) and trains as plain
autograd does."""

import copy
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_training_your_own_module_example_runs_and_matches_plain_autograd(tmp_path, monkeypatch):
    text = README.read_text()
    section = text.split("## Training your own module", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "import tempo" in code and "session.wrap" in code
    monkeypatch.chdir(tmp_path)
    # the same three steps in plain autograd, from the same weights and batches
    torch.manual_seed(5)
    scope: dict = {}
    exec(compile(code.split("with tempo.Session", 1)[0], "README example (model)", "exec"), scope)
    plain = copy.deepcopy(scope["model"])
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    torch.manual_seed(6)
    for _ in range(3):
        x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
        loss = torch.nn.functional.cross_entropy(plain(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    torch.manual_seed(5)
    scope = {}
    lines = code.splitlines()
    first_loop = next(i for i, line in enumerate(lines) if "for _ in range" in line)
    lines.insert(first_loop, "    torch.manual_seed(6)")  # the same batches as above
    exec(compile("\n".join(lines), "README example", "exec"), scope)
    session = scope["session"]
    assert session.client is None and session.cluster is None  # closed: processes stopped
    state = torch.load(tmp_path / "mine.pt")
    assert set(state) == set(plain.state_dict())
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert session.engine.counters.forward_products >= 3  # the middle Linear left the enclave each step
    assert session.steps == 3  # each optimizer step ended one session step
