"""The distinguishing game on a run's view (`tempo.audit.game`): won where the relays' products
carry the batch, lost (advantage near 0) when they carry noise; and the audit table's numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")

from tempo.audit import game  # noqa: E402
from tempo.audit import score as sc  # noqa: E402
from tempo.audit.public import Public  # noqa: E402
from tempo.audit.run import headline, table  # noqa: E402
from tempo.audit.view import ProductView, RunTruth, RunView, StepTruth  # noqa: E402


def _world(noise: bool, steps: int = 14, n: int = 24, seed: int = 0):
    """A synthetic run: per step, a hidden layer's ``A'`` = masked ReLU(x W) of that step's batch
    (monomial keys, fresh each step) — or, with `noise`, masked random numbers."""
    rng = np.random.default_rng(seed)
    protos = rng.random((10, 1, 6, 6)) * (rng.random((10, 1, 6, 6)) < 0.5)

    def images(k):
        y = rng.integers(10, size=k)
        return np.clip(protos[y] + 0.1 * rng.standard_normal((k, 1, 6, 6)), 0, 1), y

    w = rng.standard_normal((36, 48))
    view, truth = RunView(), RunTruth("mlp")
    for s in range(steps):
        x, y = images(n)
        h = np.maximum(x.reshape(n, -1) @ w, 0)
        if noise:
            h = rng.random(h.shape) * (rng.random(h.shape) < 0.5)
        a = h[rng.permutation(n)][:, rng.permutation(48)] * rng.integers(1, 257, (n, 1)) / rng.integers(1, 257, (1, 48))
        b = rng.standard_normal((48, 10))
        view.products.append(ProductView(s, 1, 0, torch.from_numpy(a), torch.from_numpy(b)))
        truth.steps[s] = StepTruth(torch.from_numpy(x), torch.from_numpy(y), train=True)
    px, py = images(200)
    public = Public("mlp", px, py, batch_size=n, layers=3)
    return view, truth, public


@pytest.mark.parametrize("noise", [False, True])
def test_the_game_is_won_on_leaking_views_and_not_on_noise(noise):
    view, truth, public = _world(noise)
    res = game.play(view, public, truth, variants=("batch",), rounds=28, nulls=4)["batch"]
    assert res["rounds"] == 28
    if noise:
        assert abs(res["advantage"]) < 0.5  # chance 0; 28 rounds
    else:
        assert res["advantage"] > 0.6 and res["interval"][0] > 0.2


def test_challenges_hide_the_answer_and_decoys_differ_as_said():
    view, truth, _ = _world(False, steps=6, n=16)
    for variant in game.VARIANTS:
        rounds, secrets = game.challenges(view, truth, variant, rounds=12, swap=3, seed=1)
        assert len(rounds) == 12 and set(secrets) <= {0, 1} and 0 < sum(secrets) < 12
        for ch, bit in zip(rounds, secrets):
            (x, y), (dx, dy) = ch.candidates[bit], ch.candidates[1 - bit]
            assert np.array_equal(x, truth.steps[ch.step].x.numpy())
            diff = game._differing((x, y), (dx, dy))
            if variant == "batch":
                assert len(diff) > 8
            else:
                assert 1 <= len(diff) <= 3
                same = y[diff] == dy[diff]
                assert same.all() if variant == "swap-same-label" else not same.any()


def test_game_score_has_an_interval():
    s = sc.score_game([1] * 30 + [0] * 10, [1] * 40)
    assert s["advantage"] == 0.5 and s["rounds"] == 40
    assert s["interval"][0] < 0.5 < s["interval"][1]
    assert sc.score_game([], [])["advantage"] is None


def test_the_table_prints_attacks_that_found_nothing():
    figures = {"model": "cnn", "epochs": 1, "relays": 0, "products": 3,
               "masking": {"masking": "mixed", "key_space": "int:256", "key_refresh": "step", "mix": 16,
                           "keep": ["first", "last"]},
               "attacks": {"hidden": {"map_correlation": None, "digit_accuracy": None, "steps": 0},
                           "hidden_distinguishing": {"batch": {"advantage": None, "rounds": 0, "interval": None}},
                           "distinguishing": {"applicable": False, "reason": "kept"}}}
    text = table(figures)
    assert "none found / n/a" in text
    rows = {r[0]: r[1] for r in headline(figures)}
    assert any("distinguishing game on the run" in k and "none found" in v for k, v in rows.items())
