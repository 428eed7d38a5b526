"""Triton gather of the written slots' K and V rows from every layer into one staging tensor: the GPU
capture path (one launch per step, no Python per layer). Layers are addressed through a table of their
buffers' addresses, so the pool's per-layer tensors are read in place. Runs on CPU tensors under
``TRITON_INTERPRET=1``, which is how it is tested without a GPU."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 256


@triton.jit
def _gather_kernel(k_table, v_table, slots_ptr, out_ptr, half, layers, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    layer = tl.program_id(1)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    k_base = tl.load(k_table + layer).to(tl.pointer_type(tl.uint8))
    v_base = tl.load(v_table + layer).to(tl.pointer_type(tl.uint8))
    dst = out_ptr + (i.to(tl.int64) * layers + layer) * 2 * half
    for start in range(0, half, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < half
        tl.store(dst + offsets, tl.load(k_base + slot * half + offsets, mask=mask), mask=mask)
        tl.store(dst + half + offsets, tl.load(v_base + slot * half + offsets, mask=mask), mask=mask)


def address_table(buffers: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device=buffers[0].device)


def gather(k_table: torch.Tensor, v_table: torch.Tensor, slots: torch.Tensor, half_bytes: int,
           layers: int) -> torch.Tensor:
    """``[len(slots), layers, 2 * half_bytes]`` uint8: each slot's K bytes then V bytes per layer."""
    out = torch.empty((len(slots), layers, 2 * half_bytes), dtype=torch.uint8, device=slots.device)
    if len(slots):
        _gather_kernel[(len(slots), layers)](k_table, v_table, slots, out, half_bytes, layers, BLOCK=_BLOCK)
    return out
