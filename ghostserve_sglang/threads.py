"""GhostServe's background threads, named as the operating system sees them too, so that ``top -H``,
``ps -L`` and profilers tell them apart from the SGLang process they run in (Python before 3.14 leaves
every thread with its process's name): a thread ``ghostserve-drain`` shows as ``gs-drain``.

May import: nothing else in the package.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

_PR_SET_NAME = 15
_OS_NAME_BYTES = 15  # Linux keeps this many
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def os_name(name: str) -> str:
    return ("gs-" + name.removeprefix("ghostserve-"))[:_OS_NAME_BYTES]


def daemon(target, name: str, args: tuple = ()) -> threading.Thread:
    """A daemon thread (not started) named ``name`` that runs ``target(*args)``."""

    def run() -> None:
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(os_name(name).encode()), 0, 0, 0)
        target(*args)

    return threading.Thread(target=run, name=name, daemon=True)
