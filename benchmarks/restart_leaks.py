"""Repeated process deaths in one server: kill rank 1's scheduler process N times in a row (each time
after a short workload, waiting for its replacement), and compare the server's processes, open file
descriptors, /dev/shm entries and resident memory before and after."""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ghostserve_sglang.campaign import generate_mix, request_mix  # noqa: E402
from ghostserve_sglang.local_server import launched  # noqa: E402


def footprint(server) -> dict:
    root = psutil.Process(server.process.pid)
    tree = [root, *root.children(recursive=True)]
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return {
        "processes": len(alive),
        "fds": sum(p.num_fds() for p in alive),
        "shm": sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"ghostserve-{server.port}")),
        "rss_mib": sum(p.memory_info().rss for p in alive) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=30)
    args = parser.parse_args()
    ghost = ["--ghost-code", "xor", "--ghost-enable-fault-injection", "1"]
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as logs, launched(2, ghost, log_dir=logs) as server:
        generate_mix(server, request_mix(rng))  # warm: first-use allocations are not leaks
        before = footprint(server)
        started = time.monotonic()
        for i in range(args.kills):
            ranks = server.control("status")["ranks"]
            os.kill(ranks[1]["pid"], signal.SIGKILL)
            generate_mix(server, request_mix(rng, requests=4))  # served once the replacement joined
            restarts = server.control("status")["ranks"][1]["restarts"]
            assert restarts == ranks[1]["restarts"] + 1, (i, restarts)
            print(f"kill {i + 1}/{args.kills}: rank 1 replaced (restarts {restarts})", flush=True)
        server.post("/flush_cache")
        time.sleep(2)
        after = footprint(server)
        elapsed = time.monotonic() - started
    print(f"\ncommand: python benchmarks/restart_leaks.py --kills {args.kills}")
    print(f"{args.kills} kill -9 of rank 1 in one TP=2 xor server ({elapsed:.0f} s)\n")
    print("| | before | after |")
    print("|---|---:|---:|")
    for key in ("processes", "fds", "rss_mib"):
        fmt = "{:.0f}" if key == "rss_mib" else "{}"
        print(f"| {key} | {fmt.format(before[key])} | {fmt.format(after[key])} |")
    print(f"| /dev/shm entries | {len(before['shm'])} | {len(after['shm'])} |")
    if before["shm"] != after["shm"]:
        print(f"\n/dev/shm before {before['shm']}\n/dev/shm after {after['shm']}")


if __name__ == "__main__":
    main()
