"""Tempo: confidential neural-network training on untrusted cloud GPUs (arXiv 2401.11531).

``tempo.Session`` is the API for a PyTorch loop of your own (`tempo.session`); every command
is a ``tempo`` subcommand (`tempo.cli`)."""

__version__ = "0.1.0"
__all__ = ["Session", "SessionConfig"]


def __getattr__(name: str):
    # lazily: `tempo --help` and the relay need not load torch's model code to start
    if name in __all__:
        from tempo import session

        return getattr(session, name)
    raise AttributeError(f"module 'tempo' has no attribute {name!r}")
