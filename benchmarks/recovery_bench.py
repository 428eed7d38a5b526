"""Recovery time vs recompute: one request with a long live context loses a rank's KV mid-decode;
GhostServe rebuilds it from parity. Compared with the time the same SGLang server takes to prefill the
same tokens (what recovering without parity costs), measured in the same run on the same server."""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ghostserve_sglang.testing.local_server import launched  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--code", default="xor")
    parser.add_argument("--context", type=int, default=2048, help="prompt tokens of the request")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ghost = ["--ghost-code", args.code, "--ghost-enable-fault-injection", "1", "--ghost-max-restarts", "0"]
    rng = random.Random(0)
    prefill, rebuild, rebuilt_slots = [], [], []
    with tempfile.TemporaryDirectory() as logs, launched(args.tp, ghost, log_dir=logs,
                                                         max_total_tokens=4 * args.context) as server:
        server.generate([5] * 64, 4)  # warm-up
        for _ in range(args.rounds):
            prompt = [rng.randrange(3, 1000) for _ in range(args.context)]
            server.flush_cache()
            started = time.perf_counter()
            server.generate(prompt, 1)  # prefill of the whole context, and one token
            prefill.append(time.perf_counter() - started)
            server.flush_cache()
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                step = server.control("status")["ranks"][0]["step"]
                future = pool.submit(server.generate, prompt, 256)
                while server.control("status")["ranks"][0]["step"] < step + 8:  # decoding by now
                    time.sleep(0.005)
                reply = server.control("inject-fault", ranks=[args.tp - 1])
                future.result()
            rebuild.append(reply["recovery"]["seconds"])
            rebuilt_slots.append(reply["recovery"]["slots_rebuilt"])
            assert reply["recovery"]["outcome"] == "rebuilt", reply
    p, r = statistics.median(prefill), statistics.median(rebuild)
    print(f"command: python benchmarks/recovery_bench.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"TP={args.tp} {args.code}, one request, {args.context}-token prompt, rank {args.tp - 1} lost "
          f"mid-decode; {min(rebuilt_slots)}-{max(rebuilt_slots)} live slots rebuilt; "
          f"median of {args.rounds}\n")
    print("| recovery | seconds | ratio to prefill |")
    print("|---|---:|---:|")
    print(f"| prefill the same tokens again (SGLang, the recompute baseline) | {p:.4f} | 1.000 |")
    print(f"| rebuild from parity (GhostServe) | {r:.4f} | {r / p:.3f} |")


if __name__ == "__main__":
    main()
