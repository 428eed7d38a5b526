"""Erasure codec: round trips over every erasure pattern, named errors, and known answers."""

import ctypes
import itertools

import gf_slow
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from shards import random_shards, same_bytes

from ghostserve_sglang.codec import (
    GeometryError,
    ShardCountError,
    ShardSizeError,
    TooFewShardsError,
    available_backends,
    new_code,
)
from ghostserve_sglang.codec.backends.isal import load_library

CPU_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]
DTYPES = [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float32, torch.uint8]


def test_isal_is_installed_for_the_tests():
    # The known-answer tests below need the real library; the test set-up installs it.
    assert load_library() is not None
    assert "isal" in CPU_BACKENDS


geometries = st.one_of(
    st.tuples(st.just("xor"), st.integers(1, 8), st.just(1)),
    st.tuples(st.just("rs"), st.integers(1, 8), st.integers(1, 4)),
    st.tuples(st.just("replicate"), st.integers(1, 4)).map(lambda t: (t[0], t[1], t[1])),
)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=30, deadline=None)
@given(geometry=geometries, numel=st.integers(1, 67), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 99))
def test_every_erasure_pattern_rebuilds_identical_bytes(backend, geometry, numel, dtype, seed):
    name, k, m = geometry
    code = new_code(name, k, m, backend=backend)
    data = random_shards(k, numel, dtype, seed)
    shards = data + code.encode(data)
    assert code.verify(shards)
    for count in range(1, m + 1):
        for lost in itertools.combinations(range(k + m), count):
            if name == "replicate" and any(i + k in lost for i in lost):
                continue  # a shard and its own copy: covered by the replicate test below
            given_shards = [None if i in lost else s for i, s in enumerate(shards)]
            rebuilt = code.reconstruct(given_shards)
            assert all(same_bytes(a, b) for a, b in zip(rebuilt, shards)), lost


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 8), m=st.integers(1, 4), extra=st.integers(1, 3), seed=st.integers(0, 99))
def test_more_erasures_than_parity_raise_too_few_shards(backend, k, m, extra, seed):
    lost_count = min(m + extra, k + m)
    code = new_code("rs", k, m, backend=backend)
    data = random_shards(k, 5, torch.float16, seed)
    shards = data + code.encode(data)
    lost = torch.randperm(k + m, generator=torch.Generator().manual_seed(seed))[:lost_count].tolist()
    with pytest.raises(TooFewShardsError):
        code.reconstruct(shards, missing=lost)


def test_replicate_loses_a_shard_only_with_its_copy():
    code = new_code("replicate", 3)
    data = random_shards(3, 10, torch.float32, 1)
    shards = data + code.encode(data)
    rebuilt = code.reconstruct(shards, missing=[0, 1, 5])  # both copies of shards 0 and 1 survive once
    assert all(same_bytes(a, b) for a, b in zip(rebuilt, shards))
    with pytest.raises(TooFewShardsError):
        code.reconstruct(shards, missing=[1, 4])


@pytest.mark.parametrize(
    "args,named",
    [
        (("xor", 4, 2), "parity_shards=2"), (("xor", 0, 1), "data_shards=0"),
        (("rs", 4, 0), "parity_shards=0"), (("rs", 250, 7), "parity_shards=7"),
        (("rs", 0, 2), "data_shards=0"), (("rs", 4, -1), "parity_shards=-1"),
        (("replicate", 3, 2), "parity_shards=2"), (("lrc", 4, 2), "'lrc'"),
        (("rs", 4.0, 2), "data_shards=4.0"), (("rs", True, 1), "data_shards=True"),
        (("rs", 4, "2"), "parity_shards='2'"),
    ],
)
def test_bad_geometry_raises_one_line_error_naming_the_value(args, named):
    with pytest.raises(GeometryError) as err:
        new_code(*args)
    message = str(err.value)
    assert "\n" not in message and named in message and "allowed" in message


def test_largest_rs_geometry_is_allowed_and_rebuilds():
    code = new_code("rs", 250, 6)
    data = random_shards(250, 3, torch.uint8, 2)
    shards = data + code.encode(data)
    rebuilt = code.reconstruct(shards, missing=[0, 7, 100, 249, 250, 255])
    assert all(same_bytes(a, b) for a, b in zip(rebuilt, shards))


