"""The checkpoint path at a real model's scale on one device: GhostServe's own ``Protector`` (capture,
the worker's exchange and encode, the drain's staging copy), xor and rs against replicate.

One rank of an N-rank TP group runs its real ``Protector`` on a pool shaped like its share of the model
(stand-in tensors where SGLang is not installed); its N - 1 peers are emulated, so the column exchange
is a device copy of the bytes a real all-to-all would receive. Per configuration:

- ``step ms``: the steady cost of one step, ``--steps`` steps issued back to back by the scheduler
  thread, until the last one's parity has landed in the pinned host staging ring (divided by the steps);
- ``latency ms``: one step alone, from the capture call until its parity is in host staging;
- ``host ms``: host time per step on the scheduler thread (capture) plus the worker thread;
- ``floor ms``: in the same run, what the step cannot go below: a device-to-host copy of its parity
  bytes into pinned memory plus one device read (copy) of the rows it protects;
- ``replicate / this``: replicate's step ms over this code's.

    python benchmarks/checkpoint_bench.py --device cuda [--tokens 64,2048]
    python benchmarks/checkpoint_bench.py --device cpu --shapes tiny --ranks 2 --tokens 64   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from ghostserve_sglang.testing.rig import make_protector, stop  # noqa: E402

SHAPES = {"llama-8b": (32, 8, 128), "llama-70b": (80, 8, 128), "tiny": (2, 4, 16)}  # layers, KV heads, dim
METHODS = (("replicate", 0), ("xor", 1), ("rs", 2))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def staged(p, device: str) -> None:
    """Until every step captured so far is in host staging: the worker has handed it to the drain
    (its stream synchronised), and the drain's copies have landed."""
    p.call(lambda: None)
    sync(device)


def timed(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def floor_seconds(p, slots: torch.Tensor, repeats: int, device: str) -> float:
    """A D2H copy of one step's parity bytes into pinned memory plus one device copy of its rows."""
    n = len(slots)
    records = torch.empty((n, p.geometry.record_bytes), dtype=torch.uint8, device=device)
    host = torch.empty_like(records, device="cpu", pin_memory=device == "cuda")
    rows = torch.empty((n, p.kv.slot_bytes), dtype=torch.uint8, device=device)
    copy = torch.empty_like(rows)
    return (timed(lambda: host.copy_(records, non_blocking=True), repeats, device)
            + timed(lambda: copy.copy_(rows), repeats, device))


def measure(p, tokens: int, steps: int, repeats: int, device: str) -> dict:
    slots = p.allocator.alloc(tokens)
    for _ in range(3):  # warm-up: kernels compiled, caches hot
        p.record_write(slots)
    staged(p, device)
    p.drain.flush()

    def one_step():
        p.record_write(slots)
        staged(p, device)

    capture = [0.0]  # host time of the scheduler thread's capture calls

    def many_steps():
        for _ in range(steps):
            started = time.perf_counter()
            p.record_write(slots)
            capture[0] += time.perf_counter() - started
        staged(p, device)

    latency = timed(one_step, repeats, device)
    p.drain.flush()
    before = dict(p.seconds)  # the worker thread's host time
    pipelined = []
    for _ in range(repeats):
        pipelined.append(timed(many_steps, 1, device) / steps)
        p.drain.flush()
    host = (capture[0] + p.seconds["worker"] - before["worker"]) / (steps * repeats)
    return {"host_bytes": tokens * p.geometry.record_bytes, "step": statistics.median(pipelined),
            "latency": latency, "host": host, "floor": floor_seconds(p, slots, repeats, device)}


def bench(shape: str, n: int, tokens: int, steps: int, repeats: int, device: str) -> list[dict]:
    layers, heads, dim = SHAPES[shape]
    heads = max(1, heads // n)
    row_bytes = layers * 2 * heads * dim * 2  # one slot's K and V over every layer, bf16
    results = []
    for code, m in METHODS:
        if code == "rs" and m >= n:
            continue
        record_bytes = row_bytes if code == "replicate" else layers * m * -(-(row_bytes // layers) // n)
        p = make_protector(device, slots=tokens, heads=heads, head_dim=dim, layers=layers,
                           dtype=torch.bfloat16, pool="standin", ranks=n, code=code,
                           parity_shards=str(max(m, 1)),
                           staging_mib=str(-(-(steps + 1) * tokens * record_bytes // 2**20) + 1),
                           capture_queue_mib=str(-(-(steps + 1) * tokens * 2 * row_bytes // 2**20)))
        try:
            result = measure(p, tokens, steps, repeats, device)
        finally:
            stop(p)
        results.append({"shape": shape, "ranks": n, "code": code if code != "rs" else f"rs m={m}",
                        **result})
    base = next(r["step"] for r in results if r["code"] == "replicate")
    for r in results:
        r["replicate_over_this"] = base / r["step"]
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="llama-8b,llama-70b")
    parser.add_argument("--ranks", default="4,8")
    parser.add_argument("--tokens", default="64,2048", help="slots written per step (comma-separated)")
    parser.add_argument("--steps", type=int, default=0, help="steps back to back (0: 32 at up to 256 "
                        "tokens, else 4)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"command: python {' '.join(sys.argv)}")
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"bf16 KV, one rank's Protector with N - 1 emulated peers; median of {args.repeats}\n")
    print("| shape | N | tokens | code | host MiB/step | step ms | latency ms | host ms | floor ms | "
          "step / floor | replicate / this |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for tokens in (int(t) for t in args.tokens.split(",")):
        steps = args.steps or (32 if tokens <= 256 else 4)
        for shape in args.shapes.split(","):
            for n in (int(x) for x in args.ranks.split(",")):
                for r in bench(shape, n, tokens, steps, args.repeats, args.device):
                    ms = {k: r[k] * 1e3 for k in ("step", "latency", "host", "floor")}
                    print(f"| {r['shape']} | {r['ranks']} | {tokens} | {r['code']} | "
                          f"{r['host_bytes'] / 2**20:.2f} | {ms['step']:.3f} | {ms['latency']:.3f} | "
                          f"{ms['host']:.3f} | {ms['floor']:.3f} | {r['step'] / r['floor']:.2f} | "
                          f"{r['replicate_over_this']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
