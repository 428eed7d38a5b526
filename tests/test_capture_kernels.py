"""The capture path's fused kernels (Triton, interpreted on CPU) and its CPU path (the C gather) give the
parity bytes of the unfused path: a torch gather of the rows, a column cut, ``codec.encode`` on the
columns, the parity chunks stacked per slot and layer."""

from __future__ import annotations

import types

import pytest
import torch

from ghostserve_sglang.codec import new_code
from ghostserve_sglang.sglang.protection import capture_native
from ghostserve_sglang.sglang.protection.column_encoder import ColumnEncoder
from ghostserve_sglang.sglang.protection.kv import KVView, cut_columns

GIB = 1 << 30
GEOMETRIES = [("xor", 3, 1), ("rs", 4, 2), ("rs", 2, 1)]


def random_pool(slots: int, heads: int, head_dim: int, layers: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    width = head_dim * dtype.itemsize

    def buffer():
        return torch.randint(0, 256, (slots + 1, heads, width), dtype=torch.uint8, generator=generator)

    return types.SimpleNamespace(k_buffer=[buffer().view(dtype) for _ in range(layers)],
                                 v_buffer=[buffer().view(dtype) for _ in range(layers)])


def page_slots(page_size: int, pages: list[int], last_page_tokens: int) -> torch.Tensor:
    """The slots a paged allocator's requests write: whole pages, the last one in part."""
    runs = [torch.arange(p * page_size, (p + 1) * page_size) for p in pages[:-1]]
    runs.append(torch.arange(pages[-1] * page_size, pages[-1] * page_size + last_page_tokens))
    return torch.cat(runs)


def unfused_records(views: list[KVView], slots: torch.Tensor, code: str, parity_shards: int) -> list:
    """Every rank's records by the unfused path: rows gathered by torch, cut, exchanged, encoded."""
    ranks = len(views)
    column = -(-views[0].slot_layer_bytes // ranks)
    sends = [cut_columns(v.gather_rows_torch(slots), ranks, column) for v in views]
    codec = new_code(code, ranks, parity_shards, backend="torch")
    records = []
    for j in range(ranks):
        received = [sends[i][j] for i in range(ranks)]
        parity = torch.stack(codec.encode(received), dim=2)  # [n, layers, m, column]
        records.append(parity.reshape(len(slots), -1))
    return records


def fused_records(views: list[KVView], slots: torch.Tensor, code: str, parity_shards: int,
                  use_triton: bool) -> list:
    ranks = len(views)
    column = -(-views[0].slot_layer_bytes // ranks)
    sends = [v.gather_columns(slots, ranks, column, use_triton=use_triton) for v in views]
    encoder = ColumnEncoder(code, ranks, parity_shards, torch.device("cpu"), use_triton=use_triton)
    return [encoder.encode(torch.stack([sends[i][j] for i in range(ranks)])) for j in range(ranks)]


@pytest.mark.parametrize("code,ranks,parity_shards", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "cpu"])
def test_fused_path_gives_the_unfused_parity_bytes(code, ranks, parity_shards, dtype, page_size,
                                                   use_triton):
    assert use_triton or capture_native.library() is not None  # the C gather, not torch against torch
    # 5 KV heads of 24 over 2-4 ranks: a slot-layer's bytes do not split evenly into columns.
    views = [KVView(random_pool(160, 5, 24, 3, dtype, seed=r)) for r in range(ranks)]
    slots = page_slots(page_size, [1, 9], 5) if page_size > 1 else torch.tensor([0, 1, 77, 160, 40])
    want = unfused_records(views, slots, code, parity_shards)
    got = fused_records(views, slots, code, parity_shards, use_triton)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_fused_gather_reads_slots_past_2gib_into_a_layer():
    # 8 heads of 128 bf16 values: 2 KiB per slot-layer half, so slot 2^20 + k starts 2^31 + 2k KiB in.
    # The buffers are left uninitialised: only the rows read here are written (and committed).
    slots_total, heads, head_dim = (1 << 20) + 64, 8, 128
    buffers = [[torch.empty((slots_total + 1, heads, head_dim), dtype=torch.bfloat16)] for _ in range(2)]
    pool = types.SimpleNamespace(k_buffer=buffers[0], v_buffer=buffers[1])
    view = KVView(pool)
    slots = torch.tensor([1, (1 << 20) - 1, 1 << 20, (1 << 20) + 17, slots_total])
    assert int(slots[-1]) * view.half_bytes > 2 * GIB
    generator = torch.Generator().manual_seed(3)
    for buffer in (buffers[0][0], buffers[1][0]):
        raw = buffer.view(torch.uint8)
        raw[slots] = torch.randint(0, 256, raw[slots].shape, dtype=torch.uint8, generator=generator)
    for ranks in (1, 3):
        column = -(-view.slot_layer_bytes // ranks)
        want = cut_columns(view.gather_rows_torch(slots), ranks, column)
        for use_triton in (True, False):
            assert torch.equal(view.gather_columns(slots, ranks, column, use_triton=use_triton), want)


@pytest.mark.parametrize("slot", [-1, 9])
def test_the_c_gather_refuses_a_slot_outside_the_pool(slot):
    view = KVView(random_pool(8, 5, 24, 3, torch.bfloat16, seed=0))  # slots 0..8
    with pytest.raises(IndexError, match=f"slot {slot} is outside the KV pool's slots 0..8"):
        view.gather_columns(torch.tensor([1, slot]), 2, 120, use_triton=False)


@pytest.mark.parametrize("code,ranks,parity_shards", [*GEOMETRIES, ("replicate", 1, 1)])
@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "cpu"])
def test_no_slots_give_no_records(code, ranks, parity_shards, use_triton):
    """A scrub or rebuild of an empty set (no live slots) encodes nothing, in the record width."""
    view = KVView(random_pool(8, 5, 24, 3, torch.bfloat16, seed=0))
    column = -(-view.slot_layer_bytes // ranks)
    columns = view.gather_columns(torch.tensor([], dtype=torch.int64), ranks, column, use_triton=use_triton)
    records = ColumnEncoder(code, ranks, parity_shards, torch.device("cpu"), use_triton=use_triton).encode(
        columns)
    width = 3 * (view.slot_layer_bytes if code == "replicate" else parity_shards * column)
    assert columns.shape == (ranks, 0, 3, column) and records.shape == (0, width)
