"""Structured logging: one `configure_logging` call per process, JSON lines by default."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LOG_FORMATS = ("json", "console", "auto")


def configure_logging(role: str, fmt: str = "json", level: str = "info", **ids: Any):
    """Configure structlog for this process and return a logger bound to `role` and `ids`.

    Call it once after the process starts (cached loggers do not cross fork/spawn). Lines go to
    stderr: JSON with an ISO UTC timestamp and level, or coloured text with ``fmt="console"``
    (``"auto"``: console on a TTY, JSON otherwise).
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    # On a terminal a progress bar may be on screen: write log lines above it, not through it.
    factory = _BarSafeLoggerFactory() if sys.stderr.isatty() else structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger().bind(role=role, **ids)


class _BarSafeLogger(structlog.PrintLogger):
    """Prints each line with ``tqdm.write``, which clears any progress bar, prints, and redraws it."""

    def msg(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message, file=self._file)

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = err = msg


class _BarSafeLoggerFactory:
    def __call__(self, *args: Any) -> _BarSafeLogger:
        return _BarSafeLogger(sys.stderr)
