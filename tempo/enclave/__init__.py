"""The enclave's side of Tempo: the client of the off-loader (`client`), private layers and the
step context (`private`), the shares mode's engine and pools (`pools`), masking presets
(`protection`), `tempo selfcheck` (`selfcheck`) and run files (`checkpoint`).

Everything here runs inside the TEE, on the mathematics of `tempo.core`. It imports only the
core, the wire format (`tempo.protocol`), the arena (`tempo.arena`), zmq and msgpack
(tests/test_architecture.py): nothing that starts, serves or attacks a process.
"""
