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


@pytest.fixture
def relay_driven_by_test():
    """A real relay process whose off-loader is the test: call with a zmq context; yields
    ``(router, identity, cluster)`` after the relay's ``ready`` arrived."""
    import contextlib

    import zmq

    from tempo.cluster import LocalCluster
    from tempo.protocol import RELAY_OPS, decode

    @contextlib.contextmanager
    def start(ctx):
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.RCVTIMEO, 10000)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        cluster = LocalCluster(relays=0)
        cluster.relay_endpoint = f"tcp://127.0.0.1:{port}"
        try:
            cluster.add_relay()
            identity, *frames = router.recv_multipart()
            assert decode(frames, RELAY_OPS).op == "ready"
            yield router, identity, cluster
        finally:
            cluster.stop()
            router.close(linger=0)

    return start


def ask_relay(router, identity, frames):
    """Send `frames` to the relay behind `router` and return its first reply that is not a
    heartbeat (decoded)."""
    from tempo.protocol import RELAY_OPS, decode

    router.send_multipart([identity, *frames])
    while True:
        _, *reply = router.recv_multipart()
        msg = decode(reply, RELAY_OPS)
        if msg.op != "heartbeat":
            return msg
