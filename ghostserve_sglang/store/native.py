"""The store's native part (``records.c``): the drain's batch write and CRC-32C, compiled on first use
with the machine's C compiler and loaded with ctypes, which releases the GIL for the length of each
call.

The shared object is cached in ``native/`` under ``$GHOSTSERVE_CACHE_DIR`` (default
``~/.cache/ghostserve-sglang``), named by a hash of the source, so it is built once per machine and
version. Without a C compiler the store falls back to Python: records are written one step at a time
and CRC-32C is computed with table look-ups vectorised over torch tensors (tens of MB/s, against GB/s
natively; logged once). Both ways give the same bytes and the same checksums.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import structlog
import torch

log = structlog.get_logger("ghostserve.store")

SOURCE = Path(__file__).with_name("records.c")
CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected
_MASK = 0xFFFFFFFF


def _cache_dir() -> Path:
    root = os.environ.get("GHOSTSERVE_CACHE_DIR", Path.home() / ".cache" / "ghostserve-sglang")
    return Path(root) / "native"


def _build(source: Path, target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or $CC) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        built = Path(work) / target.name
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-pthread", "-o", str(built), str(source)],
                       check=True, capture_output=True, text=True)
        os.replace(built, target)  # atomic: concurrent ranks never load a half-written file


def compiled(source: Path, fallback: str) -> ctypes.CDLL | None:
    """The C file ``source`` built (once per machine and version of it) and loaded; None when it cannot
    be, after a warning that says what runs instead (``fallback``)."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{digest}.so"
    try:
        if not target.exists():
            _build(source, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning(f"{fallback}: its C part could not be built or loaded",
                    error=str(detail).strip().splitlines()[-1:] or repr(exc))
        return None


@functools.cache
def library() -> ctypes.CDLL | None:
    """``records.c`` loaded, its functions typed; None when it cannot be built or loaded here."""
    lib = compiled(SOURCE, "the store writes records and computes CRC-32C in Python (slower, holds the GIL)")
    if lib is None:
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ghost_write_records.argtypes = [ptr, ptr, i64, ptr, ptr, ptr, i64, i64, ctypes.c_int,
                                        ctypes.POINTER(i64)]
    lib.ghost_write_records.restype = i64
    lib.ghost_record_crcs.argtypes = [ptr, ptr, ptr, i64, i64, ptr]
    lib.ghost_record_crcs.restype = None
    for name in ("ghost_crc32c", "ghost_crc32c_portable"):
        getattr(lib, name).argtypes = [ctypes.c_uint32, ptr, ctypes.c_uint64]
        getattr(lib, name).restype = ctypes.c_uint32
    lib.ghost_pool_size.argtypes = []
    lib.ghost_pool_size.restype = ctypes.c_int
    lib.ghost_crc32c_hardware.argtypes = [ctypes.c_int]
    lib.ghost_crc32c_hardware.restype = ctypes.c_int
    return lib


def crc32c(data: bytes | bytearray | memoryview | torch.Tensor, seed: int = 0) -> int:
    """CRC-32C of ``data`` (bytes, or a CPU tensor's bytes), continuing from ``seed`` as
    ``zlib.crc32`` does; natively where built, else in Python."""
    lib = library()
    if lib is None:
        return crc32c_python(data, seed)
    if isinstance(data, torch.Tensor):
        flat = data.contiguous().reshape(-1).view(torch.uint8)
        return lib.ghost_crc32c(seed, flat.data_ptr(), flat.numel())
    data = bytes(data)
    return lib.ghost_crc32c(seed, data, len(data))


def batch_writer():
    """``write(table, slot_words, slots, steps, slot_ids, rows, n, record_bytes, threads)`` on tensors'
    addresses, returning (records stored, records naming a slot out of range), or None when the C part
    cannot be built here. See ``ghost_write_records`` in records.c for what it guarantees."""
    lib = library()
    if lib is None:
        return None

    def write(table: int, slot_words: int, slots: int, steps: int, slot_ids: int, rows: int, n: int,
              record_bytes: int, threads: int) -> tuple[int, int]:
        refused = ctypes.c_int64()
        stored = lib.ghost_write_records(table, slot_words, slots, steps, slot_ids, rows, n, record_bytes,
                                         threads, ctypes.byref(refused))
        if stored < 0:
            raise MemoryError(f"no memory for the bookkeeping of a batch of {n} records")
        return stored, refused.value

    return write


def record_crcs(steps: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """CRC-32C of each record: (step int64 LE, slot int64 LE, the row's bytes), as int64 [n]."""
    steps = steps.to(torch.int64).contiguous()
    slots = slots.to(torch.int64).contiguous()
    rows = rows.contiguous()
    lib = library()
    if lib is None:
        return record_crcs_python(steps, slots, rows)
    out = torch.empty(len(rows), dtype=torch.int64)
    lib.ghost_record_crcs(steps.data_ptr(), slots.data_ptr(), rows.data_ptr(), len(rows), rows.shape[1],
                          out.data_ptr())
    return out


# -- the Python fallback: CRC-32C over torch tensors ------------------------------------------------
# CRC is linear over GF(2): the raw register (no pre/post inversion) of A followed by B, starting at 0,
# is that of A shifted over len(B) zero bytes, xor that of B. So every 8-byte word's CRC is computed at
# once (slicing-by-8 tables), then neighbours are combined pairwise in log2(words) rounds, each a shift
# by a power-of-two number of zero bytes (four 256-entry tables per power). Leading zero bytes leave a
# register of 0 unchanged, so rows are padded in front to a power-of-two number of words.


def _look(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return table.index_select(0, index.reshape(-1)).view(index.shape)


def _apply(zeros: torch.Tensor, crc: torch.Tensor) -> torch.Tensor:
    """Registers ``crc`` after the zero bytes ``zeros`` stands for."""
    return (_look(zeros[0], crc & 0xFF) ^ _look(zeros[1], (crc >> 8) & 0xFF)
            ^ _look(zeros[2], (crc >> 16) & 0xFF) ^ _look(zeros[3], crc >> 24))


@functools.cache
def _slicing_tables() -> torch.Tensor:
    """[8, 256]: row j is the register of byte b followed by j zero bytes, from 0."""
    first = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ CRC32C_POLY if crc & 1 else crc >> 1
        first.append(crc)
    rows = [torch.tensor(first, dtype=torch.int64)]
    for _ in range(7):
        rows.append((rows[-1] >> 8) ^ _look(rows[0], rows[-1] & 0xFF))
    return torch.stack(rows)


@functools.cache
def _zeros(log2_bytes: int) -> torch.Tensor:
    """[4, 256]: entry [k, b] is the register (b << 8k) after 2**log2_bytes zero bytes."""
    base = torch.arange(256, dtype=torch.int64)[None, :] << (8 * torch.arange(4, dtype=torch.int64)[:, None])
    if log2_bytes == 0:
        return _look(_slicing_tables()[0], base & 0xFF) ^ (base >> 8)
    half = _zeros(log2_bytes - 1)
    return _apply(half, _apply(half, base))


def _raw_rows(rows: torch.Tensor) -> torch.Tensor:
    """Raw registers, from 0, of each row of a uint8 [n, length] tensor."""
    n, length = rows.shape
    levels = (max(1, -(-length // 8)) - 1).bit_length()
    padded = torch.zeros(n, 8 << levels, dtype=torch.uint8)
    padded[:, padded.shape[1] - length:] = rows
    words = padded.view(n, 1 << levels, 8)
    slicing = _slicing_tables()
    crc = _look(slicing[7], words[..., 0].long())
    for k in range(1, 8):
        crc ^= _look(slicing[7 - k], words[..., k].long())
    for level in range(levels):
        pairs = crc.view(n, -1, 2)
        crc = _apply(_zeros(3 + level), pairs[..., 0]) ^ pairs[..., 1]
    return crc[:, 0]


def crc32c_rows_python(seeds: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """CRC-32C of each row of a uint8 [n, length] CPU tensor, continuing from ``seeds`` (int64 [n])."""
    rows = rows.reshape(len(rows), -1)
    length = rows.shape[1]
    start = seeds.to(torch.int64) ^ _MASK
    for bit in range(length.bit_length()):
        if length >> bit & 1:
            start = _apply(_zeros(bit), start)
    if length == 0:
        return seeds.to(torch.int64).clone()
    per_chunk = max(1, (4 << 20) // length)  # bounds the int64 temporaries to a few tens of MiB
    raw = torch.cat([_raw_rows(rows[i : i + per_chunk]) for i in range(0, len(rows), per_chunk)])
    return start ^ raw ^ _MASK


def crc32c_python(data: bytes | bytearray | memoryview | torch.Tensor, seed: int = 0) -> int:
    """``crc32c`` without the C part."""
    if isinstance(data, torch.Tensor):
        row = data.contiguous().reshape(-1).view(torch.uint8).reshape(1, -1)
    else:
        row = torch.tensor(list(memoryview(data).cast("B")), dtype=torch.uint8).reshape(1, -1)
    return int(crc32c_rows_python(torch.tensor([seed]), row)[0])


def record_crcs_python(steps: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``record_crcs`` without the C part."""
    shifts = 8 * torch.arange(8, dtype=torch.int64)
    keys = torch.cat([(values.to(torch.int64)[:, None] >> shifts) & 0xFF for values in (steps, slots)], dim=1)
    seeds = crc32c_rows_python(torch.zeros(len(rows), dtype=torch.int64), keys.to(torch.uint8))
    return crc32c_rows_python(seeds, rows.reshape(len(rows), -1))
