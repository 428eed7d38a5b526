"""Output configuration for GhostServe's structlog events. Library modules only log through
``structlog.get_logger``; the launcher (and the plugin, for SGLang's spawned processes) calls
``configure`` once with the operator's choice."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(log_format: str = "console") -> None:
    renderer = (structlog.processors.JSONRenderer() if log_format == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
