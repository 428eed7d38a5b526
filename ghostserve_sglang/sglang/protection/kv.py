"""Byte views of SGLang's KV pool: gather the K and V rows of given slots from every layer, and the
set of slots the allocator holds live."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...store.geometry import DTYPES
from . import capture_native

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class UnsupportedPool(ValueError):
    """A KV pool GhostServe does not protect; one line names what and what to do."""


_SCALE_BUFFERS = ("k_scale_buffer", "v_scale_buffer", "native_k_scale_buffer", "native_v_scale_buffer",
                  "dq_k_buffer", "dq_v_buffer")


def check_pool(pool) -> None:
    """Refuse any pool whose bytes are not exactly K and V rows ``[slots, heads, head_dim]`` per layer:
    GhostServe would protect the wrong bytes, or only part of them. fp8 KV passes (it is bytes)."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    fix = "run it with --ghost-code off, or without the option that selects this pool"
    if type(pool) is not MHATokenToKVPool:
        kind = ("MLA" if hasattr(pool, "kv_lora_rank") else
                "hybrid: sliding-window or linear attention" if hasattr(pool, "full_kv_pool") else "other")
        raise UnsupportedPool(f"the KV pool {type(pool).__name__} ({kind}) is not protected by GhostServe, "
                              f"which protects SGLang's MHATokenToKVPool; {fix}")
    k, v = pool.k_buffer[0], pool.v_buffer[0]
    if getattr(pool, "use_hnd", False) or getattr(pool, "kv_cache_layout", "nhd") != "nhd" or k.dim() != 3:
        raise UnsupportedPool(f"the KV pool's layout {getattr(pool, 'kv_cache_layout', '?')!r} "
                              f"(buffer shape {list(k.shape)}) is not protected by GhostServe, which needs "
                              "the NHD layout [slots, heads, head_dim]; unset SGLANG_USE_HND_KVCACHE")
    if k.shape != v.shape or k.dtype != v.dtype:
        raise UnsupportedPool(f"K {list(k.shape)} {k.dtype} and V {list(v.shape)} {v.dtype} differ (a model "
                              f"with another V head dim); GhostServe protects pools whose K and V rows "
                              f"match; {fix}")
    scaled = [name for name in _SCALE_BUFFERS if getattr(pool, name, None) is not None]
    if scaled:
        raise UnsupportedPool(f"the quantized KV pool keeps {', '.join(scaled)} beside K and V, which "
                              "GhostServe does not protect; use --kv-cache-dtype auto or fp8_e4m3")
    if getattr(pool, "post_capture_active", False):
        raise UnsupportedPool("the KV pool is resized after CUDA graph capture "
                              "(SGLANG_ENABLE_POST_CAPTURE_KV_SIZING); GhostServe needs a fixed pool")


def cut_columns(rows: torch.Tensor, ranks: int, column: int) -> torch.Tensor:
    """``rows`` (``[n, layers, width]``) cut into ``ranks`` columns of ``column`` bytes, zero-padded:
    ``[ranks, n, layers, column]``, entry j the columns rank j encodes."""
    n, layers, width = rows.shape
    if ranks == 1 and column == width:
        return rows.unsqueeze(0)
    padded = F.pad(rows, (0, ranks * column - width)) if ranks * column != width else rows
    return padded.view(n, layers, ranks, column).permute(2, 0, 1, 3).contiguous()


