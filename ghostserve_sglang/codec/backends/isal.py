"""CPU fast path through Intel ISA-L (Debian's ``libisal2``), loaded with ctypes.

``ec_encode_data`` does the GF(2^8) matrix product with SIMD table look-ups; ``xor_gen`` is used for
all-ones single-row products (the xor code) when every buffer is 32-byte aligned, as it requires.
Both calls release the GIL, so large products are split across threads by column.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from ..gf256 import Matrix

_LIBRARY_NAMES = ("libisal.so.2", ctypes.util.find_library("isal"))
# Below these totals of input bytes one thread beats splitting the columns across the pool (measured:
# the GF product is compute-bound and gains early; xor_gen is memory-bound and gains only when large).
_SPLIT_GF_BYTES = 4 << 20
_SPLIT_XOR_BYTES = 16 << 20


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The ISA-L shared library, or None when it is not installed."""
    for name in _LIBRARY_NAMES:
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.ec_init_tables.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p]
        lib.ec_init_tables.restype = None
        ptrs = ctypes.POINTER(ctypes.c_void_p)
        lib.ec_encode_data.argtypes = [ctypes.c_int] * 3 + [ctypes.c_char_p, ptrs, ptrs]
        lib.ec_encode_data.restype = None
        lib.xor_gen.argtypes = [ctypes.c_int, ctypes.c_int, ptrs]
        lib.xor_gen.restype = ctypes.c_int
        lib.crc32_gzip_refl.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint64]
        lib.crc32_gzip_refl.restype = ctypes.c_uint32
        return lib
    return None


@functools.lru_cache(maxsize=256)
def _tables(matrix: tuple[tuple[int, ...], ...]) -> ctypes.Array:
    rows, cols = len(matrix), len(matrix[0])
    flat = bytes(c for row in matrix for c in row)
    tables = ctypes.create_string_buffer(32 * rows * cols)
    load_library().ec_init_tables(cols, rows, flat, tables)
    return tables


def _pointers(tensors: list[torch.Tensor], offset: int) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() + offset for t in tensors))


class IsalBackend:
    name = "isal"

    def __init__(self) -> None:
        self._lib = load_library()
        if self._lib is None:
            raise OSError("libisal.so.2 not found (Debian: apt-get install libisal2)")
        self._threads = max(1, min(os.cpu_count() or 1, torch.get_num_threads()))
        self._pool = ThreadPoolExecutor(self._threads) if self._threads > 1 else None

    def apply(self, matrix: Matrix, sources: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """outputs[i] = XOR over j of matrix[i][j] * sources[j] in GF(2^8), on 1-D CPU uint8 tensors."""
        length = outputs[0].numel()
        if length == 0:
            return
        key = tuple(tuple(row) for row in matrix)
        use_xor = len(sources) >= 2 and key == ((1,) * len(sources),) and all(
            t.data_ptr() % 32 == 0 for t in (*sources, *outputs)
        )
        threshold = _SPLIT_XOR_BYTES if use_xor else _SPLIT_GF_BYTES
        split = self._pool is not None and length * len(sources) >= threshold
        parts = self._threads if split else 1
        step = (length // parts + 63) // 64 * 64
        spans = [(start, min(step, length - start)) for start in range(0, length, step)]

        def run(span: tuple[int, int]) -> None:
            start, size = span
            if use_xor:
                status = self._lib.xor_gen(len(sources) + 1, size, _pointers([*sources, *outputs], start))
                if status != 0:
                    raise RuntimeError(f"ISA-L xor_gen failed with status {status}")
            else:
                self._lib.ec_encode_data(
                    size, len(sources), len(outputs), _tables(key),
                    _pointers(sources, start), _pointers(outputs, start),
                )

        helpers = [self._pool.submit(run, span) for span in spans[1:]]
        run(spans[0])
        for helper in helpers:
            helper.result()
