"""The patch layer and its helpers against SGLang's real classes, in this process (no server)."""

from __future__ import annotations

import types

import pytest
import torch
import wrapt
from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from ghostserve_sglang.settings import Settings
from ghostserve_sglang.sglang.patching import cpu_compat, hooks, patches, state
from ghostserve_sglang.sglang.patching.patches import TARGETS, Patcher, PatchError, Target
from ghostserve_sglang.sglang.protection.kv import KVView, UnsupportedPool, check_pool, live_slots


def make_pool(size: int = 64, heads: int = 3, head_dim: int = 8, layers: int = 2):
    pool = MHATokenToKVPool(size, page_size=1, dtype=torch.bfloat16, head_num=heads, head_dim=head_dim,
                            layer_num=layers, device="cpu", enable_memory_saver=False,
                            enable_alt_stream=False)
    allocator = TokenToKVPoolAllocator(size, dtype=torch.bfloat16, device="cpu", kvcache=pool,
                                       need_sort=False)
    return pool, allocator


def originals() -> list[object]:
    return [target.owner()[0].__dict__[target.owner()[1]] for target in TARGETS]


@pytest.fixture
def recorder():
    """Stands in for the Protector (ours, not SGLang's): records what the hooks report."""
    pool, allocator = make_pool()
    freed: list[list[int]] = []
    protector = types.SimpleNamespace(kv=types.SimpleNamespace(pool=pool, slots=65), model_runner=None,
                                      control=None, on_free=lambda s: freed.append(sorted(s.tolist())))
    state.STATE.settings, state.STATE.protector = Settings.from_values({"strict": "1"}), protector
    yield allocator, freed
    state.STATE.settings, state.STATE.protector = None, None


def test_install_uninstall_install_restores_sglang_exactly(recorder):
    allocator, freed = recorder
    before = originals()
    patcher = Patcher()
    patcher.install()
    assert all(isinstance(attr, wrapt.FunctionWrapper) for attr in originals())
    allocator.free(allocator.alloc(3))
    assert freed == [[1, 2, 3]]  # behaviour seen

    patcher.uninstall()
    assert all(now is was for now, was in zip(originals(), before))
    allocator.free(allocator.alloc(2))
    assert freed == [[1, 2, 3]]  # behaviour gone

    patcher.install()
    allocator.free(allocator.alloc(1))
    assert len(freed) == 2
    patcher.install()  # a second install warns and wraps nothing twice
    assert all(not isinstance(attr.__wrapped__, wrapt.FunctionWrapper) for attr in originals())
    patcher.uninstall()
    assert all(now is was for now, was in zip(originals(), before))


def test_grouped_frees_count_once_when_the_group_ends(recorder):
    allocator, freed = recorder
    patcher = Patcher()
    patcher.install()
    try:
        slots = allocator.alloc(4)
        allocator.free_group_begin()
        allocator.free(slots[:2])
        allocator.free(slots[2:])
        assert freed == []
        allocator.free_group_end()
        assert freed == [[1, 2, 3, 4]]
        allocator.clear()
        assert freed[-1] == list(range(65))
    finally:
        patcher.uninstall()


def test_unsupported_sglang_version_is_refused_before_anything_is_wrapped(monkeypatch):
    before = originals()
    monkeypatch.setattr(patches, "sglang_version", lambda: "0.4.0")
    with pytest.raises(PatchError, match="0.4.0"):
        Patcher().install()
    assert all(now is was for now, was in zip(originals(), before))
    Patcher().install(allow_unsupported=True)  # the operator's explicit override
    assert all(isinstance(attr, wrapt.FunctionWrapper) for attr in originals())
    for target, original in zip(TARGETS, before):
        setattr(target.owner()[0], target.owner()[1], original)


def test_changed_signature_is_refused():
    spec = patches.load_spec()
    key = TARGETS[0].key
    spec["releases"][patches.sglang_version()]["signatures"][key] = "(self, server_args, port_args, extra)"
    with pytest.raises(PatchError, match="Scheduler.__init__"):
        patches.check_supported(spec)


def test_install_is_all_or_nothing():
    before = originals()
    broken = (*TARGETS, Target("sglang.srt.mem_cache.allocator.token", "TokenToKVPoolAllocator.nope",
                               hooks.token_free))
    with pytest.raises(KeyError):
        Patcher(broken).install(allow_unsupported=True)
    assert all(now is was for now, was in zip(originals(), before))


