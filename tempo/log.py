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
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger().bind(role=role, **ids)
