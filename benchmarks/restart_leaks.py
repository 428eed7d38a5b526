"""Repeated process deaths in one server: kill a random rank's scheduler process (rank 0 included) N
times in a row with ``kill -9`` (each time followed by a short workload served once the replacement has
joined), and compare the server's processes, open file descriptors, /dev/shm entries and resident memory
before, during and after, per process role."""

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

from ghostserve_sglang.testing.campaign import generate_mix, request_mix  # noqa: E402
from ghostserve_sglang.testing.local_server import launched  # noqa: E402


def role(process: psutil.Process, root: psutil.Process) -> str:
    if process.pid == root.pid:
        return "main"
    name = process.name()
    return name.removeprefix("sglang::") if name.startswith("sglang::") else "other"


def footprint(server) -> dict:
    root = psutil.Process(server.process.pid)
    tree = [root, *root.children(recursive=True)]
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    roles: dict[str, dict] = {}
    for p in alive:
        entry = roles.setdefault(role(p, root), {"processes": 0, "fds": 0, "rss_mib": 0.0})
        entry["processes"] += 1
        entry["fds"] += p.num_fds()
        entry["rss_mib"] += p.memory_info().rss / 2**20
    return {"roles": roles, "shm": sorted(os.listdir("/dev/shm"))}


def total(sample: dict, key: str) -> float:
    return sum(r[key] for r in sample["roles"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=30)
    args = parser.parse_args()
    ghost = ["--ghost-code", "xor", "--ghost-enable-fault-injection", "1", "--ghost-max-restarts", "0"]
    rng = random.Random(7)
    samples = []
    with tempfile.TemporaryDirectory() as logs, launched(2, ghost, log_dir=logs) as server:
        generate_mix(server, request_mix(rng))  # warm: first-use allocations are not leaks
        samples.append((0, footprint(server)))
        started = time.monotonic()
        for i in range(args.kills):
            ranks = server.control("status")["ranks"]
            rank = rng.randrange(len(ranks))
            os.kill(ranks[rank]["pid"], signal.SIGKILL)
            generate_mix(server, request_mix(rng, requests=4))  # served once the replacement joined
            restarts = server.control("status")["ranks"][rank]["restarts"]
            assert restarts == ranks[rank]["restarts"] + 1, (i, restarts)
            print(f"kill {i + 1}/{args.kills}: rank {rank} replaced (restarts {restarts})", flush=True)
            if (i + 1) % 10 == 0:
                server.flush_cache()
                time.sleep(2)
                samples.append((i + 1, footprint(server)))
        elapsed = time.monotonic() - started
    before, after = samples[0][1], samples[-1][1]
    print(f"\ncommand: python benchmarks/restart_leaks.py --kills {args.kills}")
    print(f"{args.kills} kill -9 of a random rank (0 or 1) in one TP=2 xor server ({elapsed:.0f} s)\n")
    print("| after kills | processes | fds | RSS MiB | /dev/shm entries | " +
          " | ".join(f"{r} fds / RSS MiB" for r in sorted(before["roles"])) + " |")
    print("|---:|---:|---:|---:|---:|" + "---:|" * len(before["roles"]))
    for kills, sample in samples:
        per_role = [sample["roles"].get(r, {"fds": 0, "rss_mib": 0.0}) for r in sorted(before["roles"])]
        print(f"| {kills} | {total(sample, 'processes'):.0f} | {total(sample, 'fds'):.0f} | "
              f"{total(sample, 'rss_mib'):.0f} | {len(sample['shm'])} | "
              + " | ".join(f"{r['fds']} / {r['rss_mib']:.0f}" for r in per_role) + " |")
    added = sorted(set(after["shm"]) - set(before["shm"]))
    removed = sorted(set(before["shm"]) - set(after["shm"]))
    print(f"\n/dev/shm: {len(added)} entries added {added}, {len(removed)} removed {removed}")
    if len(samples) > 2:
        first, last = samples[1], samples[-1]
        per = (total(last[1], "rss_mib") - total(first[1], "rss_mib")) / (last[0] - first[0])
        fds = (total(last[1], "fds") - total(first[1], "fds")) / (last[0] - first[0])
        print(f"from kill {first[0]} to kill {last[0]}: {per:+.2f} MiB RSS and {fds:+.2f} fds per restart")


if __name__ == "__main__":
    main()
