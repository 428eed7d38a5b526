"""Codec throughput next to memcpy, measured in one run.

For every available backend, geometry and shard size, prints encode and rebuild throughput in GB/s of
input bytes (data_shards x shard size) and the same figure for ``dst.copy_(src)`` of those input bytes
into a preallocated buffer, with the ratio. Rebuild loses the first parity_shards data shards.

    python benchmarks/codec_bench.py [--device cpu|cuda] [--sizes 64KiB,1MiB] [--backends isal,torch]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from functools import partial

import torch

from ghostserve_sglang.codec import available_backends, new_code

GEOMETRIES = [("xor", k, 1) for k in (2, 4, 8)] + [("rs", k, m) for k in (2, 4, 8) for m in (1, 2)]
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_size(text: str) -> int:
    for unit, scale in UNITS.items():
        if text.endswith(unit):
            return int(text[: -len(unit)]) * scale
    raise argparse.ArgumentTypeError(f"size {text!r} is not allowed; use a number with KiB, MiB or GiB")


def size_name(nbytes: int) -> str:
    for unit, scale in reversed(UNITS.items()):
        if nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


def seconds_per_call(fn, device: torch.device, min_seconds: float) -> float:
    """Median wall time of one call, over at least 3 calls and ``min_seconds`` of calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times: list[float] = []
    while len(times) < 3 or sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(device: torch.device, sizes: list[int], backends: list[str], min_seconds: float) -> list[dict]:
    rows = []
    for size in sizes:
        for k in sorted({g[1] for g in GEOMETRIES}):
            src = torch.randint(0, 256, (k, size), dtype=torch.uint8, device=device)
            input_bytes = k * size
            memcpy = input_bytes / seconds_per_call(partial(torch.empty_like(src).copy_, src), device,
                                                    min_seconds)
            data = list(src)
            for code_name, data_shards, parity_shards in (g for g in GEOMETRIES if g[1] == k):
                for backend in backends:
                    code = new_code(code_name, data_shards, parity_shards, backend=backend)
                    parity = list(torch.empty((parity_shards, size), dtype=torch.uint8, device=device))
                    code.encode(data, out=parity)
                    ops = {
                        "encode": partial(code.encode, data, out=parity),
                        "rebuild": partial(code.reconstruct, data + parity, missing=range(parity_shards)),
                    }
                    for op, fn in ops.items():
                        speed = input_bytes / seconds_per_call(fn, device, min_seconds)
                        rows.append({
                            "name": f"{op}-{code}-{size_name(size)}", "backend": backend,
                            "gbps": speed / 1e9, "memcpy_gbps": memcpy / 1e9, "ratio": speed / memcpy,
                        })
                        print(f"  {rows[-1]['name']:<26} {backend:<7} {speed / 1e9:7.2f} GB/s "
                              f"(memcpy {memcpy / 1e9:.2f}, ratio {speed / memcpy:.2f})", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="64KiB,256KiB,1MiB,4MiB,16MiB",
                        type=lambda s: [parse_size(x) for x in s.split(",")])
    parser.add_argument("--backends", default=None, type=lambda s: s.split(","),
                        help="comma-separated; default: every backend available on the device")
    parser.add_argument("--min-seconds", type=float, default=0.3, help="time spent per measurement")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    # Triton on a CPU is its interpreter, a testing aid ~100x slower than torch: not worth timing.
    interpreted = {"triton"} if device.type == "cpu" else set()
    backends = args.backends or [b for b in available_backends(device) if b not in interpreted]
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, device {device}, "
          f"torch {torch.__version__}")
    rows = run(device, args.sizes, backends, args.min_seconds)
    print("\n| benchmark | backend | GB/s | memcpy GB/s | ratio |\n|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['name']} | {row['backend']} | {row['gbps']:.2f} | {row['memcpy_gbps']:.2f} "
              f"| {row['ratio']:.2f} |")


if __name__ == "__main__":
    main()
