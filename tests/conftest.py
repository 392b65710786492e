import hashlib

import pytest
from hypothesis import settings

settings.register_profile("tempo", deadline=None, max_examples=150, derandomize=False)
settings.load_profile("tempo")


class SeededBytes:
    """A deterministic byte source for tests that ask for reproducible keys (SHA-256 counter)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.counter = 0

    def __call__(self, count: int) -> bytes:
        out = bytearray()
        while len(out) < count:
            block = f"{self.seed}:{self.counter}".encode()
            out += hashlib.sha256(block).digest()
            self.counter += 1
        return bytes(out[:count])


@pytest.fixture
def seeded_bytes():
    return SeededBytes
