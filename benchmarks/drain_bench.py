"""Drain throughput into the host store next to memcpy, its hold on the GIL, and watermark lag at a
given producer rate.

    python benchmarks/drain_bench.py [--rate 200] [--slots-per-step 64] [--seconds 3] [--threads 1,2]

Throughput: steps of parity rows are submitted as fast as the drain takes them and flushed; the bytes
that became durable per second are compared with ``dst.copy_(src)`` of the same rows, measured in the
same run, once with the records written from Python (as without a C compiler: a step at a time, the
CRC-32C computed with torch) and once per thread count by the native batch write (copy and CRC-32C in
one pass, the batch shared among that many threads). GIL: for each, a full staging ring is drained
while a pure-Python loop (a stand-in for SGLang's scheduler thread) runs beside it: how long the drain
takes, and how much of its speed the loop keeps.
Lag: steps are submitted at ``--rate`` steps per second and the watermark's lag behind the last
submitted step is sampled after every submit (p50/p99, in steps and seconds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid

import torch

from ghostserve_sglang.store import ParityDrain, ParitySegment, StoreGeometry, native
from ghostserve_sglang.store.drain import default_threads

# One rank's shard of a Llama-8B-like pool (32 layers, 8 KV heads of 128 bf16 over 2 ranks), xor.
GEOMETRY = StoreGeometry("xor", 2, 1, "bfloat16", 4, 128, 32, 4096)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def python_rate(stop: threading.Event) -> float:
    """Iterations per second of a pure-Python loop (a stand-in for SGLang's scheduler thread) until
    ``stop`` is set."""
    count, start = 0, time.perf_counter()
    while not stop.is_set():
        count += 1
    return count / (time.perf_counter() - start)


def loop_beside(work) -> tuple[float, float]:
    """Run ``work()`` while a Python loop runs in another thread: (seconds work took, loop rate)."""
    stop, rate = threading.Event(), []
    loop = threading.Thread(target=lambda: rate.append(python_rate(stop)))
    loop.start()
    started = time.perf_counter()
    work()
    elapsed = time.perf_counter() - started
    stop.set()
    loop.join()
    return elapsed, rate[0]


def slot_sets(rows: int, seed: int, count: int = 16) -> list[torch.Tensor]:
    """Random live slots (never the padding slot 0) for ``count`` steps, drawn before the clock starts
    so that the producer's own work does not cap the rate."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(GEOMETRY.slots - 1, generator=gen)[:rows] + 1 for _ in range(count)]


def throughput(segment: ParitySegment, rows: torch.Tensor, step: int, seconds: float, threads: int) -> tuple:
    """Submit steps as fast as a running drain takes them for ``seconds``, then flush: durable bytes
    per second, steps, and the last step."""
    drain, slots = ParityDrain(segment, threads=threads).start(), slot_sets(len(rows), 0)
    first, start = step, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step += 1
        drain.submit(step, slots[step % len(slots)], rows)
    drain.flush()
    rate = drain.counters().bytes_drained / (time.perf_counter() - start)
    drain.stop()
    return rate, step - first, step


def gil_share(segment: ParitySegment, rows: torch.Tensor, step: int, steps: int, threads: int) -> tuple:
    """Stage ``steps`` steps with the drain not yet running, then drain them beside a Python loop: the
    loop's iterations per second while the drain works, the seconds it took, and the last step."""
    drain, slots = ParityDrain(segment, threads=threads), slot_sets(len(rows), 1)
    for _ in range(steps):
        step += 1
        drain.submit(step, slots[step % len(slots)], rows)

    def work() -> None:
        drain.start()
        drain.flush()

    seconds, rate = loop_beside(work)
    drain.stop()
    return rate, seconds, step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200.0, help="producer steps per second for the lag run")
    parser.add_argument("--slots-per-step", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each run")
    parser.add_argument("--gil-steps", type=int, default=64, help="steps drained beside a busy Python "
                        "thread (64: the whole staging ring)")
    parser.add_argument("--threads", default=",".join(map(str, sorted({1, 2, default_threads()}))),
                        help="thread counts of the native batch write to measure, comma-separated "
                        f"(default: 1, 2 and this host's default, {default_threads()})")
    args = parser.parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",")]
    print(f"command: python {' '.join(sys.argv)}")
    record = GEOMETRY.record_bytes
    n = args.slots_per_step
    print(f"geometry: {GEOMETRY.code} N={GEOMETRY.ranks} m={GEOMETRY.parity_shards}, {record} parity "
          f"bytes per slot, {n} slots per step ({n * record / 2**20:.2f} MiB per step)")

    segment = ParitySegment.create(f"bench-{uuid.uuid4().hex[:8]}", 0, GEOMETRY, ring_entries=64 * n)
    try:
        rows = torch.randint(0, 256, (n, record), dtype=torch.uint8)
        segment.table.fill_(0)  # its pages committed before any run: none pays for first touches
        _, alone = loop_beside(lambda: time.sleep(args.seconds))
        step, results, built = 0, {}, native.library
        # The drain's record writes: from Python, a step per call (as on a machine without a C
        # compiler), or one native call per batch that releases the GIL, on 1..T threads.
        for path, library, threads in (("python", lambda: None, 1),
                                       *(("native", built, t) for t in thread_counts)):
            native.library = library
            rate, steps, step = throughput(segment, rows, step, args.seconds, threads)
            loop, seconds, step = gil_share(segment, rows, step, min(args.gil_steps, 64), threads)
            results[path, threads] = (rate, steps, loop, seconds)
        native.library = built
        # The baseline writes the same rows over a buffer as large as the store's table, so that
        # neither side is flattered by the CPU caches.
        dst = torch.zeros((GEOMETRY.slots // n, n, record), dtype=torch.uint8)
        dst.fill_(1)  # committed, as the table is
        copies = max(steps for _, steps, _, _ in results.values())
        start = time.perf_counter()
        for copy in range(copies):
            dst[copy % len(dst)].copy_(rows)
        memcpy = copies * rows.numel() / (time.perf_counter() - start)
        ring_mib = min(args.gil_steps, 64) * n * record / 2**20
        print(f"\na Python loop alone: {alone / 1e6:.2f} M iterations/s")
        for (path, threads), (rate, steps, loop, seconds) in results.items():
            plural = "s" if threads > 1 else ""
            print(f"{path} record writes: {threads} thread{plural}, {rate / 1e9:.2f} GB/s "
                  f"durable vs memcpy {memcpy / 1e9:.2f} GB/s of "
                  f"the same rows: ratio {rate / memcpy:.3f} ({steps} steps); beside a busy Python "
                  f"thread, draining {ring_mib:.0f} MiB of staged parity took {seconds:.2f} s "
                  f"({ring_mib / 1024 / seconds:.3f} GiB/s) and the thread kept {loop / alone:.2f} of "
                  "its speed")
        drain, gen = ParityDrain(segment).start(), torch.Generator().manual_seed(1)  # default threads
        lag_steps: list[float] = []
        lag_seconds: list[float] = []
        period = 1.0 / args.rate
        first = step + 1
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            step += 1
            drain.submit(step, torch.randperm(GEOMETRY.slots - 1, generator=gen)[:n] + 1, rows)
            counters = drain.counters()
            lag_steps.append(counters.lag_steps)
            lag_seconds.append(counters.lag_seconds)
            time.sleep(max(0.0, start + (step - first + 1) * period - time.perf_counter()))
        achieved = (step - first + 1) / (time.perf_counter() - start)
        drain.stop()
        counters = drain.counters()
        plural = "s" if drain.threads > 1 else ""
        print(f"lag ({drain.threads} thread{plural}) at {achieved:.0f} steps/s "
              f"({achieved * n * record / 1e9:.2f} GB/s of parity): "
              f"p50 {percentile(lag_steps, 0.5):.0f} steps / {percentile(lag_seconds, 0.5) * 1e3:.2f} ms, "
              f"p99 {percentile(lag_steps, 0.99):.0f} steps / {percentile(lag_seconds, 0.99) * 1e3:.2f} ms, "
              f"mean {statistics.fmean(lag_steps):.2f} steps; "
              f"stalls {counters.stalls}, drops {counters.drops}")
    finally:
        segment.close(unlink=True)


if __name__ == "__main__":
    main()
