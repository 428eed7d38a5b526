"""Device check for the Triton kernels at the sizes a real KV cache has (needs no SGLang):

1. the KV gather reads the same bytes as torch's index_select, on a Llama-8B-shaped pool of 200k slots
   in bf16 and in fp8 (first, highest and random slots), whole rows and cut into 4 and 8 ranks'
   columns, and on a pool whose layers exceed 2 GiB (slot offsets that need 64-bit arithmetic);
2. the GF(2^8) product gives the torch reference's bytes when a source or output row starts more than
   2^31 bytes into its allocation (row offsets that need 64-bit arithmetic);
3. the capture path's fused column encode gives the CPU path's records (xor 8+1, rs 4+2), over a
   received buffer of more than 2^31 bytes.

Prints one PASS/FAIL line per check and exits 1 when any fails.

    python tests/gpu/kernel_check.py
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ghostserve_sglang.codec import new_code  # noqa: E402
from ghostserve_sglang.sglang.protection.column_encoder import ColumnEncoder  # noqa: E402
from ghostserve_sglang.sglang.protection.kv import KVView  # noqa: E402

GIB = 1 << 30


def gather_on_a_realistic_pool(dtype: torch.dtype) -> bool:
    """A Llama-8B-shaped pool (32 layers, 8 KV heads x 128) of 200k slots: the Triton gather reads the
    same bytes as index_select, for the first, the highest and random slots."""
    slots, heads, head_dim, layers = 200_000, 8, 128, 32
    generator = torch.Generator(device="cuda").manual_seed(0)
    buffers = [[torch.randint(0, 256, (slots + 1, heads, head_dim * dtype.itemsize), dtype=torch.uint8,
                              device="cuda", generator=generator).view(dtype) for _ in range(layers)]
               for _ in range(2)]
    pool = types.SimpleNamespace(k_buffer=buffers[0], v_buffer=buffers[1])
    view = KVView(pool)
    picked = torch.cat([torch.tensor([1, 2, slots - 1, slots], device="cuda"),
                        torch.randint(1, slots + 1, (8188,), device="cuda", generator=generator)])
    same = torch.equal(view.gather(picked, use_triton=True), view.gather(picked, use_triton=False))
    for ranks in (4, 8):  # cut for the exchange: 4 KiB slot-layers into 1 KiB and 512-byte columns
        column = view.slot_layer_bytes // ranks
        same &= torch.equal(view.gather_columns(picked, ranks, column, use_triton=True),
                            view.gather_columns(picked, ranks, column, use_triton=False))
    del buffers, pool, view
    torch.cuda.empty_cache()
    return same


def gather_realistic_bf16() -> bool:
    return gather_on_a_realistic_pool(torch.bfloat16)


def gather_realistic_fp8() -> bool:
    return gather_on_a_realistic_pool(torch.float8_e4m3fn)


def gather_over_2gib_layers() -> bool:
    # KVView needs only the pool's per-layer K and V buffers: [slots, heads, head_dim] each.
    slots, heads, head_dim, layers = (GIB * 5 // 2) // 1024, 8, 64, 2  # 1 KiB a slot-layer half
    buffers = [[torch.randint(-100, 100, (slots, heads, head_dim), dtype=torch.int16, device="cuda")
                .view(torch.bfloat16) for _ in range(layers)] for _ in range(2)]
    pool = types.SimpleNamespace(k_buffer=buffers[0], v_buffer=buffers[1])
    view = KVView(pool)
    picked = torch.cat([torch.tensor([1, slots - 1], device="cuda"),
                        torch.randint(1, slots, (4094,), device="cuda")])
    same = torch.equal(view.gather(picked, use_triton=True), view.gather(picked, use_triton=False))
    del buffers, pool, view
    torch.cuda.empty_cache()
    return same


def gf_product_over_2gib_rows() -> bool:
    # rs 4+3 over rows 1.1e9 bytes apart: source row 3 and output row 2 start beyond 2^31 bytes.
    k, m, n = 4, 3, 1_100_000_000
    data = torch.randint(0, 256, (k, n), dtype=torch.uint8, device="cuda")
    parity = torch.empty((m, n), dtype=torch.uint8, device="cuda")
    new_code("rs", k, m, backend="triton").encode(list(data), out=list(parity))
    reference = new_code("rs", k, m, backend="torch")
    ok = True
    for start in (0, n // 2, n - (1 << 20)):  # the encode is column-wise: compare windows of it
        window = slice(start, start + (1 << 20))
        want = reference.encode([row[window].contiguous() for row in data])
        ok &= all(torch.equal(parity[i, window], want[i]) for i in range(m))
    del data, parity
    torch.cuda.empty_cache()
    return ok


def fused_encode_over_2gib(code: str, ranks: int, parity_shards: int) -> bool:
    """Received columns of 2.2 GB (a 70B-shaped step of 8 ranks' columns): the Triton encode gives
    the CPU path's records for the first and the last slots."""
    layers, column = 80, 256
    n = (2 * GIB + (200 << 20)) // (ranks * layers * column)
    received = torch.randint(0, 256, (ranks, n, layers, column), dtype=torch.uint8, device="cuda")
    got = ColumnEncoder(code, ranks, parity_shards, torch.device("cuda")).encode(received)
    cpu = ColumnEncoder(code, ranks, parity_shards, torch.device("cpu"))
    ok = True
    for picked in (slice(0, 64), slice(n - 64, n)):
        ok &= torch.equal(got[picked].cpu(), cpu.encode(received[:, picked].cpu().contiguous()))
    del received, got
    torch.cuda.empty_cache()
    return ok


def fused_encode_xor_over_2gib() -> bool:
    return fused_encode_over_2gib("xor", 8, 1)


def fused_encode_rs_over_2gib() -> bool:
    return fused_encode_over_2gib("rs", 4, 2)


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    failed = 0
    for check in (gather_realistic_bf16, gather_realistic_fp8, gather_over_2gib_layers,
                  gf_product_over_2gib_rows, fused_encode_xor_over_2gib, fused_encode_rs_over_2gib):
        ok = check()
        failed += not ok
        print(f"{check.__name__}: {'PASS' if ok else 'FAIL'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
