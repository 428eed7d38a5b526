"""Device check for the host store's GPU path (well under a minute): parity produced on the GPU is
copied asynchronously (side stream, CUDA events) into the cudaHostRegister-ed shared-memory ring, drained
into the table, and read back byte-identical.

    python tests/gpu/store_check.py
"""

import uuid

import torch

from ghostserve_sglang.store import ParityDrain, ParitySegment, StoreGeometry


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    geometry = StoreGeometry("rs", 4, 2, "bfloat16", 8, 128, 32, 8192)
    segment = ParitySegment.create(f"gpu-{uuid.uuid4().hex[:8]}", 0, geometry, ring_entries=2048)
    try:
        drain = ParityDrain(segment).start()
        expected = {}
        for step in range(1, 201):
            slots = torch.randperm(geometry.slots)[:256]
            parity = torch.randint(0, 256, (256, geometry.record_bytes), dtype=torch.uint8, device="cuda")
            drain.submit(step, slots, parity)
            for slot, row in zip(slots.tolist(), parity.cpu()):
                expected[slot] = row
        assert drain.flush(120), "drain did not catch up"
        drain.stop()
        slots = torch.tensor(sorted(expected))
        result = segment.read(slots)
        assert result.usable.all() and not result.corrupt
        assert all(torch.equal(result.parity[i], expected[s]) for i, s in enumerate(slots.tolist()))
        counters = drain.counters()
        drained_gb = counters.bytes_drained / 1e9
        print(f"ok: {counters.records_drained} records, {drained_gb:.2f} GB drained from the GPU")
    finally:
        segment.close(unlink=True)
    drain_vs_pinned_memcpy(geometry)


def drain_vs_pinned_memcpy(geometry: StoreGeometry, steps: int = 100, rows: int = 256) -> None:
    """D2H drain throughput (GPU parity -> durable in the host table) vs a plain pinned D2H copy of the
    same bytes, in the same run."""
    import time

    segment = ParitySegment.create(f"gpu-{uuid.uuid4().hex[:8]}", 0, geometry, ring_entries=steps * rows)
    try:
        drain = ParityDrain(segment).start()
        parity = torch.randint(0, 256, (rows, geometry.record_bytes), dtype=torch.uint8, device="cuda")
        slots = torch.arange(rows)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for step in range(1, steps + 1):
            drain.submit(step, slots, parity)
        drain.flush()
        drain_s = time.perf_counter() - started
        drain.stop()
        pinned = torch.empty_like(parity, device="cpu").pin_memory()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            pinned.copy_(parity, non_blocking=True)
        torch.cuda.synchronize()
        copy_s = time.perf_counter() - started
        gb = steps * parity.numel() / 1e9
        print(f"drain {gb / drain_s:.2f} GB/s durable vs pinned D2H memcpy {gb / copy_s:.2f} GB/s: "
              f"ratio {copy_s / drain_s:.3f} ({gb:.2f} GB)")
    finally:
        segment.close(unlink=True)


if __name__ == "__main__":
    main()
