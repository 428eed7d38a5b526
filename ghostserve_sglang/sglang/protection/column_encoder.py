"""The encode step of the capture path: the columns a rank received from the exchange, straight into
the records its host shard keeps, in one pass.

Input ``[ranks, n, layers, column]`` (entry j came from rank j), output ``[n, layers * parity_shards *
column]``: per slot, per layer, ``parity_shards`` parity chunks of the column. Built once per rank, with
the code's coefficients already on the device. On a GPU it is one Triton launch per step (the same
kernel runs on CPU tensors under ``TRITON_INTERPRET=1``, which is how it is tested); on a CPU, xor is
one XOR reduction over 8-byte words and rs goes through the codec's fastest CPU backend. Every path
gives the bytes of ``codec.encode`` on the columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...codec import new_code
from ...codec.backends.triton_gf import gf_mul_add
from ...codec.gf256 import POLYNOMIAL


@triton.jit
def _encode_records_kernel(src_ptr, out_ptr, coef_ptr, rows, column, ranks, parity_shards,
                           REDUCE: tl.constexpr, ALL_ONES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one slot-layer
    shard = tl.program_id(1)
    offsets = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < column
    rows = tl.cast(rows, tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for j in range(ranks):
        x = tl.load(src_ptr + (j * rows + row) * column + offsets, mask=mask, other=0).to(tl.int32)
        if ALL_ONES:
            acc ^= x
        else:
            acc = gf_mul_add(acc, x, tl.load(coef_ptr + shard * ranks + j), REDUCE)
    tl.store(out_ptr + (row * parity_shards + shard) * column + offsets, acc.to(tl.uint8), mask=mask)


class ColumnEncoder:
    """Encodes received columns into host records for one geometry; ``use_triton`` None picks Triton
    for tensors on a GPU."""

    def __init__(self, code: str, ranks: int, parity_shards: int, device: torch.device,
                 use_triton: bool | None = None) -> None:
        self.code = new_code(code, ranks, parity_shards)
        self.ranks, self.parity_shards = ranks, parity_shards
        self.use_triton = device.type == "cuda" if use_triton is None else use_triton
        rows = getattr(self.code, "parity_rows", [[1] * ranks])
        self.all_ones = all(c == 1 for row in rows for c in row)
        # Parity is the XOR of the columns (xor; rs with one parity shard): an exchange may reduce.
        self.is_xor = self.all_ones and parity_shards == 1 and code != "replicate"
        self.coefficients = torch.tensor(rows, dtype=torch.int32, device=device)

    def encode(self, received: torch.Tensor) -> torch.Tensor:
        """``[n, layers * parity_shards * column]`` records of ``received`` (``[ranks, n, layers,
        column]``, contiguous uint8)."""
        ranks, n, layers, column = received.shape
        if self.code.code == "replicate":  # one rank's own rows, nothing exchanged
            return received.view(n, layers * column)
        record = layers * self.parity_shards * column
        if self.use_triton:
            return self._encode_triton(received, record)
        if self.code.code == "xor" and column % 8 == 0:
            words = received.view(torch.int64)
            out = words[0].clone()
            for j in range(1, ranks):
                out.bitwise_xor_(words[j])
            return out.view(torch.uint8).view(n, record)
        parity = self.code.encode(list(received.unbind(0)))  # parity_shards x [n, layers, column]
        return torch.stack(parity, dim=2).view(n, record)

    def _encode_triton(self, received: torch.Tensor, record: int) -> torch.Tensor:
        ranks, n, layers, column = received.shape
        out = torch.empty((n, record), dtype=torch.uint8, device=received.device)
        if n:
            block = min(1024, triton.next_power_of_2(column))
            grid = (n * layers, self.parity_shards, triton.cdiv(column, block))
            _encode_records_kernel[grid](received, out, self.coefficients, n * layers, column, ranks,
                                         self.parity_shards, REDUCE=POLYNOMIAL & 0xFF,
                                         ALL_ONES=self.all_ones, BLOCK=block)
        return out
