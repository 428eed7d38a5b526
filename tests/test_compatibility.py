"""The README's compatibility table, cell by cell: SGLang server shapes GhostServe protects (a real
TP=2 server: a fault mid-decode is rebuilt from parity and a killed rank replaced, every token unchanged,
the scrub clean), and the
options and models it refuses at start (one line naming the option, exit status 2, nothing left
running and nothing left in /dev/shm)."""

from __future__ import annotations

import json
import os
import pathlib
import random
import subprocess
import sys

import psutil
import pytest
import torch

from ghostserve_sglang import models
from ghostserve_sglang.drills import kv as kv_drills
from ghostserve_sglang.sglang.protection.scrub import scrub as scrub_parity
from ghostserve_sglang.testing.campaign import LONG_PROMPT, request_mix, run_kill_trial, run_trial
from ghostserve_sglang.testing.local_server import eventually, free_port, launched
from ghostserve_sglang.testing.rig import make_protector, stop, written

GHOST = ["--ghost-code", "xor", "--ghost-enable-fault-injection", "1", "--ghost-strict", "1",
         "--ghost-rejoin-timeout-seconds", "240"]

# config.json of a small model of each architecture whose KV SGLang keeps in another pool.
MODEL_CONFIGS = {
    "mla": {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 256,
            "intermediate_size": 512, "moe_intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 64, "q_lora_rank": None,
            "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32, "n_routed_experts": 4,
            "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
            "moe_layer_freq": 1, "topk_method": "greedy", "n_group": 1, "topk_group": 1},
    "sliding-window": {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 256,
                       "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "head_dim": 64, "num_local_experts": 4,
                       "num_experts_per_tok": 2, "sliding_window": 128,
                       "layer_types": ["sliding_attention", "full_attention"]},
    "linear": {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "hidden_size": 256,
               "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 64, "full_attention_interval": 4,
               "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 32,
               "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4, "num_experts": 4,
               "num_experts_per_tok": 2, "moe_intermediate_size": 128,
               "shared_expert_intermediate_size": 128, "decoder_sparse_step": 1,
               "partial_rotary_factor": 0.25},
}
COMMON_CONFIG = {"vocab_size": 1024, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                 "rope_theta": 10000.0, "torch_dtype": "float32"}


def model_folder(tmp_path, kind: str) -> str:
    folder = tmp_path / kind
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**COMMON_CONFIG, **MODEL_CONFIGS[kind]}))
    return str(folder)


def ghostserve_files() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("ghostserve-")}


# The refused cells: the flags, and what the one line must name.
REFUSED = [
    (["--enable-hierarchical-cache"], "--enable-hierarchical-cache is not supported"),
    (["--enable-lmcache"], "--enable-lmcache is not supported"),
    (["--speculative-algorithm", "NGRAM"], "--speculative-algorithm=NGRAM is not supported"),
    (["--dp-size", "2"], "--dp-size=2 is not supported"),
    (["--attn-dp-size", "2"], "--attn-dp-size=2 is not supported"),
    (["--pp-size", "2"], "--pp-size=2 is not supported"),
    (["--lora-paths", "adapter=/nonexistent/adapter"], "--lora-paths=adapter=/nonexistent/adapter is not"),
    ("mla", "(DeepseekV2ForCausalLM) uses multi-head latent attention (MLA)"),
    ("sliding-window", "(GptOssForCausalLM) uses hybrid sliding-window attention"),
    ("linear", "(Qwen3NextForCausalLM) uses hybrid linear attention"),
]


def nothing_left(group: int, port: int) -> bool:
    """No live process of a process group and none of the server's files in /dev/shm, within 10 s
    (the group's last processes may still be exiting)."""

    def gone() -> bool:
        alive = [p.pid for p in psutil.process_iter(["status"]) if p.info["status"] != psutil.STATUS_ZOMBIE
                 and _group(p.pid) == group]  # a zombie has ended; only init can reap it here
        found = alive + [name for name in ghostserve_files() if name.startswith(f"ghostserve-{port}")]
        assert not found, found
        return True

    return eventually(gone, timeout_s=10)


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def start(module: str, model: str, flags: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", module, "--model-path", model, "--tokenizer-path", str(models.path()),
         "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--max-total-tokens", "4096",
         *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("GHOSTSERVE_")}, **env})
    return process, port


def launcher_argv(flags, tmp_path) -> tuple[list[str], int]:
    """The launcher's arguments for a refused cell of the table (a model kind, or SGLang flags)."""
    model = model_folder(tmp_path, flags) if isinstance(flags, str) else str(models.path())
    flags = [] if isinstance(flags, str) else flags
    port = free_port()
    return ["--model-path", model, "--tokenizer-path", str(models.path()), "--device", "cpu", "--host",
            "127.0.0.1", "--port", str(port), "--max-total-tokens", "4096", "--tp-size", "2", *flags,
            "--ghost-code", "xor"], port


def check_refusal_line(err: str, named: str) -> None:
    ours = [line for line in err.splitlines() if line.startswith("ghostserve")]
    assert ours == [err.strip().splitlines()[-1]] and "Traceback" not in err, err[-3000:]
    assert ours[0].startswith("ghostserve: error: ") and named in ours[0] and "--ghost-code off" in ours[0]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict:
    """Every refused cell through the launcher's own start-up, in one process of its own (SGLang is
    imported once): its exit status, stderr, and what it left (tests/launch_refusals.py)."""
    cells = {repr(flags): launcher_argv(flags, tmp_path_factory.mktemp("refused"))[0] for flags, _ in REFUSED}
    done = subprocess.run([sys.executable, str(pathlib.Path(__file__).with_name("launch_refusals.py"))],
                          input=json.dumps(list(cells.values())), capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if not k.startswith("GHOSTSERVE_")})
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(zip(cells, json.loads(done.stdout.splitlines()[-1])))


