"""Triton gather of the written slots' K and V rows from every layer, already cut into the columns the
exchange sends: the GPU capture path (one launch per step, no Python per layer, no copy after it).

Layers are addressed through a table of their buffers' addresses, so the pool's per-layer tensors are
read in place. Each slot-layer's K bytes then V bytes (``2 * half`` bytes) are cut into ``ranks``
columns of ``column`` bytes, zero-padded at the end; the output is ``[ranks, n, layers, column]``,
entry j the columns rank j encodes (with ``ranks == 1`` and ``column == 2 * half``: the plain rows).
Runs on CPU tensors under ``TRITON_INTERPRET=1``, which is how it is tested without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_kernel(k_table, v_table, slots_ptr, out_ptr, n, half, layers, ranks, column,
                   BLOCK: tl.constexpr):
    i = tl.program_id(0)
    layer = tl.program_id(1)
    # Offsets in 64 bits: a slot's row can start more than 2^31 bytes into its layer.
    slot = tl.load(slots_ptr + i).to(tl.int64)
    k_row = tl.load(k_table + layer).to(tl.pointer_type(tl.uint8)) + slot * half
    v_row = tl.load(v_table + layer).to(tl.pointer_type(tl.uint8)) + slot * half
    row_stride = tl.cast(n, tl.int64) * layers * column  # between two ranks' entries of the output
    dst = out_ptr + (i.to(tl.int64) * layers + layer) * column
    for j in range(ranks):
        for start in range(0, column, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            in_column = offsets < column
            byte = j * column + offsets  # within the slot-layer's K bytes then V bytes
            k = tl.load(k_row + byte, mask=in_column & (byte < half), other=0)
            v = tl.load(v_row + byte - half, mask=in_column & (byte >= half) & (byte < 2 * half), other=0)
            tl.store(dst + j * row_stride + offsets, k | v, mask=in_column)


def address_table(buffers: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device=buffers[0].device)


def gather(k_table: torch.Tensor, v_table: torch.Tensor, slots: torch.Tensor, half_bytes: int,
           layers: int, ranks: int = 1, column: int | None = None) -> torch.Tensor:
    """``[ranks, len(slots), layers, column]`` uint8: each slot's K bytes then V bytes per layer, cut
    into ``ranks`` columns of ``column`` bytes (default: one column of the whole row)."""
    column = column or 2 * half_bytes
    n = len(slots)
    out = torch.empty((ranks, n, layers, column), dtype=torch.uint8, device=slots.device)
    if n:
        block = min(1024, triton.next_power_of_2(column))
        _gather_kernel[(n, layers)](k_table, v_table, slots, out, n, half_bytes, layers, ranks, column,
                                    BLOCK=block)
    return out
