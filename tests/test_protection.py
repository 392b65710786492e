"""Masking presets and the key options on top of them."""

from __future__ import annotations

import pytest

from tempo.enclave import protection
from tempo.train import ConfigError, TrainConfig


def test_presets_and_options():
    assert protection.preset("paper").mix == 0 and protection.preset("paper").keep == ()
    assert protection.preset("mixed").mix == 16 and protection.preset("mixed").keep == ("first", "last")
    edges = protection.preset("edges").with_options(mix=8, key_refresh="step")
    assert edges.mix == 8 and edges.name == "edges+mix=8" and edges.keep == ("first", "last")
    assert protection.preset("head").with_options(key_refresh="step").name == "head"  # unchanged: same name
    assert protection.parse_keep("first, last") == ("first", "last") and protection.parse_keep("none") == ()
    with pytest.raises(ValueError, match="unknown masking"):
        protection.preset("vault")
    with pytest.raises(ValueError, match="keep takes"):
        protection.parse_keep("middle")


def test_the_cli_offers_exactly_the_presets():
    from tempo.cli import train

    option = next(p for p in train.params if p.name == "masking")
    assert list(option.type.choices) == list(protection.PRESETS)


@pytest.mark.parametrize("field, value", [("key_space", "int:0"), ("mix", 1), ("keep", "middle"), ("masking", "vault")])
def test_bad_masking_settings_are_named(field, value):
    with pytest.raises(ConfigError):
        TrainConfig(**{field: value}).validate()
