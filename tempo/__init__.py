"""Tempo: confidential neural-network training on untrusted cloud GPUs (arXiv 2401.11531)."""

__version__ = "0.1.0"
