"""SGLang plugin entry point (group ``sglang.srt.plugins``).

SGLang calls ``load`` first thing in every process it starts, scheduler processes included, so the
patches exist where the KV pool lives whether the server was started by ``ghostserve_sglang.launch`` or
by ``python -m sglang.launch_server`` with ``GHOSTSERVE_*`` set. Without ``GHOSTSERVE_CODE`` in the
environment it does nothing at all.
"""

from __future__ import annotations

import os

import torch

from ... import logs
from ...settings import Settings, SettingsError
from . import cpu_compat
from .patches import CPU_PATCHER, PATCHER, PatchError
from .state import STATE


def load() -> None:
    if "GHOSTSERVE_CODE" not in os.environ:
        return
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise SystemExit(f"ghostserve: error: {exc}") from None
    logs.configure(settings.log_format)
    try:
        cpu_compat.install_rotary_standin()
        if not torch.cuda.is_available():
            CPU_PATCHER.install(allow_unsupported=settings.allow_unsupported_sglang)
        if not settings.enabled:
            return
        STATE.settings = settings
        PATCHER.install(allow_unsupported=settings.allow_unsupported_sglang)
    except PatchError as exc:
        # SystemExit passes SGLang's plugin loader, which logs and swallows ordinary exceptions.
        raise SystemExit(f"ghostserve: error: {exc}") from None