def test_kv_view_gathers_and_scatters_bytes_of_every_layer():
    pool, allocator = make_pool()
    for layer in range(2):
        pool.k_buffer[layer].copy_(torch.randn_like(pool.k_buffer[layer], dtype=torch.float32))
        pool.v_buffer[layer].copy_(torch.randn_like(pool.v_buffer[layer], dtype=torch.float32))
    view = KVView(pool)
    assert (view.layers, view.slots, view.slot_layer_bytes) == (2, 65, 2 * 3 * 8 * 2)
    slots = torch.tensor([5, 9, 1])
    rows = view.gather(slots)
    assert torch.equal(rows[1, 1, : view.half_bytes], pool.k_buffer[1][9].view(torch.uint8).flatten())
    assert torch.equal(rows[2, 0, view.half_bytes :], pool.v_buffer[0][1].view(torch.uint8).flatten())
    view.scatter(torch.tensor([20, 21, 22]), rows)
    assert torch.equal(view.gather(torch.tensor([20, 21, 22])), rows)


def test_triton_gather_reads_the_same_bytes_as_torch():
    pool, _ = make_pool(size=40, heads=3, head_dim=40)  # 240-byte halves: more than one block
    for buffers in (pool.k_buffer, pool.v_buffer):
        for b in buffers:
            b.copy_(torch.randn_like(b, dtype=torch.float32))
    view = KVView(pool)
    slots = torch.tensor([33, 2, 17, 40])
    assert torch.equal(view.gather(slots, use_triton=True), view.gather(slots, use_triton=False))
    empty = torch.tensor([], dtype=torch.int64)
    assert view.gather(empty, use_triton=True).shape == (0, 2, view.slot_layer_bytes)


def test_live_slots_follow_the_allocator():
    pool, allocator = make_pool()
    assert live_slots(allocator, 65).tolist() == []
    taken = allocator.alloc(5)
    allocator.free(taken[1:3])
    assert live_slots(allocator, 65).tolist() == [taken[0].item(), *taken[3:].tolist()]


@pytest.mark.parametrize("neox", [True, False])
def test_cpu_rotary_standin_matches_sglang(neox):
    cpu_compat.install_rotary_standin()
    import vllm._custom_ops as ops

    rope = RotaryEmbedding(16, 12, 64, 10000, neox, torch.float32)
    positions = torch.tensor([0, 3, 17, 63])
    query, key = torch.randn(4, 2 * 16), torch.randn(4, 3 * 16)
    want_q, want_k = rope.forward_native(positions, query.clone(), key.clone())
    ops.rotary_embedding(positions, query, key, 16, rope.cos_sin_cache, neox)  # in place
    torch.testing.assert_close(query, want_q.view_as(query))
    torch.testing.assert_close(key, want_k.view_as(key))


def test_cpu_tp_environment_gives_each_rank_cores():
    assert cpu_compat.tp_environment(1) == {}
    env = cpu_compat.tp_environment(2, cores=[0, 1])
    assert env["SGLANG_CPU_OMP_THREADS_BIND"] == "0|1" and env["OMP_NUM_THREADS"] == "1"
    assert cpu_compat.tp_environment(2, cores=[0, 1, 2, 3])["OMP_NUM_THREADS"] == "2"
    assert cpu_compat.tp_environment(4, cores=[0, 1])["SGLANG_CPU_OMP_THREADS_BIND"] == "0|1|0|1"
    assert not __import__("os").path.exists(env["SGLANG_NCCL_SO_PATH"])


def test_ordered_all_reduce_sums_in_rank_order_whatever_the_length():
    """Three gloo ranks: gloo's own all-reduce gives some positions different sums at different tensor
    lengths (so a token's activations depend on its batch); the ordered one never does."""
    import subprocess
    import sys
    from pathlib import Path

    from ghostserve_sglang.testing.local_server import free_port

    script, port = Path(__file__).with_name("allreduce_rank.py"), str(free_port())
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), port], stdout=subprocess.PIPE, text=True)
             for r in range(3)]
    replies = [rank.communicate(timeout=300)[0].split() for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks)
    for gloo_varying_positions, ordered_wrong in replies:
        assert int(gloo_varying_positions) > 0 and int(ordered_wrong) == 0


