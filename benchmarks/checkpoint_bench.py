"""The checkpoint path at a real model's scale on one device, against replicate.

N ranks' KV pools are emulated on this one device. Per step, every rank's written slots are gathered
(capture); for xor and rs their columns are exchanged between the emulated ranks (device copies, where
a real TP group uses NCCL), encoded, and the parity copied into pinned host memory (drain); replicate
copies every rank's whole rows to host instead, N/m times the bytes over the host link. Each phase is
timed on its own (synchronized), then the whole path; the last column is replicate's whole-path time
over the code's (the paper reports about 2.7x at N = 4 for xor).

    python benchmarks/checkpoint_bench.py --device cuda [--tokens 2048] [--repeats 10]
    python benchmarks/checkpoint_bench.py --device cpu --shapes tiny --ranks 2 --tokens 64   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from ghostserve_sglang.codec import new_code  # noqa: E402
from ghostserve_sglang.sglang.kv import KVView  # noqa: E402
from ghostserve_sglang.sglang.protector import cut_columns  # noqa: E402
from ghostserve_sglang.store.geometry import StoreGeometry  # noqa: E402

SHAPES = {"llama-8b": (32, 8, 128), "llama-70b": (80, 8, 128), "tiny": (2, 4, 16)}  # layers, KV heads, dim
METHODS = (("replicate", 0), ("xor", 1), ("rs", 2))


class Rank:
    """One emulated rank: its KV pool share and its pinned host target."""

    def __init__(self, layers: int, heads: int, dim: int, tokens: int, device: str, seed: int) -> None:
        generator = torch.Generator(device=device).manual_seed(seed)
        buffers = [[torch.randint(-9, 9, (tokens + 1, heads, dim), dtype=torch.int16, device=device,
                                  generator=generator).view(torch.bfloat16) for _ in range(layers)]
                   for _ in range(2)]
        self.kv = KVView(types.SimpleNamespace(k_buffer=buffers[0], v_buffer=buffers[1]))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def one_step(ranks: list[Rank], slots: torch.Tensor, code: str, m: int, host: list[torch.Tensor],
             device: str, phases: dict[str, list[float]] | None) -> None:
    """Capture, exchange, encode and drain one step for every emulated rank."""
    marks = [time.perf_counter()]

    def mark(name: str) -> None:
        if phases is not None:
            sync(device)
            marks.append(time.perf_counter())
            phases.setdefault(name, []).append(marks[-1] - marks[-2])

    n = len(ranks)
    rows = [rank.kv.gather(slots) for rank in ranks]  # [T, L, W] each
    mark("capture")
    if code == "replicate":
        for rank_rows, target in zip(rows, host):
            target.copy_(rank_rows.view(len(slots), -1), non_blocking=True)
        mark("drain")
        return
    t, layers, width = rows[0].shape
    sends = [cut_columns(r, n, -(-width // n)) for r in rows]  # as each rank cuts them for the exchange
    received = [torch.stack([sends[i][j] for i in range(n)]) for j in range(n)]  # rank j gets column j
    mark("exchange")
    codec = new_code(code, n, m, backend="triton" if device == "cuda" else "torch")
    parity = [torch.stack(codec.encode(list(r.unbind(0))), dim=2) for r in received]  # [T, L, m, c]
    mark("encode")
    for p, target in zip(parity, host):
        target.copy_(p.view(t, -1), non_blocking=True)
    mark("drain")


def bench(shape: str, n: int, tokens: int, repeats: int, device: str) -> list[dict]:
    layers, heads, dim = SHAPES[shape]
    ranks = [Rank(layers, max(1, heads // n), dim, tokens, device, seed=r) for r in range(n)]
    slots = torch.randperm(tokens, device=device) + 1
    results = []
    for code, m in METHODS:
        if code == "rs" and m >= n:
            continue
        geometry = StoreGeometry(code, n, n if code == "replicate" else m, "bfloat16", max(1, heads // n),
                                 dim, layers, tokens + 1)
        host = [torch.empty((tokens, geometry.record_bytes), dtype=torch.uint8,
                            pin_memory=device == "cuda") for _ in range(n)]
        phases: dict[str, list[float]] = {}
        for _ in range(2):
            one_step(ranks, slots, code, m, host, device, None)  # warm-up: kernels compiled, caches hot
        for _ in range(repeats):
            one_step(ranks, slots, code, m, host, device, phases)
        whole = []
        for _ in range(repeats):
            sync(device)
            started = time.perf_counter()
            one_step(ranks, slots, code, m, host, device, None)
            sync(device)
            whole.append(time.perf_counter() - started)
        results.append({"shape": shape, "ranks": n, "code": code if code != "rs" else f"rs m={m}",
                        "host_bytes": n * tokens * geometry.record_bytes,
                        "phases": {k: statistics.median(v) for k, v in phases.items()},
                        "seconds": statistics.median(whole)})
    base = next(r["seconds"] for r in results if r["code"] == "replicate")
    for r in results:
        r["replicate_over_this"] = base / r["seconds"]
    del ranks
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="llama-8b,llama-70b")
    parser.add_argument("--ranks", default="2,4,8")
    parser.add_argument("--tokens", type=int, default=2048, help="slots written per step")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    print(f"command: python {' '.join(sys.argv)}")
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}")
    print(f"{args.tokens} slots written per step, bf16 KV; median of {args.repeats} steps\n")
    print("| shape | N | code | host MiB/step | capture ms | exchange ms | encode ms | drain ms | "
          "whole ms | replicate / this |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        for n in (int(x) for x in args.ranks.split(",")):
            for r in bench(shape, n, args.tokens, args.repeats, args.device):
                phases = " | ".join(f"{r['phases'].get(name, 0.0) * 1e3:.2f}"
                                    for name in ("capture", "exchange", "encode", "drain"))
                print(f"| {r['shape']} | {r['ranks']} | {r['code']} | {r['host_bytes'] / 2**20:.1f} | "
                      f"{phases} | {r['seconds'] * 1e3:.2f} | {r['replicate_over_this']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