class KVView:
    """One rank's MHA KV pool seen as bytes: slot s in layer l is K bytes then V bytes."""

    def __init__(self, pool) -> None:
        self.pool = pool
        k0 = pool.k_buffer[0]
        if k0.dtype not in _DTYPE_NAMES:
            raise ValueError(f"KV dtype {k0.dtype} is not supported; supported: {', '.join(DTYPES)}")
        self.dtype_name = _DTYPE_NAMES[k0.dtype]
        self.layers = len(pool.k_buffer)
        self.slots = k0.shape[0]
        self.heads = k0.shape[1]
        self.head_dim = k0.shape[2]
        self.half_bytes = self.heads * self.head_dim * k0.element_size()

    @property
    def slot_layer_bytes(self) -> int:
        return 2 * self.half_bytes

    @property
    def slot_bytes(self) -> int:
        """K and V bytes of one slot over every layer."""
        return self.layers * self.slot_layer_bytes

    def _rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.pool.k_buffer[layer], self.pool.v_buffer[layer]
        return k.view(torch.uint8).view(self.slots, -1), v.view(torch.uint8).view(self.slots, -1)

    def gather(self, slots: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
        """[len(slots), layers, slot_layer_bytes] uint8 copy of the slots' K and V bytes."""
        return self.gather_columns(slots, 1, self.slot_layer_bytes, use_triton)[0]

    def gather_columns(self, slots: torch.Tensor, ranks: int, column: int,
                       use_triton: bool | None = None) -> torch.Tensor:
        """The slots' K and V bytes cut for the exchange: ``[ranks, len(slots), layers, column]`` uint8,
        entry j holding bytes ``[j * column, (j + 1) * column)`` of each slot-layer (zero past its end).
        By one Triton launch on GPU, by one call of ``capture.c`` on CPU (by torch where it cannot be
        built)."""
        slots = slots.to(self.pool.k_buffer[0].device, torch.int64)
        if use_triton if use_triton is not None else slots.is_cuda:
            return self._gather_triton(slots, ranks, column)
        native = capture_native.library() if slots.is_cpu else None
        if native is None:
            return cut_columns(self.gather_rows_torch(slots), ranks, column)
        slots = slots.contiguous()
        out = torch.empty((ranks, len(slots), self.layers, column), dtype=torch.uint8)
        k_table, v_table = self._tables(capture_native.address_table)
        bad = native.ghost_gather_columns(k_table, v_table, self.layers, slots.data_ptr(), len(slots),
                                          self.slots, self.half_bytes, ranks, column, out.data_ptr())
        if bad >= 0:
            raise IndexError(f"slot {int(slots[bad])} is outside the KV pool's slots 0..{self.slots - 1}")
        return out

    def gather_rows_torch(self, slots: torch.Tensor) -> torch.Tensor:
        """``[len(slots), layers, slot_layer_bytes]`` uint8 by torch indexing, layer by layer: where
        neither Triton nor the C gather runs, and the reference the tests compare them with."""
        slots = slots.to(self.pool.k_buffer[0].device, torch.int64)
        rows = torch.empty((len(slots), self.layers, self.slot_layer_bytes), dtype=torch.uint8,
                           device=slots.device)
        half = self.half_bytes
        for layer in range(self.layers):
            k, v = self._rows(layer)
            rows[:, layer, :half] = k.index_select(0, slots)
            rows[:, layer, half:] = v.index_select(0, slots)
        return rows

    def _tables(self, make):
        """The K and V buffers' address tables as ``make`` builds them from a list of buffers: built
        once, and again if the pool's buffers were reallocated."""
        buffers = (self.pool.k_buffer, self.pool.v_buffer)
        key = (make, *(b[0].data_ptr() for b in buffers))
        if getattr(self, "_tables_key", None) != key:
            self._address_tables = [make(b) for b in buffers]
            self._tables_key = key
        return self._address_tables

    def _gather_triton(self, slots: torch.Tensor, ranks: int, column: int) -> torch.Tensor:
        from . import gather_triton

        k_table, v_table = self._tables(gather_triton.address_table)
        return gather_triton.gather(k_table, v_table, slots, self.half_bytes, self.layers, ranks, column)

    def scatter(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Write ``rows`` (as returned by ``gather``) back into the pool at ``slots``."""
        slots = slots.to(self.pool.k_buffer[0].device, torch.int64)
        half = self.half_bytes
        for layer in range(self.layers):
            k, v = self._rows(layer)
            k[slots] = rows[:, layer, :half]
            v[slots] = rows[:, layer, half:]


def live_slots(allocator, total_slots: int) -> torch.Tensor:
    """Slots that hold KV someone may read: allocated and not yet freed. Slot 0 (SGLang's padding
    slot) never counts."""
    page = getattr(allocator, "page_size", 1)
    free_pages = [allocator.free_pages]
    for name in ("release_pages",):
        extra = getattr(allocator, name, None)
        if extra is not None:
            free_pages.append(extra)
    free_pages.extend(getattr(allocator, "staged_pages", None) or [])
    free = torch.cat([p.to("cpu", torch.int64) for p in free_pages])
    live = torch.ones(total_slots, dtype=torch.bool)
    live[:page] = False  # page 0 holds the padding slot
    if len(free):
        free_slots = (free[:, None] * page + torch.arange(page)).flatten()
        live[free_slots[free_slots < total_slots]] = False
    return torch.nonzero(live).flatten()
