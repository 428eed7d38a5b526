"""One rank's Protector in this process, on SGLang's real KV pool and allocator (``pool="sglang"``) or on
stand-ins for them (``pool="standin"``, where SGLang is not installed), for tests on CPU, device checks
and the checkpoint benchmark. With ``ranks`` above 1 the rank is rank 0 of a TP group whose peers are
emulated (``standin.EmulatedCollectives``)."""

from __future__ import annotations

import signal
import types
import uuid

import torch

from ..settings import Settings
from ..sglang.protection.protector import Protector
from . import standin


def sglang_runner(slots: int, heads: int, head_dim: int, layers: int, dtype: torch.dtype,
                  device: str) -> types.SimpleNamespace:
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    pool = MHATokenToKVPool(slots, page_size=1, dtype=dtype, head_num=heads, head_dim=head_dim,
                            layer_num=layers, device=device, enable_memory_saver=False,
                            enable_alt_stream=False)
    allocator = TokenToKVPoolAllocator(slots, dtype=dtype, device=device, kvcache=pool, need_sort=False)
    return types.SimpleNamespace(token_to_kv_pool=pool, token_to_kv_pool_allocator=allocator)


def make_protector(device: str = "cpu", slots: int = 256, heads: int = 8, head_dim: int = 64,
                   layers: int = 4, dtype: torch.dtype = torch.float32, pool: str = "sglang",
                   ranks: int = 1, **settings: str) -> Protector:
    make_runner = sglang_runner if pool == "sglang" else standin.model_runner
    runner = make_runner(slots, heads, head_dim, layers, dtype, device)
    group = types.SimpleNamespace(rank_in_group=0, world_size=ranks, ranks=list(range(ranks)))
    values = {"code": "replicate", "strict": "1", "enable_fault_injection": "1", **settings}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    collectives = standin.EmulatedCollectives(ranks) if ranks > 1 else None
    protector = Protector(Settings.from_values(values), runner, f"rig-{uuid.uuid4().hex[:12]}", group,
                          collectives=collectives)
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
