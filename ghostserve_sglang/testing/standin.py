"""Stand-ins for the SGLang objects a ``Protector`` reads, for machines without SGLang (the device
checks run on a GPU image that has torch and Triton but no SGLang).

They hold plain tensors with the attributes GhostServe uses of SGLang's ``MHATokenToKVPool`` and
``TokenToKVPoolAllocator`` (page size 1): per-layer K and V buffers of ``size + 1`` rows (row 0 is the
padding slot), and an allocator that hands out slots from ``free_pages`` in order and appends freed
ones. ``EmulatedCollectives`` stands in for the TP group when N ranks are emulated on one device.
"""

from __future__ import annotations

import types

import torch


class StandInPool:
    def __init__(self, size: int, heads: int, head_dim: int, layers: int, dtype: torch.dtype,
                 device: str | torch.device) -> None:
        self.size, self.page_size, self.dtype = size, 1, dtype
        self.head_num, self.head_dim, self.layer_num = heads, head_dim, layers
        self.device = torch.device(device)
        shape = (size + 1, heads, head_dim)
        self.k_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]


class StandInAllocator:
    def __init__(self, pool: StandInPool) -> None:
        self.page_size = 1
        self.release_pages = None
        self.free_pages = torch.arange(1, pool.size + 1, dtype=torch.int64, device=pool.device)

    def alloc(self, count: int) -> torch.Tensor | None:
        if count > len(self.free_pages):
            return None
        taken, self.free_pages = self.free_pages[:count], self.free_pages[count:]
        return taken

    def free(self, slots: torch.Tensor) -> None:
        self.free_pages = torch.cat([self.free_pages, slots.to(self.free_pages.device, torch.int64)])


def model_runner(size: int, heads: int, head_dim: int, layers: int, dtype: torch.dtype,
                 device: str | torch.device) -> types.SimpleNamespace:
    """What a Protector reads of SGLang's model runner: the pool and its allocator."""
    pool = StandInPool(size, heads, head_dim, layers, dtype, device)
    return types.SimpleNamespace(token_to_kv_pool=pool, token_to_kv_pool_allocator=StandInAllocator(pool))


class EmulatedCollectives:
    """The TP group of one rank whose ``ranks - 1`` peers are emulated: the column exchange moves the
    same bytes a real all-to-all receives (a device copy, where NCCL would copy over the links); control
    collectives see this rank alone."""

    transport = "emulated"
    wait_seconds = 0.0
    reduces_xor = False

    def __init__(self, ranks: int) -> None:
        self.ranks = ranks

    def post_early(self, send: torch.Tensor) -> None:
        return None

    def all_to_all(self, send: torch.Tensor, posted: None = None) -> torch.Tensor:
        return send.clone()

    def all_reduce(self, tensor: torch.Tensor, op) -> None:
        pass

    def gather_objects(self, value) -> list:
        return [value]
