"""The off-loader (untrusted, beside the enclave): shared-memory arena, relay registry, dispatch.

Not built yet (issue 3).
"""
