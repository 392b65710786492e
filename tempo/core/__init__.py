"""Tempo's trusted core: the mathematics the enclave's secrecy and integrity rest on.

Keys (`keys`), masking and unmasking (`obfuscation`, `roundtrip`: one masked round trip),
Freivalds verification (`verify`), partitioning products across relays (`partition`),
convolutions as products (`im2col`), the shares mode's ring arithmetic (`shares`), the products
a relay computes (`products`), the layers the enclave swaps for offloaded ones (`layers`), and
the C kernel (`_gather.c`). It imports only torch, numpy, the standard library, and
`cryptography` for AES (the shares' randomness: a vetted implementation, never our own);
tests/test_architecture.py holds it to that. Nothing here sends, receives or starts a process.
"""
