"""Drain throughput into the host store next to memcpy, and watermark lag at a given producer rate.

    python benchmarks/drain_bench.py [--rate 200] [--slots-per-step 64] [--seconds 3]

Throughput: steps of parity rows are submitted as fast as the drain takes them and flushed; the bytes
that became durable per second are compared with ``dst.copy_(src)`` of the same rows, measured in the
same run. Lag: steps are submitted at ``--rate`` steps per second and the watermark's lag behind the
last submitted step is sampled after every submit (p50/p99, in steps and seconds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid

import torch

from ghostserve_sglang.store import ParityDrain, ParitySegment, StoreGeometry

# One rank's shard of a Llama-8B-like pool (32 layers, 8 KV heads of 128 bf16 over 2 ranks), xor.
GEOMETRY = StoreGeometry("xor", 2, 1, "bfloat16", 4, 128, 32, 4096)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200.0, help="producer steps per second for the lag run")
    parser.add_argument("--slots-per-step", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each run")
    args = parser.parse_args(argv)
    print(f"command: python {' '.join(sys.argv)}")
    record = GEOMETRY.record_bytes
    n = args.slots_per_step
    print(f"geometry: {GEOMETRY.code} N={GEOMETRY.ranks} m={GEOMETRY.parity_shards}, {record} parity "
          f"bytes per slot, {n} slots per step ({n * record / 2**20:.2f} MiB per step)")

    segment = ParitySegment.create(f"bench-{uuid.uuid4().hex[:8]}", 0, GEOMETRY, ring_entries=16 * n)
    try:
        drain = ParityDrain(segment).start()
        rows = torch.randint(0, 256, (n, record), dtype=torch.uint8)
        gen = torch.Generator().manual_seed(0)
        step, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            step += 1
            drain.submit(step, torch.randperm(GEOMETRY.slots, generator=gen)[:n], rows)
        drain.flush()
        elapsed = time.perf_counter() - start
        drained = drain.counters().bytes_drained
        # The baseline writes the same rows over a buffer as large as the store's table, so that
        # neither side is flattered by the CPU caches.
        dst = torch.empty((GEOMETRY.slots // n, n, record), dtype=torch.uint8)
        start = time.perf_counter()
        for copy in range(step):
            dst[copy % len(dst)].copy_(rows)
        memcpy = step * rows.numel() / (time.perf_counter() - start)
        print(f"\nthroughput: {drained / elapsed / 1e9:.2f} GB/s durable vs memcpy {memcpy / 1e9:.2f} GB/s "
              f"of the same rows: ratio {drained / elapsed / memcpy:.3f} ({step} steps)")

        lag_steps: list[float] = []
        lag_seconds: list[float] = []
        period = 1.0 / args.rate
        first = step + 1
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            step += 1
            drain.submit(step, torch.randperm(GEOMETRY.slots, generator=gen)[:n], rows)
            counters = drain.counters()
            lag_steps.append(counters.lag_steps)
            lag_seconds.append(counters.lag_seconds)
            time.sleep(max(0.0, start + (step - first + 1) * period - time.perf_counter()))
        achieved = (step - first + 1) / (time.perf_counter() - start)
        drain.stop()
        counters = drain.counters()
        print(f"lag at {achieved:.0f} steps/s ({achieved * n * record / 1e9:.2f} GB/s of parity): "
              f"p50 {percentile(lag_steps, 0.5):.0f} steps / {percentile(lag_seconds, 0.5) * 1e3:.2f} ms, "
              f"p99 {percentile(lag_steps, 0.99):.0f} steps / {percentile(lag_seconds, 0.99) * 1e3:.2f} ms, "
              f"mean {statistics.fmean(lag_steps):.2f} steps; "
              f"stalls {counters.stalls}, drops {counters.drops} (both runs)")
    finally:
        segment.close(unlink=True)


if __name__ == "__main__":
    main()
