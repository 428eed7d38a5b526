"""Output configuration for GhostServe's structlog events. Library modules only log through
``structlog.get_logger``; the launcher (and the plugin, for SGLang's spawned processes) calls
``configure`` once with the operator's choice.

Every event is written as one line in a single ``write``: SGLang's processes share one stderr, and
under ``PYTHONUNBUFFERED`` a ``print`` writes the text and its newline separately, so lines from two
ranks would run together and a JSON log would not parse line by line.

May import: nothing else in the package.
"""

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
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
