"""Device check: a GhostServe-protected SGLang server on one GPU (TP=1, replicate, CUDA graphs on),
concurrent requests, then a scrub that must find every live slot's host copy equal to its KV.

Needs sglang installed on the device machine; says so and exits 3 when it is not."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ghostserve_sglang.local_server import COMMON_FLAGS, launched  # noqa: E402


def main() -> int:
    if importlib.util.find_spec("sglang") is None:
        print("server check NOT RUN: sglang is not installed on this machine")
        return 3
    flags = [*COMMON_FLAGS, "--mem-fraction-static", "0.3", "--cuda-graph-max-bs", "16"]
    with launched(1, ["--ghost-code", "replicate", "--ghost-strict", "1"], flags=flags,
                  max_total_tokens=16384, log_dir=".") as server:
        prompts = [[(13 * i + j) % 997 + 3 for j in range(20 + 37 * i)] for i in range(12)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
            replies = list(pool.map(lambda p: server.generate(p, 48), prompts))
        assert all(len(r["output_ids"]) == 48 for r in replies)
        scrub = server.control("scrub")
        status = server.control("status")
        print(json.dumps({"scrub": scrub, "status": status}, indent=2))
        graphs = "cuda graph" in server.log().lower()
    ok = (scrub["mismatching"] == 0 and scrub["not_durable"] == 0
          and scrub["matching"] == scrub["live_slots"] > 0)
    print(f"server check: {'PASS' if ok else 'FAIL'} (cuda graphs mentioned in log: {graphs})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
