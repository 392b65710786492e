"""tempo.Session's settings, checked before anything starts (no process here: the README example
in tests/test_readme.py and every training test run the session end to end)."""

import pytest
import torch

import tempo
from tempo.session import Session, SessionConfig, SessionError


@pytest.mark.parametrize("settings, key", [
    (dict(relays=0), "relays"),
    (dict(relays=True), "relays"),
    (dict(protection="none"), "protection"),
    (dict(integrity_t=1.0), "integrity_t"),
    (dict(rounds=0), "rounds"),
    (dict(steps=0), "steps"),
    (dict(masking="nonesuch"), "masking"),
    (dict(offloader="tcp://127.0.0.1:5556", faults={0: "corrupt"}), "faults"),
    (dict(offloader="tcp://127.0.0.1:5556", protection="shares"), "pool_keys"),
])
def test_a_bad_setting_is_named_before_anything_starts(settings, key):
    with pytest.raises(SessionError) as info:
        Session(**settings)
    assert info.value.key == key


def test_the_protection_follows_the_pools_keys_unless_asked():
    assert not SessionConfig().uses_shares()
    assert SessionConfig(pool_keys={"p1": b"k", "p2": b"k", "p3": b"k"}).uses_shares()
    assert not SessionConfig(protection="masking", pool_keys="keys/").uses_shares()
    assert SessionConfig(protection="shares").uses_shares()
    s = Session(protection="shares")
    assert s.shared and s.keys is None and s.cluster is None  # nothing started yet


def test_the_package_exports_the_session_and_one_config_builds_it():
    assert tempo.Session is Session and tempo.SessionConfig is SessionConfig
    config = SessionConfig(relays=3, masking="paper")
    s = Session(config, rounds=5)
    assert s.config.relays == 3 and s.config.rounds == 5 and config.rounds is None  # the given config unchanged
    assert s.masking.keep == () and s.keys is not None


def test_a_wrapped_optimizers_step_ends_the_sessions_step():
    """The step boundary comes from the optimizer (a session not started: `end_step` counts
    once the step context exists, so this checks the hook alone)."""
    s = Session()
    ended = []
    s.end_step = lambda: ended.append(1)
    p = torch.nn.Parameter(torch.ones(2))
    opt = s.wrap(torch.optim.SGD([p], lr=0.1))
    for _ in range(3):
        p.grad = torch.ones(2)
        opt.step()
    assert len(ended) == 3
