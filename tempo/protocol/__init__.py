"""The wire protocol between enclave, off-loader and relays: the one place the format lives.

Not built yet (issue 3): message types, msgpack headers with zero-copy tensor frames,
PROTOCOL_VERSION, dtype allow-list and unpacker limits.
"""
