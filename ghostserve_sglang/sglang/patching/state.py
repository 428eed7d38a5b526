"""The state the patch layer's wrappers share in one scheduler process: the settings (set by the plugin
at load), the rank's Protector (created by the scheduler's init wrapper) and the wrappers' own error
counts. Only the patch layer reads it; what other parts need of it is handed to them (the Protector
receives the error counts at its creation)."""

from __future__ import annotations

import dataclasses

import structlog

from ...settings import Settings

log = structlog.get_logger("ghostserve.hooks")


@dataclasses.dataclass
class State:
    settings: Settings | None = None
    protector: object | None = None  # Protector, created at scheduler init
    errors: dict = dataclasses.field(default_factory=dict)


STATE = State()


def guarded(where: str, fn, *args) -> None:
    """Run GhostServe's part of a wrapper: a failure is counted and logged once and never reaches
    SGLang, unless strict mode is on."""
    try:
        fn(*args)
    except Exception as exc:
        if STATE.settings is None or STATE.settings.strict:
            raise
        STATE.errors[where] = STATE.errors.get(where, 0) + 1
        if STATE.errors[where] == 1:
            log.error("ghostserve hook failed; SGLang continues, protection may be incomplete",
                      where=where, error=repr(exc), exc_info=exc)
