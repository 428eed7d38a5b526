"""Device check: every hand-over between SGLang's stream and GhostServe's worker and drain streams is
ordered by an event, and a control request's device work is done when it answers. Each check delays
the producing stream with ``torch.cuda._sleep`` right before the producer's operations, so that a
consumer that does not wait reads memory not yet written; the results must be what they are without
the delay. The Protector runs on a stand-in pool and allocator (plain CUDA tensors; no SGLang needed).
One PASS/FAIL line per check; exits 1 when any fails.

    python tests/gpu/stream_check.py
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ghostserve_sglang.sglang.protection import reporting
from ghostserve_sglang.sglang.protection.scrub import scrub as scrub_parity
from ghostserve_sglang.store import ParityDrain, ParitySegment, StoreGeometry  # noqa: E402
from ghostserve_sglang.testing.rig import fill, make_protector, stop, written  # noqa: E402

DELAY = 200_000_000  # GPU cycles, about 0.1 s: far longer than the worker takes to run ahead


def record_write_waits_for_the_gather(p) -> bool:
    slots = p.allocator.alloc(512)
    fill(p, slots, seed=1)
    torch.cuda._sleep(DELAY)  # SGLang's stream is behind: the gather and the slot copy run late
    p.record_write(slots)
    scrub = p.call(lambda: scrub_parity(p))
    return scrub["mismatching"] == 0 and scrub["not_durable"] == 0 and scrub["matching"] >= 512


def free_waits_for_the_index_copy(p) -> bool:
    slots = written(p, 512, seed=2)
    p.call(lambda: p.drain.flush())
    freed, kept = slots[:256], slots[256:]
    torch.cuda._sleep(DELAY)
    p.on_free(freed)  # the copy of the indices runs late
    p.call(lambda: p.drain.flush())
    durable = set(p.segment.durable_slots().tolist())
    p.allocator.free(freed)
    return not durable & set(freed.tolist()) and set(kept.tolist()) <= durable


def control_answers_after_its_device_work(p) -> bool:
    slots = written(p, 256, seed=3)
    rows = torch.randint(0, 256, p.kv.gather(slots).shape, dtype=torch.uint8, device="cuda")

    def late_scatter():
        torch.cuda._sleep(DELAY)  # on the worker's stream
        p.kv.scatter(slots, rows)

    p.call(late_scatter)
    return torch.equal(p.kv.gather(slots), rows)  # on SGLang's stream, right after the answer


def submit_waits_for_the_encoder() -> bool:
    geometry = StoreGeometry("xor", 2, 1, "bfloat16", 8, 128, 32, 4096)
    segment = ParitySegment.create(f"gpu-{uuid.uuid4().hex[:8]}", 0, geometry, ring_entries=4096)
    try:
        drain = ParityDrain(segment).start()
        slots = torch.randperm(geometry.slots - 1)[:1024] + 1  # slot 0 is never stored
        parity = torch.empty((1024, geometry.record_bytes), dtype=torch.uint8, device="cuda")
        torch.cuda._sleep(DELAY)
        parity.random_(0, 256)  # produced late on this stream
        drain.submit(1, slots, parity)
        ok = drain.flush(60) and torch.equal(segment.read(slots).parity, parity.cpu())
        drain.stop()
        return ok
    finally:
        segment.close(unlink=True)


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    p = make_protector("cuda", slots=8192, heads=8, head_dim=128, layers=8, dtype=torch.bfloat16,
                       pool="standin")
    failed = 0
    try:
        for check in (record_write_waits_for_the_gather, free_waits_for_the_index_copy,
                      control_answers_after_its_device_work):
            ok = check(p)
            failed += not ok
            print(f"{check.__name__}: {'PASS' if ok else 'FAIL'}", flush=True)
        status = p.call(lambda: reporting.status(p, 0))["ranks"][0]
        print(f"worker errors: {status['errors']}")
        failed += status["errors"] != 0
    finally:
        stop(p)
    ok = submit_waits_for_the_encoder()
    failed += not ok
    print(f"submit_waits_for_the_encoder: {'PASS' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
