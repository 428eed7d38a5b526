"""Decode throughput of a real SGLang server with GhostServe off and on, as a ratio measured in one run.

Each mode gets a fresh server (bundled tiny Llama, CPU, same flags); a batch of concurrent requests
(distinct prompts, ignore_eos, greedy) is timed end to end after a warm-up round; the median round is
reported. Prefill is a small share of each round (prompt tokens << new tokens x batch).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ghostserve_sglang.testing.campaign import await_warm_standbys  # noqa: E402
from ghostserve_sglang.testing.local_server import launched  # noqa: E402


def measure(server, batch: int, prompt: int, new_tokens: int, seed: int) -> float:
    prompts = [[(seed * 31 + 7 * i + j) % 997 + 3 for j in range(prompt)] for i in range(batch)]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=batch) as pool:
        replies = list(pool.map(lambda p: server.generate(p, new_tokens), prompts))
    elapsed = time.perf_counter() - started
    assert all(len(r["output_ids"]) == new_tokens for r in replies)
    return batch * new_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--modes", default="off,xor", help="comma-separated --ghost-code values; the "
                        "first is the baseline")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    modes = args.modes.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as logs:
        for mode in modes:
            with launched(args.tp, ["--ghost-code", mode], log_dir=logs) as server:
                if mode != "off" and args.tp > 1:  # the steady state: a warm standby waits
                    await_warm_standbys(server, 1)
                measure(server, args.batch, args.prompt, args.new_tokens, seed=0)  # warm-up
                rounds = [measure(server, args.batch, args.prompt, args.new_tokens, seed=r + 1)
                          for r in range(args.rounds)]
                if mode != "off":
                    scrub = server.control("scrub")
                    assert scrub["mismatching"] == 0, scrub
            results[mode] = rounds
            print(f"{mode}: " + ", ".join(f"{x:.1f}" for x in rounds) + " tokens/s", flush=True)
    base = statistics.median(results[modes[0]])
    print(f"\n| mode | decode tokens/s (median of {args.rounds}) | ratio to {modes[0]} |")
    print("|---|---|---|")
    for mode in modes:
        median = statistics.median(results[mode])
        print(f"| {mode} | {median:.1f} | {median / base:.3f} |")
    print(f"\ncommand: python benchmarks/overhead_bench.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"TP={args.tp}, batch {args.batch}, prompt {args.prompt} tokens, {args.new_tokens} new tokens "
          "per request, CPU, bundled tiny Llama")


if __name__ == "__main__":
    main()
