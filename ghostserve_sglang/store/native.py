"""The drain's batch write (``records.c``), compiled on first use with the machine's C compiler and
loaded with ctypes, which releases the GIL for the length of each call.

The shared object is cached in ``native/`` under ``$GHOSTSERVE_CACHE_DIR`` (default
``~/.cache/ghostserve-sglang``), named by a hash of the source, so it is built once per machine and
version. Without a C compiler the store falls back to writing records from Python, one at a time
(logged once); both ways give the same bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import structlog

from ..codec.backends.isal import load_library

log = structlog.get_logger("ghostserve.store")

SOURCE = Path(__file__).with_name("records.c")


def _cache_dir() -> Path:
    root = os.environ.get("GHOSTSERVE_CACHE_DIR", Path.home() / ".cache" / "ghostserve-sglang")
    return Path(root) / "native"


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or $CC) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        built = Path(work) / target.name
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(built), str(SOURCE)],
                       check=True, capture_output=True, text=True)
        os.replace(built, target)  # atomic: concurrent ranks never load a half-written file


@functools.cache
def batch_writer():
    """``write(table, slot_words, slots, meta, rows, n, record_bytes)`` on tensors' addresses (returns
    how many entries named a slot out of range), or None when the C part cannot be built here."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    target = _cache_dir() / f"records-{digest}.so"
    try:
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
        isal = load_library()
        if isal is not None:
            crc, is_isal = ctypes.cast(isal.crc32_gzip_refl, ctypes.c_void_p).value, 1
        else:
            zlib = ctypes.CDLL(ctypes.util.find_library("z") or "libz.so.1")
            crc, is_isal = ctypes.cast(zlib.crc32, ctypes.c_void_p).value, 0
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("the drain writes records from Python (slower, holds the GIL): its C part could not "
                    "be built or loaded", error=str(detail).strip().splitlines()[-1:] or repr(exc))
        return None
    function = lib.ghost_write_records
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    function.restype = ctypes.c_int64

    def write(table: int, slot_words: int, slots: int, meta: int, rows: int, n: int,
              record_bytes: int) -> int:
        return function(table, slot_words, slots, meta, rows, n, record_bytes, crc, is_isal)

    return write
