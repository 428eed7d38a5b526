"""Rank replacement vs restarting the server: a TP=2 server decodes 8 streamed requests; rank 1's scheduler
process is killed (``kill -9``) mid-decode. GhostServe replaces the rank, rebuilds its KV and the requests
carry on; the time measured is from the kill until every request in flight has streamed its next token.

The alternative an operator has today is to restart the server and send every request again: the time
measured for it is a fresh server's start (launch until /health answers) plus the prefill of every
request's prompt and the tokens it had already produced, until each has its next token. Both are
measured in the same run, at each context size, and printed as a ratio."""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ghostserve_sglang.testing.local_server import launched  # noqa: E402

REQUESTS = 8
NEW_TOKENS = 96
KILL_AFTER_TOKENS = 24  # every request has streamed this many tokens when rank 1 is killed


def pool_tokens(context: int) -> int:
    return REQUESTS * (context + NEW_TOKENS) + 4096


def stream(port: int, ids: list[int], new_tokens: int, times: list[float], tokens: list[int]) -> None:
    """One streamed /generate; appends each chunk's arrival time and its newest output id."""
    body = json.dumps({"input_ids": ids, "stream": True, "sampling_params": {
        "max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    connection.request("POST", "/generate", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    for line in response:
        line = line.strip()
        if line.startswith(b"data:") and line != b"data: [DONE]":
            ids = json.loads(line[5:]).get("output_ids", [])
            times.append(time.monotonic())
            if ids[:len(tokens)] == tokens:  # cumulative output ids
                tokens[:] = ids
            else:  # incremental
                tokens.extend(ids)
    connection.close()


def ghostserve_run(context: int, prompts: list[list[int]], logs: str) -> dict:
    ghost = ["--ghost-code", "xor", "--ghost-enable-fault-injection", "1", "--ghost-max-restarts", "0"]
    with launched(2, ghost, log_dir=logs, max_total_tokens=pool_tokens(context)) as server:
        server.generate([5] * 64, 4)  # warm-up
        pid = server.control("status")["ranks"][1]["pid"]
        times = [[] for _ in prompts]
        tokens = [[] for _ in prompts]
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(stream, server.port, p, NEW_TOKENS, t, o)
                       for p, t, o in zip(prompts, times, tokens)]
            while min(len(t) for t in times) < KILL_AFTER_TOKENS:
                time.sleep(0.002)
            produced = [list(o) for o in tokens]
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            for future in futures:
                future.result()
        resumed = max(min(x for x in t if x > killed) for t in times) - killed
        restart = server.control("status")["ranks"][1]["last_recovery"]
        lost = sum(len(o) != NEW_TOKENS for o in tokens)
    return {"seconds": resumed, "phases": restart["phases"], "produced": produced,
            "slots_rebuilt": restart["slots_rebuilt"], "slots_recomputed": restart["slots_recomputed"],
            "lost_requests": lost}


def restart_run(context: int, prompts: list[list[int]], produced: list[list[int]], logs: str) -> dict:
    started = time.monotonic()
    with launched(2, ["--ghost-code", "off"], log_dir=logs, max_total_tokens=pool_tokens(context)) as server:
        ready = time.monotonic() - started
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            list(pool.map(lambda i: server.generate(prompts[i] + produced[i], 1), range(len(prompts))))
    return {"seconds": time.monotonic() - started, "server_start": ready}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 2048],
                        help="prompt tokens of each request")
    args = parser.parse_args()
    rng = random.Random(0)
    rows = []
    with tempfile.TemporaryDirectory() as logs:
        for context in args.contexts:
            prompts = [[rng.randrange(3, 1000) for _ in range(context)] for _ in range(REQUESTS)]
            ghost = ghostserve_run(context, prompts, logs)
            baseline = restart_run(context, prompts, ghost["produced"], logs)
            rows.append((context, ghost, baseline))
    print(f"$ python benchmarks/restart_bench.py --contexts {' '.join(map(str, args.contexts))}")
    print(f"TP=2 xor, {REQUESTS} requests x {NEW_TOKENS} new tokens, kill -9 of rank 1 after "
          f"{KILL_AFTER_TOKENS} tokens each (2-core CPU, float32 tiny-llama)\n")
    print("| context | GhostServe: kill until all decoding | restart server + re-prefill | ratio | "
          "lost requests | slots rebuilt / recomputed |")
    print("|---|---|---|---|---|---|")
    for context, ghost, baseline in rows:
        print(f"| {context} | {ghost['seconds']:.2f} s | {baseline['seconds']:.2f} s (start "
              f"{baseline['server_start']:.2f} s) | {ghost['seconds'] / baseline['seconds']:.3f} | "
              f"{ghost['lost_requests']} | {ghost['slots_rebuilt']} / {ghost['slots_recomputed']} |")
    print("\nGhostServe phases (seconds, slowest rank):\n")
    names = list(dict.fromkeys(n for _, g, _ in rows for n in g["phases"]))
    print("| context | " + " | ".join(n.removesuffix("_seconds") for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for context, ghost, _ in rows:
        print(f"| {context} | " + " | ".join(f"{ghost['phases'].get(n, 0):.3f}" for n in names) + " |")


if __name__ == "__main__":
    main()
