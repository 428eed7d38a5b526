"""Triton kernels for the GF(2^8) matrix product: the GPU fast path of encode and rebuild.

One program computes one output row over one block of bytes. Products use shift-and-add
multiplication, so the kernel needs no look-up tables. The same kernels run on CPU tensors under
``TRITON_INTERPRET=1`` (slowly), which is how they are tested on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gf256 import POLYNOMIAL, Matrix

_BLOCK = 1024


@triton.jit
def gf_mul_add(acc, x, coef, REDUCE: tl.constexpr):
    """``acc ^ coef * x`` in GF(2^8), elementwise on int32 lanes holding bytes."""
    for bit in tl.static_range(8):
        acc ^= x * ((coef >> bit) & 1)
        x = ((x << 1) ^ ((x >> 7) * REDUCE)) & 0xFF
    return acc


@triton.jit
def _gf_apply_kernel(
    src_ptr, src_stride, dst_ptr, dst_stride, coef_ptr, length, n_sources,
    REDUCE: tl.constexpr, ALL_ONES: tl.constexpr, BLOCK: tl.constexpr,
):
    # Row offsets in 64 bits: a row can start more than 2^31 bytes into its allocation.
    row = tl.program_id(1).to(tl.int64)
    src_stride = tl.cast(src_stride, tl.int64)
    dst_stride = tl.cast(dst_stride, tl.int64)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < length
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for j in range(n_sources):
        x = tl.load(src_ptr + j * src_stride + offsets, mask=mask, other=0).to(tl.int32)
        if ALL_ONES:
            acc ^= x
        else:
            acc = gf_mul_add(acc, x, tl.load(coef_ptr + row * n_sources + j), REDUCE)
    tl.store(dst_ptr + row * dst_stride + offsets, acc.to(tl.uint8), mask=mask)


def _rows(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, int, bool]:
    """The rows as one strided 2-D view (with its row stride in bytes) when they already sit at one
    stride in one allocation; otherwise a stacked copy. The flag says whether a copy was made."""
    first, length = tensors[0], tensors[0].numel()
    stride = tensors[1].data_ptr() - first.data_ptr() if len(tensors) > 1 else length
    storage = first.untyped_storage().data_ptr()
    in_place = stride >= length and all(
        t.untyped_storage().data_ptr() == storage and t.data_ptr() == first.data_ptr() + i * stride
        for i, t in enumerate(tensors)
    )
    if in_place:
        view = first.as_strided((len(tensors), length), (stride, 1), first.storage_offset())
        return view, stride, False
    return torch.stack(tensors), length, True


class TritonBackend:
    name = "triton"

    def apply(self, matrix: Matrix, sources: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """outputs[i] = XOR over j of matrix[i][j] * sources[j] in GF(2^8), on 1-D uint8 tensors."""
        length = outputs[0].numel()
        if length == 0:
            return
        device = outputs[0].device
        src, src_stride, _ = _rows(sources)
        dst, dst_stride, copied = _rows(outputs)
        all_ones = all(c == 1 for row in matrix for c in row)
        coefs = torch.tensor(matrix, dtype=torch.int32, device=device)
        grid = (triton.cdiv(length, _BLOCK), len(outputs))
        _gf_apply_kernel[grid](
            src, src_stride, dst, dst_stride, coefs, length, len(sources),
            REDUCE=POLYNOMIAL & 0xFF, ALL_ONES=all_ones, BLOCK=_BLOCK,
        )
        if copied:
            for out, row in zip(outputs, dst):
                out.copy_(row)
