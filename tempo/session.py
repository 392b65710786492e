"""One session: the enclave's connection to an off-loader and its relays, built from one config.

Every entry point (`tempo train`, `tempo enclave`, `tempo infer`, the benchmarks) and any PyTorch
loop of your own go through it::

    import tempo

    with tempo.Session(relays=2) as s:           # starts a local off-loader and two relays
        model = s.private(model)                 # Linear/Conv2d products masked, offloaded, verified
        optimizer = s.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()                     # the step boundary: the session hears it here

`Session(offloader="tcp://host:5556", relays=4)` connects to processes started on their own
(``tempo offloader``, ``tempo relay``) instead of starting them. Local processes are started by
`tempo.cluster.LocalCluster`, imported only then: a session that connects (the deployed enclave)
never loads the code that starts or serves processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from tempo.enclave import protection as presets

PROTECTIONS = ("auto", "masking", "shares", "asymml")


class SessionError(ValueError):
    """A session setting that is wrong, named by its key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass
class SessionConfig:
    """Everything a session is built from. Defaults are `tempo train`'s."""

    relays: int = 1  # relays (per pool, in the shares mode)
    offloader: str | None = None  # a running off-loader's enclave endpoint; None: start local processes
    protection: str = "auto"  # masking, shares, asymml, or auto: shares wherever the pools' keys are given
    asymml: object | None = None  # the asymml mode's knobs (tempo.core.asymml.AsymmlConfig; None: its defaults)
    masking: str | presets.Masking = presets.DEFAULT  # a preset name, or a Masking with options
    pool_keys: str | dict | None = None  # shares with a running off-loader: DIR/p1.key… or {pool: key}
    device: str = "cpu"  # the local relays' device
    integrity_t: float = 1e-6  # probability that a wrong result beyond tolerance is accepted, whole session
    steps: int = 10_000  # optimizer steps expected: with integrity_t, sets the Freivalds rounds
    rounds: int | None = None  # Freivalds rounds per check; None: from integrity_t, steps and the model
    pipeline: bool = True  # overlap masking, relay compute and unmasking across a product's parts
    split_min_mb: float = 4.0  # products smaller than this (operands + result) are not split
    part_timeout_s: float = 30.0  # a part unanswered this long goes to another relay
    reply_timeout_s: float = 30.0  # the off-loader silent this long: it is gone
    heartbeat_timeout_s: float = 3.0
    relay_wait_s: float | None = None  # how long to wait for the relays to join (None: 30 s local, 60 s remote)
    arena_mb: int | None = None  # the shared-memory arena: 256 MiB, or 1024 for the shares mode
    faults: dict = field(default_factory=dict)  # local relays only: index -> --fault MODE[:RATE] (tests)
    job: str | None = None  # the job id on the wire (None: a fresh one)

    def validate(self) -> SessionConfig:
        if not isinstance(self.relays, int) or isinstance(self.relays, bool) or self.relays < 1:
            raise SessionError("relays", f"relays must be a positive integer, not {self.relays!r}")
        if self.protection not in PROTECTIONS:
            raise SessionError("protection", f"protection must be one of {', '.join(PROTECTIONS)}, "
                                             f"not {self.protection!r}")
        if not 0 < self.integrity_t < 1:
            raise SessionError("integrity_t", f"integrity_t must lie in (0, 1), not {self.integrity_t!r}")
        if self.rounds is not None and self.rounds < 1:
            raise SessionError("rounds", f"rounds must be at least 1, not {self.rounds!r}")
        if self.steps < 1:
            raise SessionError("steps", f"steps must be at least 1, not {self.steps!r}")
        if self.faults and self.offloader:
            raise SessionError("faults", "faults are injected into local relays; start a relay with --fault instead")
        if self.asymml is not None and self.protection != "asymml":
            raise SessionError("asymml", f"asymml settings are for protection='asymml', not {self.protection!r}")
        if self.protection == "asymml":
            from tempo.core.asymml import AsymmlConfig

            try:
                self.asymml = (self.asymml or AsymmlConfig()).validate()
            except ValueError as exc:
                raise SessionError("asymml", str(exc)) from None
        if self.protection == "shares" and self.offloader and self.pool_keys is None:
            raise SessionError("pool_keys", "the shares mode through a running off-loader needs the pools' keys "
                                            "(pool_keys: a directory of p1.key, p2.key, p3.key)")
        self.masking_preset()
        return self

    def uses_shares(self) -> bool:
        """Whether products are secret-shared across three relay pools: asked for, or, by
        default, wherever the pools' keys are given."""
        return self.protection == "shares" or (self.protection == "auto" and self.pool_keys is not None)

    def uses_asymml(self) -> bool:
        """Whether layers split their inputs (low rank here, noisy residual to the relays: AsymML)."""
        return self.protection == "asymml"

    def masking_preset(self) -> presets.Masking:
        if isinstance(self.masking, presets.Masking):
            return self.masking
        try:
            return presets.preset(self.masking)
        except ValueError as exc:
            raise SessionError("masking", str(exc)) from None


