"""One rank's Protector in this process on SGLang's real KV pool and allocator (TP=1), for tests on
CPU and device checks on a GPU."""

from __future__ import annotations

import signal
import types
import uuid

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from ghostserve_sglang.settings import Settings
from ghostserve_sglang.sglang.protector import Protector


def make_protector(device: str = "cpu", slots: int = 256, heads: int = 8, head_dim: int = 64,
                   layers: int = 4, dtype: torch.dtype = torch.float32, **settings: str) -> Protector:
    pool = MHATokenToKVPool(slots, page_size=1, dtype=dtype, head_num=heads, head_dim=head_dim,
                            layer_num=layers, device=device, enable_memory_saver=False,
                            enable_alt_stream=False)
    allocator = TokenToKVPoolAllocator(slots, dtype=dtype, device=device, kvcache=pool, need_sort=False)
    runner = types.SimpleNamespace(token_to_kv_pool=pool, token_to_kv_pool_allocator=allocator)
    group = types.SimpleNamespace(rank_in_group=0, world_size=1, ranks=[0])
    values = {"code": "replicate", "strict": "1", "enable_fault_injection": "1", **settings}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    protector = Protector(Settings.from_values(values), runner, f"rig-{uuid.uuid4().hex[:12]}", group)
    for signum, handler in handlers.items():  # the rig's process keeps its own signal handling
        signal.signal(signum, handler)
    return protector


def stop(protector: Protector) -> None:
    protector.close()
    protector.unlink_files()


def fill(protector: Protector, slots: torch.Tensor, seed: int) -> None:
    """Seeded bytes in every layer's K and V rows of ``slots``."""
    generator = torch.Generator(device=slots.device).manual_seed(seed)
    for buffer in (*protector.kv.pool.k_buffer, *protector.kv.pool.v_buffer):
        raw = buffer.view(torch.uint8)
        raw[slots] = torch.randint(0, 256, raw[slots].shape, dtype=torch.uint8, device=slots.device,
                                   generator=generator)


def written(protector: Protector, count: int, seed: int) -> torch.Tensor:
    """Allocate ``count`` slots, fill them, and capture them."""
    slots = protector.allocator.alloc(count)
    fill(protector, slots, seed)
    protector.record_write(slots)
    return slots