def test_cpu_targets_are_declared_and_wrap_and_unwrap():
    original = patches.CPU_TARGETS[0].owner()[0].__dict__["all_reduce"]
    patcher = Patcher(patches.CPU_TARGETS)
    patcher.install()
    assert isinstance(patches.CPU_TARGETS[0].owner()[0].__dict__["all_reduce"], wrapt.FunctionWrapper)
    patcher.uninstall()
    assert patches.CPU_TARGETS[0].owner()[0].__dict__["all_reduce"] is original


def test_cpu_linear_gives_a_row_the_same_bits_whatever_the_batch():
    """A float32 product of a few rows takes another code path than a larger one: a decode step's
    token got other bits with 7 requests in the batch than with 8. Through SGLang's own linear method,
    patched, every batch size gives each row the bits it gets in a batch of 40."""
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

    torch.manual_seed(0)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(128, 192), requires_grad=False)  # a QKV shard's shape
    x = torch.randn(40, 192)
    method = UnquantizedLinearMethod()

    def differing() -> list[int]:
        full = method.apply(layer, x)
        return [m for m in range(1, 40) if not torch.equal(method.apply(layer, x[:m]), full[:m])]

    assert differing(), "this machine's float32 product no longer depends on the row count"
    patcher = Patcher(patches.CPU_TARGETS)
    patcher.install()
    try:
        assert differing() == []
    finally:
        patcher.uninstall()


def _pool(**overrides):
    args = dict(size=16, page_size=1, dtype=torch.bfloat16, head_num=2, head_dim=8, layer_num=2,
                device="cpu", enable_memory_saver=False)
    return MHATokenToKVPool(**{**args, **overrides})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_mha_pools_are_accepted_fp8_as_bytes(dtype):
    pool = _pool(dtype=dtype)
    check_pool(pool)
    view = KVView(pool)
    assert view.slot_layer_bytes == 2 * 2 * 8 * pool.k_buffer[0].element_size()


def _refused(pool, *words):
    with pytest.raises(UnsupportedPool) as refused:
        check_pool(pool)
    message = str(refused.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_hnd_layout_is_refused(monkeypatch):
    monkeypatch.setenv("SGLANG_USE_HND_KVCACHE", "1")
    _refused(_pool(size=12, page_size=4), "layout", "SGLANG_USE_HND_KVCACHE")


def test_k_and_v_of_different_head_dims_are_refused():
    _refused(_pool(head_dim=12, v_head_dim=8), "K [17, 2, 12]", "V [17, 2, 8]")


def test_quantized_kv_with_scale_buffers_is_refused():
    from sglang.srt.layers.quantization.fp4_kv_cache_quant_method import get_kv_cache_quant_method

    method = get_kv_cache_quant_method("nvfp4", num_layers=2, device="cpu", page_size=1)
    _refused(_pool(head_dim=16, dtype=torch.float4_e2m1fn_x2, quant_method=method), "k_scale_buffer")


def test_mla_and_hybrid_pools_are_refused():
    from sglang.srt.mem_cache.memory_pool import HybridLinearKVPool, MLATokenToKVPool
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    common = dict(page_size=1, dtype=torch.bfloat16, device="cpu", enable_memory_saver=False)
    _refused(MLATokenToKVPool(size=16, kv_lora_rank=8, qk_rope_head_dim=4, layer_num=2, **common),
             "MLATokenToKVPool (MLA)")
    _refused(SWAKVPool(size=16, size_swa=8, head_num=2, head_dim=8, swa_attention_layer_ids=[0, 2],
                       full_attention_layer_ids=[1], **common), "SWAKVPool (hybrid")
    _refused(HybridLinearKVPool(size=16, head_num=2, head_dim=8, full_attention_layer_ids=[3],
                                mamba_pool=None, **common), "HybridLinearKVPool (hybrid")


def test_a_stops_sigquit_cleans_up_before_sglang_kills_the_tree(monkeypatch):
    """On a stop, the detokenizer's exit makes SGLang's watchdog send SIGQUIT, whose handler kills the
    whole tree, launcher included: the launcher's clean-up (stamps, membership, segments) runs first."""
    from ghostserve_sglang.sglang.patching import main_hooks
    from ghostserve_sglang.sglang.restart.supervisor import SUPERVISOR

    calls = []
    monkeypatch.setattr(SUPERVISOR, "standing_down", True)
    monkeypatch.setattr(SUPERVISOR, "clean_up", lambda: calls.append("clean up"))
    main_hooks.running_phase_sigquit(lambda: calls.append("kill the tree"), None, (), {})
    assert calls == ["clean up", "kill the tree"]
