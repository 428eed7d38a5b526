"""Host time of each part of one capture step on a GPU (no synchronisation: what the scheduler and
worker threads spend issuing the step), for one rank's real Protector on a stand-in pool.

    python benchmarks/capture_host_time.py [--shape llama-70b] [--ranks 8] [--tokens 64] [--code xor]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from ghostserve_sglang.testing.rig import make_protector, stop  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run
SHAPES = {"llama-8b": (32, 8, 128), "llama-70b": (80, 8, 128), "tiny": (2, 4, 16)}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def per_call_us(fn, calls: int = 200) -> float:
    fn()
    sync()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    spent = time.perf_counter() - started
    sync()
    return spent / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="llama-70b")
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--code", default="xor")
    args = parser.parse_args()
    layers, heads, dim = SHAPES[args.shape]
    p = make_protector(DEVICE, slots=4096, heads=max(1, heads // args.ranks), head_dim=dim, layers=layers,
                       dtype=torch.bfloat16, pool="standin", ranks=args.ranks, code=args.code,
                       staging_mib="1024")
    try:
        slots = p.allocator.alloc(args.tokens)
        columns = p.kv.gather_columns(slots, *p.cut)
        records = p.encoder.encode(columns)
        whole = per_call_us(lambda: p.record_write(slots))  # the scheduler thread's side of a step
        p.call(lambda: None)
        p.drain.flush()
        step = [p.step + 10**6]

        def submit():
            step[0] += 1
            p.drain.submit(step[0], slots, records, time.monotonic())

        def event():
            if DEVICE == "cuda":
                torch.cuda.Event().record()

        parts = {
            "record_write (the whole scheduler-thread side)": lambda: whole,
            "written.index_fill_": lambda: p.written.index_fill_(0, slots, True),
            "gather_columns (Triton)": lambda: p.kv.gather_columns(slots, *p.cut),
            "slots.clone()": slots.clone,
            "cuda event + record": event,
            "metrics add": lambda: p.metrics.add("ghostserve_steps_captured_total"),
            "metrics observe": lambda: p.metrics.capture_seconds.observe(1e-4),
            "exchange (emulated)": lambda: p.all_to_all(columns),
            "encode (Triton)": lambda: p.encoder.encode(columns),
            "drain.submit": submit,
        }
        print(f"command: python {' '.join(sys.argv)}")
        print(f"{args.shape} N={args.ranks} {args.code}, {args.tokens} slots a step; host us a call")
        for name, fn in parts.items():
            spent = whole if name.startswith("record_write") else per_call_us(fn)
            print(f"| {name} | {spent:.1f} |", flush=True)
            p.drain.flush()
    finally:
        stop(p)


if __name__ == "__main__":
    main()
