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

from ghostserve_sglang.testing.campaign import await_warm_standbys  # noqa: E402
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


def ghostserve_run(context: int, prompts: list[list[int]], logs: str, standby: int = 1,
                   kills: int = 1) -> dict:
    """``kills`` times: stream the prompts, ``kill -9`` rank 1 mid-decode, measure until every stream
    has its next token; with ``standby``, each kill waits until a standby has finished its imports."""
    ghost = ["--ghost-code", "xor", "--ghost-enable-fault-injection", "1", "--ghost-max-restarts", "0",
             "--ghost-standby", str(standby)]
    runs = []
    with launched(2, ghost, log_dir=logs, max_total_tokens=pool_tokens(context)) as server:
        server.generate([5] * 64, 4)  # warm-up
        reference = [server.generate(p, NEW_TOKENS)["output_ids"] for p in prompts]
        for _ in range(kills):
            await_warm_standbys(server, standby)
            server.flush_cache()
            runs.append(kill_once(server, prompts, reference))
    seconds = [r["seconds"] for r in runs]
    names = list(dict.fromkeys(n for r in runs for n in r["phases"]))
    return {"seconds": seconds[0], "all_seconds": seconds, "phases": runs[0]["phases"],
            "phase_p50": {n: percentile([r["phases"].get(n, 0.0) for r in runs], 50) for n in names},
            "produced": runs[0]["produced"], "slots_rebuilt": runs[0]["slots_rebuilt"],
            "slots_recomputed": runs[0]["slots_recomputed"],
            "lost_requests": sum(r["lost_requests"] for r in runs),
            "wrong_tokens": sum(r["wrong_tokens"] for r in runs)}


def kill_once(server, prompts: list[list[int]], reference: list[list[int]]) -> dict:
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
    return {"seconds": resumed, "phases": restart["phases"], "produced": produced,
            "slots_rebuilt": restart["slots_rebuilt"], "slots_recomputed": restart["slots_recomputed"],
            "lost_requests": sum(len(o) != NEW_TOKENS for o in tokens),
            "wrong_tokens": sum(a != b for o, r in zip(tokens, reference) for a, b in zip(o, r))}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


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
    parser.add_argument("--standby-kills", type=int, default=0, help="instead: this many kills on a server "
                        "with a warm standby and as many on one without (cold start), at the first context")
    args = parser.parse_args()
    if args.standby_kills:
        return standby_against_cold(args)
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


def standby_against_cold(args) -> None:
    """Kill to every stream decoding again, with a warm standby and with a cold start, in one run."""
    rng = random.Random(0)
    context = args.contexts[0]
    prompts = [[rng.randrange(3, 1000) for _ in range(context)] for _ in range(REQUESTS)]
    with tempfile.TemporaryDirectory() as logs:
        runs = {mode: ghostserve_run(context, prompts, logs, standby=mode, kills=args.standby_kills)
                for mode in (1, 0)}
    print(f"$ python benchmarks/restart_bench.py --contexts {context} --standby-kills {args.standby_kills}")
    print(f"TP=2 xor, {REQUESTS} requests x {NEW_TOKENS} new tokens of {context}-token prompts, kill -9 of "
          f"rank 1 after {KILL_AFTER_TOKENS} tokens each, {args.standby_kills} kills per server "
          "(2-core CPU, float32 tiny-llama)\n")
    print("| replacement | kill until all decoding p50 | p99 | max | lost requests | wrong tokens |")
    print("|---|---|---|---|---|---|")
    for mode, run in runs.items():
        seconds = run["all_seconds"]
        print(f"| {'warm standby' if mode else 'cold start'} | {percentile(seconds, 50):.2f} s | "
              f"{percentile(seconds, 99):.2f} s | {max(seconds):.2f} s | {run['lost_requests']} | "
              f"{run['wrong_tokens']} |")
    names = list(dict.fromkeys(n for run in runs.values() for n in run["phase_p50"]))
    print("\nRestart phases, p50 (seconds, slowest rank):\n")
    print("| replacement | " + " | ".join(n.removesuffix("_seconds") for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for mode, run in runs.items():
        print(f"| {'warm standby' if mode else 'cold start'} | "
              + " | ".join(f"{run['phase_p50'].get(n, 0):.3f}" for n in names) + " |")


if __name__ == "__main__":
    main()
