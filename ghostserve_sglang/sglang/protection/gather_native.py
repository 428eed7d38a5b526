"""The capture's gather on CPU (``gather.c``), compiled on first use like the store's C part and
loaded with ctypes; None where it cannot be built, and the gather then runs in torch."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from ...store.native import compiled

SOURCE = Path(__file__).with_name("gather.c")


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = compiled(SOURCE, "the capture gathers KV rows with torch, layer by layer (slower)")
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.ghost_gather_columns.argtypes = [ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, ptr]
        lib.ghost_gather_columns.restype = i64
    return lib


def address_table(buffers: list[torch.Tensor]) -> ctypes.Array:
    """The buffers' addresses as a C array of int64."""
    return (ctypes.c_int64 * len(buffers))(*(b.data_ptr() for b in buffers))
