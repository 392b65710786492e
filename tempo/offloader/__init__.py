"""The off-loader (untrusted, on the enclave's host): between the enclave and the relays.

Two ROUTER sockets: one for relays (tcp), one for the enclave (ipc). `Offloader` is the poll loop
around `tempo.offloader.core.OffloaderCore`, which holds every table and decides everything: the
loop receives, hands each message to the core with the time, sends what the core returns, and
ticks the core's clock so silent relays expire. Nothing else happens here.
"""

from __future__ import annotations

import time

import zmq

from tempo.offloader.core import OffloaderCore, Part, RelayState, Send  # noqa: F401 - importable from here


class Offloader(OffloaderCore):
    def __init__(
        self,
        relay_bind: str = "tcp://127.0.0.1:5555",
        enclave_bind: str = "ipc:///tmp/tempo-offloader.ipc",
        heartbeat_timeout_s: float = 3.0,
        max_frame_bytes: int = 1 << 30,
        log=None,
        curve_secret: str | None = None,
        curve_allow: str | None = None,
        max_inflight: int = 64,
        input_digest: bool = True,
    ) -> None:
        super().__init__(heartbeat_timeout_s, max_frame_bytes, log, max_inflight, input_digest)
        if (curve_secret is None) != (curve_allow is None):
            raise ValueError("CURVE needs both the off-loader's secret key and an allow-list of relay keys")
        self.curve_secret, self.curve_allow = curve_secret, curve_allow
        self.relay_bind = relay_bind
        self.enclave_bind = enclave_bind

    def _send(self, actions: list[Send]) -> None:
        for action in actions:  # a send that fails is counted and logged, as a handler's failure is
            sock = self.relay_sock if action.to == "relay" else self.enclave_sock
            try:
                sock.send_multipart([action.identity, *action.frames], copy=False)
            except (zmq.ZMQError, TypeError, ValueError) as exc:
                self._handler_failed(f"send to {action.to}", None, exc)

    def run(self, stop: callable = lambda: False, context: zmq.Context | None = None, ready=None) -> None:
        ctx = context or zmq.Context.instance()
        self.relay_sock = ctx.socket(zmq.ROUTER)
        self.enclave_sock = ctx.socket(zmq.ROUTER)
        for s in (self.relay_sock, self.enclave_sock):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.ROUTER_MANDATORY, 0)
        auth = monitor = None
        if self.curve_secret:
            from tempo import curve

            auth = curve.serve(ctx, self.relay_sock, self.curve_secret, self.curve_allow)
            monitor = self.relay_sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.relay_sock.bind(self.relay_bind)
        self.enclave_sock.bind(self.enclave_bind)
        self._info("offloader.listening", relays=self.relay_sock.last_endpoint.decode(),
                   enclave=self.enclave_sock.last_endpoint.decode())
        if ready is not None:
            ready(self.relay_sock.last_endpoint.decode(), self.enclave_sock.last_endpoint.decode())
        poller = zmq.Poller()
        poller.register(self.relay_sock, zmq.POLLIN)
        poller.register(self.enclave_sock, zmq.POLLIN)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        tick = max(0.05, self.heartbeat_timeout_s / 4)
        try:
            while not stop():
                events = dict(poller.poll(int(tick * 1000)))
                if self.relay_sock in events:
                    for _ in range(64):  # drain a burst without starving the other socket
                        try:
                            frames = self.relay_sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._send(self.on_relay([f.buffer for f in frames], time.monotonic()))
                if self.enclave_sock in events:
                    for _ in range(64):
                        try:
                            frames = self.enclave_sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._send(self.on_enclave([f.buffer for f in frames], time.monotonic()))
                if monitor is not None and monitor in events:
                    from zmq.utils.monitor import recv_monitor_message

                    event = recv_monitor_message(monitor)
                    self._warn("offloader.relay_refused", reason="CURVE handshake failed (key not allowed?)",
                               zmq_event=int(event["event"]), endpoint=str(event.get("endpoint", b""), "utf-8", "replace"))
                self._send(self.tick(time.monotonic()))
        finally:
            if monitor is not None:
                self.relay_sock.disable_monitor()
                monitor.close(linger=0)
            if auth is not None:
                auth.stop()
            self.relay_sock.close(linger=0)
            self.enclave_sock.close(linger=0)
            for arena in self.arenas.values():
                arena.close()
