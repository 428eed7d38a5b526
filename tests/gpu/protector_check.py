"""Device check: GhostServe's real ``Protector`` (capture, worker, codec, drain, host store) on a
protected pool under load, on stand-in pool and allocator tensors (no SGLang needed).

A scheduler-like loop allocates requests (prefills of up to 2048 slots, then decode steps of one slot
per running request), writes random KV into their slots on the current stream, captures each step and
frees finished requests, for a few hundred steps. Then:

1. ``replicate``, TP=1: a scrub (after the drain) finds every live slot's host copy equal to its KV;
   a fault destroys the pool and the rebuild restores every live slot's bytes;
2. ``xor`` and ``rs`` (rank 0 of 4, peers emulated): the host records of every live slot equal the CPU
   path's encode of the same columns (Triton gather and encode against torch), and none is missing.

One PASS/FAIL line per check, with steps per second; exits 1 when any fails.

    python tests/gpu/protector_check.py [--device cpu]   # cpu: a smoke run of the same checks
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ghostserve_sglang.drills import kv as kv_drills
from ghostserve_sglang.sglang.protection import reporting
from ghostserve_sglang.sglang.protection.column_encoder import ColumnEncoder  # noqa: E402
from ghostserve_sglang.sglang.protection.scrub import scrub as scrub_parity
from ghostserve_sglang.testing.rig import fill, make_protector, stop  # noqa: E402

DEVICE = "cpu" if "--device" in sys.argv and sys.argv[-1] == "cpu" else "cuda"
SHAPE = {"slots": 32768, "heads": 8, "head_dim": 128, "layers": 32, "dtype": torch.bfloat16}


def load(p, steps: int = 300, seed: int = 0) -> float:
    """Run a scheduler-like load through ``p``; returns steps per second."""
    rng = random.Random(seed)
    running: list[list[torch.Tensor]] = []
    started = time.perf_counter()
    for step in range(steps):
        if len(running) < 16 and rng.random() < 0.3:  # a prefill
            slots = p.allocator.alloc(rng.randrange(16, 2048))
            if slots is not None:
                running.append([slots])
                fill(p, slots, seed=step)
                p.record_write(slots)
                continue
        if running:  # a decode step: one slot per running request
            new = [p.allocator.alloc(1) for _ in running]
            if any(s is None for s in new):
                new = []
            for request, slot in zip(running, new):
                request.append(slot)
            if new:
                written = torch.cat(new)
                fill(p, written, seed=step)
                p.record_write(written)
        finished = [rng.random() < 0.05 for _ in running]
        for request in (r for r, done in zip(running, finished) if done):
            freed = torch.cat(request)
            p.on_free(freed)
            p.allocator.free(freed)
        running = [r for r, done in zip(running, finished) if not done]
    p.call(lambda: p.drain.flush())
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - started)


def replicate_under_load() -> tuple[bool, str]:
    p = make_protector(DEVICE, pool="standin", code="replicate", **SHAPE)
    try:
        rate = load(p)
        scrub = p.call(lambda: scrub_parity(p))
        live = p.coverage()[0]
        before = p.kv.gather(live).clone()
        p.call(lambda: kv_drills.inject(p, [0]))
        destroyed = not torch.equal(p.kv.gather(live), before)
        recovery = p.recover(None, [0])
        restored = torch.equal(p.kv.gather(live), before)
        errors = p.call(lambda: reporting.status(p, 0))["ranks"][0]["errors"]
    finally:
        stop(p)
    ok = (scrub["mismatching"] == 0 and scrub["not_durable"] == 0 and scrub["matching"] == len(live) > 0
          and destroyed and restored and recovery["outcome"] == "rebuilt" and errors == 0)
    return ok, (f"{rate:.0f} steps/s, {len(live)} live slots, scrub {scrub['matching']} matching, "
                f"rebuild {recovery['seconds'] * 1e3:.1f} ms")


def code_under_load(code: str, parity_shards: int) -> tuple[bool, str]:
    p = make_protector(DEVICE, pool="standin", code=code, parity_shards=str(parity_shards), ranks=4,
                       **SHAPE)
    try:
        rate = load(p)
        live = p.coverage()[0]
        stored = p.segment.read(live.cpu())
        columns = p.kv.gather_columns(live, *p.cut, use_triton=False).cpu()  # the emulated exchange
        want = ColumnEncoder(code, 4, parity_shards, torch.device("cpu")).encode(columns)
        errors = p.call(lambda: reporting.status(p, 0))["ranks"][0]["errors"]
    finally:
        stop(p)
    ok = bool(stored.usable.all()) and torch.equal(stored.parity, want) and errors == 0 and len(live) > 0
    return ok, f"{rate:.0f} steps/s, {len(live)} live slots, {int(stored.usable.sum())} records usable"


def main() -> int:
    assert DEVICE == "cpu" or torch.cuda.is_available(), "no CUDA device"
    failed = 0
    for name, check in (("replicate_under_load", replicate_under_load),
                        ("xor_under_load", lambda: code_under_load("xor", 1)),
                        ("rs_under_load", lambda: code_under_load("rs", 2))):
        ok, detail = check()
        failed += not ok
        print(f"{name}: {'PASS' if ok else 'FAIL'} ({detail})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
