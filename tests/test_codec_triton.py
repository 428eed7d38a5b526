"""The Triton kernels (interpreted on CPU) give the torch reference's bytes, for encode and rebuild."""

import itertools

import pytest
import torch
from shards import random_shards, same_bytes

from ghostserve_sglang.codec import available_backends, new_code

pytestmark = pytest.mark.skipif(
    "triton" not in available_backends("cuda" if torch.cuda.is_available() else "cpu"),
    reason="conftest selects TRITON_INTERPRET=1 without a GPU, so this never skips in CI",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_runs_here():
    assert "triton" in available_backends(DEVICE)


@pytest.mark.parametrize("code,k,m", [("xor", 3, 1), ("rs", 4, 2), ("rs", 5, 3)])
@pytest.mark.parametrize(
    "dtype,numel", [(torch.float16, 700), (torch.float8_e4m3fn, 1037), (torch.float32, 3)]
)
def test_triton_encode_and_rebuild_equal_torch_reference(code, k, m, dtype, numel):
    data = [s.to(DEVICE) for s in random_shards(k, numel, dtype, k + m)]
    triton_code = new_code(code, k, m, backend="triton")
    torch_code = new_code(code, k, m, backend="torch")
    parity = triton_code.encode(data)
    assert all(same_bytes(a, b) for a, b in zip(parity, torch_code.encode(data)))
    shards = data + parity
    for lost in itertools.combinations(range(k + m), m):
        rebuilt = triton_code.reconstruct(shards, missing=lost)
        assert all(same_bytes(a, b) for a, b in zip(rebuilt, shards)), lost


def test_triton_reads_strided_rows_in_place_and_writes_only_its_rows():
    k, m, n = 4, 2, 300
    staging = torch.randint(0, 256, (k, n + 20), dtype=torch.uint8, device=DEVICE)
    data = [staging[i, 5 : 5 + n] for i in range(k)]  # one allocation, fixed stride
    guarded = torch.full((m, n + 16), 0x5A, dtype=torch.uint8, device=DEVICE)
    out = [guarded[i, 8 : 8 + n] for i in range(m)]
    new_code("rs", k, m, backend="triton").encode(data, out=out)
    expected = new_code("rs", k, m, backend="torch").encode(data)
    assert all(same_bytes(a, b) for a, b in zip(out, expected))
    assert (guarded[:, :8] == 0x5A).all() and (guarded[:, 8 + n :] == 0x5A).all()


@pytest.mark.skipif(DEVICE != "cpu", reason="tests/gpu/kernel_check.py runs this size on a GPU")
def test_row_offsets_past_int32_with_a_stride_that_fits_int32():
    # rs 3+3 over rows 2^30 + 4 KiB apart in one sparse mapping (only the touched pages are backed):
    # the stride fits int32, source row 2 and output row 2 start past 2^31 bytes.
    import mmap

    k, m, length, stride = 3, 3, 4096, (1 << 30) + 4096
    space = mmap.mmap(-1, (k - 1) * stride + length)
    rows = torch.frombuffer(space, dtype=torch.uint8)
    sources = [rows[j * stride: j * stride + length] for j in range(k)]
    generator = torch.Generator().manual_seed(7)
    for source in sources:
        source.copy_(torch.randint(0, 256, (length,), dtype=torch.uint8, generator=generator))
    outputs_space = mmap.mmap(-1, (m - 1) * stride + length)
    out_rows = torch.frombuffer(outputs_space, dtype=torch.uint8)
    outputs = [out_rows[i * stride: i * stride + length] for i in range(m)]
    new_code("rs", k, m, backend="triton").encode(sources, out=outputs)
    want = new_code("rs", k, m, backend="torch").encode([s.clone() for s in sources])
    assert all(torch.equal(got, expected) for got, expected in zip(outputs, want))
    del rows, sources, out_rows, outputs
    space.close()
    outputs_space.close()
