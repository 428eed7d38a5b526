"""The capture path's native part on CPU (``capture.c``: the gather, the same-host exchange's mailbox
signalling), compiled on first use like the store's C part and loaded with ctypes; None where it cannot
be built, and the gather then runs in torch and the exchange over gloo."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from ...store.native import compiled

SOURCE = Path(__file__).with_name("capture.c")


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = compiled(SOURCE, "the capture gathers KV rows with torch, layer by layer, and exchanges "
                           "columns over gloo (slower)")
    if lib is not None:
        i64, u32, ptr = ctypes.c_int64, ctypes.c_uint32, ctypes.c_void_p
        lib.ghost_gather_columns.argtypes = [ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, ptr]
        lib.ghost_gather_columns.restype = i64
        lib.ghost_mailbox_reset.argtypes = [ptr, ptr, i64]
        lib.ghost_mailbox_reset.restype = None
        lib.ghost_mailbox_post.argtypes = [ptr, u32]
        lib.ghost_mailbox_post.restype = None
        lib.ghost_mailbox_wait.argtypes = [ptr, ptr, i64, u32, i64]
        lib.ghost_mailbox_wait.restype = ctypes.c_int
        lib.ghost_mailbox_send.argtypes = [ptr, ptr, i64, i64, i64, ptr, u32]
        lib.ghost_mailbox_send.restype = None
        lib.ghost_mailbox_take.argtypes = [ptr, ptr, i64, ctypes.c_int]
        lib.ghost_mailbox_take.restype = None
    return lib


def address_table(buffers: list[torch.Tensor]) -> ctypes.Array:
    """The buffers' addresses as a C array of int64."""
    return (ctypes.c_int64 * len(buffers))(*(b.data_ptr() for b in buffers))