def test_wrong_shard_counts_and_sizes_raise_named_errors():
    code = new_code("rs", 3, 2)
    data = random_shards(3, 8, torch.float16, 3)
    with pytest.raises(ShardCountError):
        code.encode(data[:2])
    with pytest.raises(ShardCountError):
        code.reconstruct(data)
    with pytest.raises(ShardCountError):
        code.reconstruct(data + code.encode(data), missing=[9])
    with pytest.raises(ShardSizeError):
        code.encode([data[0], data[1], data[2][:7]])
    with pytest.raises(ShardSizeError):
        code.encode([data[0], data[1], data[2].view(torch.int16)])
    with pytest.raises(ShardSizeError):
        code.encode([data[0], data[1], torch.zeros(16, dtype=torch.float16)[::2]])
    with pytest.raises(TooFewShardsError):
        code.reconstruct([None] * 5)


def test_verify_detects_a_flipped_byte():
    code = new_code("rs", 4, 2)
    data = random_shards(4, 33, torch.bfloat16, 4)
    shards = data + code.encode(data)
    assert code.verify(shards)
    shards[5].view(torch.uint8)[17] ^= 0x40
    assert not code.verify(shards)


def test_encode_writes_into_given_buffers_and_not_around_them():
    code = new_code("rs", 3, 2)
    data = random_shards(3, 21, torch.float16, 5)
    guarded = torch.full((2, 50), 0xA5, dtype=torch.uint8)
    out = [guarded[i, 4:46].view(torch.float16) for i in range(2)]
    code.encode(data, out=out)
    expected = code.encode(data)
    assert all(same_bytes(a, b) for a, b in zip(out, expected))
    assert (guarded[:, :4] == 0xA5).all() and (guarded[:, 46:] == 0xA5).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k,m", [(1, 1), (2, 1), (4, 2), (5, 3), (8, 4)])
def test_parity_matches_slow_pure_python_gf(backend, k, m):
    data = random_shards(k, 37, torch.uint8, k * 10 + m)
    raw = [bytes(d.tolist()) for d in data]
    rs = new_code("rs", k, m, backend=backend).encode(data)
    assert [bytes(p.tolist()) for p in rs] == gf_slow.cauchy_parity(raw, m)
    xor = new_code("xor", k, 1, backend=backend).encode(data)
    assert bytes(xor[0].tolist()) == gf_slow.xor_parity(raw)


def isal_reference_parity(data: list[torch.Tensor], m: int) -> list[bytes]:
    """Parity computed by ISA-L alone: its own Cauchy matrix, tables and encoder."""
    lib = ctypes.CDLL("libisal.so.2")
    k, length = len(data), data[0].numel()
    matrix = ctypes.create_string_buffer((k + m) * k)
    lib.gf_gen_cauchy1_matrix(matrix, k + m, k)
    tables = ctypes.create_string_buffer(32 * k * m)
    lib.ec_init_tables(k, m, ctypes.byref(matrix, k * k), tables)
    sources = [ctypes.create_string_buffer(bytes(d.tolist()), length) for d in data]
    outputs = [ctypes.create_string_buffer(length) for _ in range(m)]
    src_ptrs = (ctypes.c_void_p * k)(*(ctypes.addressof(b) for b in sources))
    out_ptrs = (ctypes.c_void_p * m)(*(ctypes.addressof(b) for b in outputs))
    lib.ec_encode_data(length, k, m, tables, src_ptrs, out_ptrs)
    return [o.raw for o in outputs]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k,m,length", [(2, 1, 1), (4, 2, 4096), (6, 3, 1000), (8, 4, 65541), (10, 4, 33)])
def test_parity_matches_intel_isal(backend, k, m, length):
    data = random_shards(k, length, torch.uint8, length + k)
    ours = new_code("rs", k, m, backend=backend).encode(data)
    assert [bytes(p.tolist()) for p in ours] == isal_reference_parity(data, m)


@pytest.mark.parametrize("code,k,m", [("xor", 4, 1), ("rs", 4, 2), ("rs", 8, 2)])
def test_large_shards_take_the_threaded_fast_path_identically(code, k, m):
    # Sizes above the threading threshold, odd lengths and unaligned starts (xor_gen needs alignment).
    base = random_shards(k, 5 << 20, torch.uint8, 7)
    for data in (base, [d[1:-2] for d in base]):
        fast = new_code(code, k, m, backend="isal").encode(data)
        ref = new_code(code, k, m, backend="torch").encode(data)
        assert all(same_bytes(a, b) for a, b in zip(fast, ref))