def read_pool_keys(source: str | dict) -> dict[str, bytes]:
    """The three pools' keys: a mapping already, or read from DIR/p1.key, p2.key, p3.key."""
    from tempo.enclave.pools import POOL_NAMES
    from tempo.protocol.sealed import read_key

    if isinstance(source, dict):
        missing = [p for p in POOL_NAMES if p not in source]
        if missing:
            raise SessionError("pool_keys", f"pool_keys lacks {', '.join(missing)}")
        return {p: source[p] for p in POOL_NAMES}
    return {p: read_key(os.path.join(source, f"{p}.key")) for p in POOL_NAMES}


class Session:
    """The off-loader, the relays (started here or running already) and the enclave's side of
    them: the masking's keys or the shares' pools, the client, the engine and the step context.

    `start` (or ``with``) connects; `private` makes a module's products private; `wrap` makes an
    optimizer's step the step boundary; `close` (or leaving ``with``) stops what it started and
    removes the arena. Attributes after `start`: `cluster` (None when connecting), `client`,
    `engine` (kept after `close`, with its counters), `context`, `keys` (masking), `shared`
    (whether the shares mode is on), `asymml` (the AsymML mode's state: releases and ranks; None
    in the other modes), `steps` (steps ended)."""

    def __init__(self, config: SessionConfig | None = None, *, log=None, **settings) -> None:
        self.config = replace(config or SessionConfig(), **settings).validate()
        self.log = log
        self.shared = self.config.uses_shares()
        self.masking = self.config.masking_preset()
        self.asymml = None
        if self.config.uses_asymml():
            from tempo.enclave.asymml import AsymmlState, IdentityKeys

            self.asymml = AsymmlState(self.config.asymml)
            self.keys = IdentityKeys()  # AsymML sends its residuals and weights unmasked (marked so on the wire)
        else:
            self.keys = None if self.shared else self.masking.keys()
        self.cluster = self.client = self.engine = self.context = None
        self._rounds_set = self.config.rounds is not None
        self.steps = 0  # steps ended (by the wrapped optimizer or `end_step`)

    # -- lifetime --
    def start(self) -> Session:
        """Start the local processes (unless connecting), connect, and wait for the relays (or
        the three pools). On any failure or interrupt, whatever was started is stopped."""
        if self.context is not None:
            return self
        from tempo.enclave.client import OffloadClient, default_job_id
        from tempo.enclave.private import ClientEngine, PrivateContext

        cfg, log = self.config, self.log
        try:
            if cfg.offloader:
                endpoint = cfg.offloader
            else:
                from tempo.cluster import LocalCluster
                from tempo.enclave.pools import POOL_NAMES

                self.cluster = LocalCluster(relays=0 if self.shared else cfg.relays, device=cfg.device,
                                            faults=dict(cfg.faults), heartbeat_timeout_s=cfg.heartbeat_timeout_s,
                                            heartbeat_s=min(0.5, cfg.heartbeat_timeout_s / 4),
                                            pools=dict.fromkeys(POOL_NAMES, cfg.relays) if self.shared else None)
                self.cluster.start()
                endpoint = self.cluster.enclave_endpoint
            job = cfg.job or default_job_id()
            arena_mb = cfg.arena_mb or (1024 if self.shared else 256)  # shares: int64, three pools' answers
            self.client = OffloadClient(endpoint, job, arena_bytes=arena_mb << 20, rounds=cfg.rounds or 16,
                                        log=log, keys=self.keys, part_timeout_s=cfg.part_timeout_s,
                                        timeout_s=cfg.reply_timeout_s,
                                        max_attempts=cfg.relays + 1,
                                        mode="asymml" if self.asymml is not None else "masked")
            if self.cluster is not None:
                self.client.watchdog = self.cluster.check  # the off-loader's exit is noticed within a second
            wait_s = cfg.relay_wait_s if cfg.relay_wait_s is not None else (60.0 if cfg.offloader else 30.0)
            if self.shared:
                from tempo.core.shares import ROLES
                from tempo.enclave.pools import POOL_NAMES, RelayPools, SharesEngine

                if log:
                    log.info("session.waiting_for_relays", offloader=endpoint, relays=cfg.relays, pools=list(POOL_NAMES))
                keys = self.cluster.pool_keys if self.cluster is not None else read_pool_keys(cfg.pool_keys)
                pools = RelayPools(self.client, {r: (name, keys[name]) for r, name in zip(ROLES, POOL_NAMES)}, wait_s)
                self.engine = SharesEngine(pools, rounds=cfg.rounds or 16, max_attempts=cfg.relays + 1)
            else:
                if log:
                    log.info("session.waiting_for_relays", offloader=endpoint, relays=cfg.relays)
                self.client.wait_for_relays(cfg.relays, timeout_s=wait_s)
                self.engine = ClientEngine(self.client, parts=cfg.relays, pipeline=cfg.pipeline,
                                           split_min_mb=cfg.split_min_mb)
            patch_rows = True if self.shared or self.asymml is not None else self.masking.patch_rows
            self.context = PrivateContext(self.engine, job=job, patch_rows=patch_rows, asymml=self.asymml)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Disconnect, remove the arena, and stop the processes this session started."""
        client, cluster = self.client, self.cluster
        self.client = self.cluster = self.context = None  # the engine stays: its counters are the session's
        try:
            if client is not None:
                client.close()
        finally:
            if cluster is not None:
                cluster.stop()

    def __enter__(self) -> Session:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the model and the step boundary --
    def private(self, module: torch.nn.Module, keep: tuple[str, ...] | None = None) -> torch.nn.Module:
        """`module`'s private twin (parameters shared with it): every Linear and Conv2d product
        masked (or secret-shared), offloaded and verified; `keep` names layers computed in the
        enclave instead (``"first"``, ``"last"``; None: the masking's choice, nothing in the shares
        and AsymML modes). Sets the Freivalds rounds from `integrity_t` and `steps` unless `rounds` was given."""
        from tempo.enclave.private import offloaded_products, to_private

        self.start()
        if keep is None:
            keep = () if self.shared or self.asymml is not None else self.masking.keep
        if not self._rounds_set:
            from tempo.core.verify import freivalds_rounds

            products = max(1, offloaded_products(module) - len(keep))
            self.set_rounds(freivalds_rounds(self.config.integrity_t, 3 * self.config.steps, self.config.relays,
                                             products))
        return to_private(module, self.context, keep=keep)

    def set_rounds(self, rounds: int) -> None:
        """Freivalds rounds per check from now on."""
        self.config.rounds, self._rounds_set = rounds, True
        if self.client is not None:
            self.client.rounds = rounds
        if self.engine is not None and hasattr(self.engine, "rounds"):
            self.engine.rounds = rounds

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """`optimizer` itself, whose every ``step()`` now ends the session's step (releases what
        the relays hold for products whose backward never came and moves to fresh bindings)."""
        optimizer.register_step_post_hook(lambda *_: self.end_step())
        return optimizer

    def end_step(self) -> None:
        """End a step by hand: after each batch of a loop with no optimizer (evaluation)."""
        if self.context is not None:
            self.context.end_step()
            self.steps += 1