@pytest.mark.parametrize("flags, named", REFUSED, ids=[f if isinstance(f, str) else f[0] for f, _ in REFUSED])
def test_refused_at_start_in_one_line_leaving_nothing(flags, named, refusals):
    refused = refusals[repr(flags)]
    assert refused["status"] == 2, refused["stderr"][-3000:]
    check_refusal_line(refused["stderr"], named)
    assert refused["children"] == [] and refused["new_files"] == []  # nothing was started


def test_a_refused_launcher_exits_with_status_2_and_leaves_nothing_running(tmp_path):
    """The same refusal from a launcher process of its own, as an operator meets it."""
    flags, named = REFUSED[0]
    argv, port = launcher_argv(flags, tmp_path)
    launcher = subprocess.Popen([sys.executable, "-m", "ghostserve_sglang.launch", *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True,
                                env={k: v for k, v in os.environ.items() if not k.startswith("GHOSTSERVE_")})
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 2, err[-3000:]
    check_refusal_line(err, named)
    assert nothing_left(launcher.pid, port)


@pytest.mark.parametrize("model, env, named", [
    ("mla", {"GHOSTSERVE_CODE": "replicate"}, ["--model-path=", "uses multi-head latent attention (MLA)"]),
    (None, {"GHOSTSERVE_CODE": "xor", "GHOSTSERVE_PARITY_SHARDS": "2"},
     ["--ghost-parity-shards=2 is not allowed with --ghost-code=xor", "xor has exactly 1 parity shard"]),
], ids=["mla", "xor-with-two-parity-shards"])
def test_plain_sglang_launch_server_refuses_what_the_launcher_would(model, env, named, tmp_path):
    # No launcher: the scheduler process refuses before its scheduler is built.
    model = model_folder(tmp_path, model) if model else str(models.path())
    server, port = start("sglang.launch_server", model, ["--load-format", "dummy"], env)
    out, err = server.communicate(timeout=400)
    assert server.returncode != 0, err[-3000:]
    refusals = [line for line in err.splitlines() if "refused to start" in line]
    assert len(refusals) == 1, err[-3000:]
    assert refusals[0].startswith(f"ghostserve: a scheduler process refused to start: {named[0]}"), refusals
    assert all(part in refusals[0] for part in named), refusals
    assert nothing_left(server.pid, port)


@pytest.mark.parametrize("extra, logged, kill", [
    # A page's later slots are allocated before they hold KV; a replacement receives the paged allocator;
    # the pool keeps fp8 KV as bytes.
    (["--page-size", "16", "--kv-cache-dtype", "fp8_e4m3", "--chunked-prefill-size", "128"],
     ["'page_size': 16", "'kv_cache_dtype': 'fp8_e4m3'", "KV Cache is allocated. dtype: torch.float8_e4m3fn"],
     True),
    (["--disable-radix-cache", "--chunked-prefill-size", "-1"],
     ["'disable_radix_cache': True", "'chunked_prefill_size': -1"], False),
], ids=["page-size-16-and-kv-cache-dtype-fp8_e4m3", "radix-and-chunked-prefill-off"])
def test_protected_a_fault_is_rebuilt_and_every_token_unchanged(extra, logged, kill, tmp_path):
    during = []  # a scrub while the requests decode, before the fault
    with launched(2, GHOST, extra, log_dir=str(tmp_path)) as server:
        trial = run_trial(server, seed=31, ranks=2, drills=[(4, lambda s: during.append(s.control("scrub")))])
        mix = request_mix(random.Random(32), requests=7) + [LONG_PROMPT]
        killed = run_kill_trial(server, 32, ranks=[1], how="KILL", after_steps=12, mix=mix) if kill else None
        log = server.log()
    assert all(line in log for line in logged)  # SGLang's server_args: it ran with the options
    assert during[0]["live_slots"] > 0 and during[0]["matching"] > 0, during
    assert during[0]["mismatching"] == 0 and during[0]["corrupt"] == 0, during
    assert trial.ok and trial.running_at_fault > 0, trial
    assert trial.recovery["outcome"] == "rebuilt" and trial.recovery["slots_rebuilt"] > 0, trial
    assert trial.scrub["mismatching"] == 0 and trial.scrub["not_durable"] == 0, trial.scrub
    if not kill:
        return
    # A rank's process killed mid-decode: its replacement's KV comes back from parity.
    assert killed.running_at_kill >= 4 and killed.lost_requests == 0 and killed.wrong_tokens == 0, killed
    assert killed.restart["restart"] and killed.restart["slots_rebuilt"] > 0, killed.restart
    assert killed.scrub["mismatching"] == 0 and killed.scrub["not_durable"] == 0, killed.scrub


def test_fp8_kv_is_protected_as_bytes_in_sglangs_pool():
    # SGLang's pool keeps fp8 KV as bytes; they are what is protected.
    protector = make_protector(dtype=torch.float8_e4m3fn)
    try:
        assert protector.kv.pool.k_buffer[0].dtype == torch.uint8  # SGLang stores fp8 KV as uint8
        written(protector, 40, seed=3)
        live = protector.coverage()[0]
        before = protector.kv.gather(live).clone()
        scrub = protector.call(lambda: scrub_parity(protector))
        assert scrub["matching"] == scrub["live_slots"] == 40 and scrub["mismatching"] == 0
        protector.call(lambda: kv_drills.inject(protector, [0]))
        assert not torch.equal(protector.kv.gather(live), before)
        assert protector.recover(None, [0])["slots_rebuilt"] == 40
        assert torch.equal(protector.kv.gather(live), before)
    finally:
        stop(protector)

