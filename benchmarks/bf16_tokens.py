"""When "the same tokens as a fault-free run" holds, by dtype (CPU).

1. PyTorch's CPU attention (``scaled_dot_product_attention``, which SGLang's ``torch_native`` backend
   calls once per request): a causal prefill of a prompt's first rows alone against the same rows inside
   a longer prefill, and a linear layer's rows alone against the same rows in a larger batch.
2. A real TP=2 xor server per dtype (float32, bfloat16), no fault: the same ten requests at once twice,
   one at a time, and one at a time with the first half of each prompt already in the prefix cache.
3. The same servers with faults: in-place KV faults rebuilt from parity, and ``kill -9`` of a rank
   mid-decode (the interrupted batch runs again from the prefix cache).

Every comparison counts output tokens that differ from the first concurrent run."""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ghostserve_sglang.testing.campaign import (  # noqa: E402
    generate_mix,
    one_at_a_time,
    request_mix,
    run_kill_trial,
    run_trial,
)
from ghostserve_sglang.testing.local_server import launched  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def kernel_rows(dtype: torch.dtype) -> tuple[str, str]:
    """How many attention calls and linear calls give a row other bits than the longer call does."""
    gen = torch.Generator().manual_seed(0)
    attention = linear = calls = 0
    for length in (20, 37, 60, 100, 150, 300, 600):
        q, k, v = (torch.randn(6, length, 16, generator=gen).to(dtype) for _ in range(3))
        whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        weight = (torch.randn(512, 192, generator=gen) * 0.05).to(dtype)
        rows = torch.randn(length, 192, generator=gen).to(dtype)
        batch = torch.nn.functional.linear(rows, weight)
        for first in (5, length // 3, length // 2, length - 1):
            part = torch.nn.functional.scaled_dot_product_attention(q[:, :first], k[:, :first], v[:, :first],
                                                                    is_causal=True)
            attention += not torch.equal(part, whole[:, :first])
            linear += not torch.equal(torch.nn.functional.linear(rows[:max(first, 16)], weight),
                                      batch[:max(first, 16)])
            calls += 1
    return f"{attention} of {calls}", f"{linear} of {calls}"


def differing(outputs: list[list[int]], reference: list[list[int]]) -> str:
    tokens = sum(a != b for o, r in zip(outputs, reference) for a, b in zip(o, r))
    requests = sum(o != r for o, r in zip(outputs, reference))
    return f"{tokens} tokens in {requests} of {len(reference)} requests"


def server_rows(dtype: str, kills: int, kv_faults: int) -> list[str]:
    ghost = ["--ghost-code", "xor", "--ghost-enable-fault-injection", "1", "--ghost-max-restarts", "0"]
    with tempfile.TemporaryDirectory() as logs, \
            launched(2, ghost, ["--dtype", dtype], log_dir=logs) as server:
        mix = request_mix(random.Random(11), requests=10)
        server.flush_cache()
        first = generate_mix(server, mix)
        server.flush_cache()
        again = generate_mix(server, mix)
        alone = one_at_a_time(server, mix)
        split = one_at_a_time(server, mix, cached_half=True)
        rows = [f"| {dtype} | no fault: all at once, again | {differing(again, first)} |",
                f"| {dtype} | no fault: one at a time | {differing(alone, first)} |",
                f"| {dtype} | no fault: one at a time, half of each prompt from the prefix cache | "
                f"{differing(split, first)} |"]
        trials = [run_trial(server, seed=4 + i, ranks=2) for i in range(kv_faults)]
        rows.append(f"| {dtype} | {kv_faults} in-place KV faults mid-decode, rebuilt from parity "
                    f"({sum(t.recovery['slots_rebuilt'] for t in trials)} slots rebuilt, "
                    f"{sum(t.recovery['slots_recomputed'] for t in trials)} recomputed, scrub mismatching "
                    f"{sum(t.scrub['mismatching'] for t in trials)}) | "
                    f"{sum(t.wrong_tokens for t in trials)} tokens, {sum(t.lost_requests for t in trials)} "
                    f"requests lost |")
        deaths = [run_kill_trial(server, seed=40 + i, ranks=[1], after_steps=12 + 3 * i)
                  for i in range(kills)]
        rows.append(f"| {dtype} | {kills} `kill -9` of rank 1 mid-decode "
                    f"({sum(t.restart['slots_rebuilt'] for t in deaths)} slots rebuilt, "
                    f"{sum(t.restart['slots_recomputed'] for t in deaths)} recomputed, scrub mismatching "
                    f"{sum(t.scrub['mismatching'] for t in deaths)}) | "
                    f"{sum(t.wrong_tokens for t in deaths)} tokens in "
                    f"{sum(bool(t.wrong_tokens) for t in deaths)} of {kills} trials, "
                    f"{sum(t.lost_requests for t in deaths)} requests lost |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--kv-faults", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"$ python benchmarks/bf16_tokens.py --kills {args.kills} --kv-faults {args.kv_faults}\n")
    print("| dtype | causal prefill rows alone vs inside a longer prefill (CPU SDPA) | "
          "linear rows alone vs in a larger batch |")
    print("|---|---|---|")
    for name, dtype in DTYPES.items():
        attention, linear = kernel_rows(dtype)
        print(f"| {name} | {attention} calls differ | {linear} calls differ |")
    print("\n| dtype | run (TP=2 xor, tiny-llama, 10 requests of 32-64 greedy tokens) | "
          "output tokens differing (no fault: from the first run; faults: from the same requests "
          "run without one) |")
    print("|---|---|---|")
    for name in DTYPES:
        for row in server_rows(name, args.kills, args.kv_faults):
            print(row, flush=True)


if __name__ == "__main__":
    main()
