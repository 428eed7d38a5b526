"""Device check for the host store's GPU path (well under a minute): parity and slot ids produced on
the GPU are copied asynchronously (side stream, CUDA events) into the cudaHostRegister-ed shared-memory
ring, without the producer ever waiting on the device, drained into the table, and read back
byte-identical; rows for the padding slot 0 are never stored. Then the drain's durable rate against a
pinned device-to-host copy of the same bytes, in the same run, per thread count of the batch write.

    python tests/gpu/store_check.py [--threads 1,4,8]
"""

import argparse
import time
import uuid

import torch

from ghostserve_sglang.store import ParityDrain, ParitySegment, StoreGeometry
from ghostserve_sglang.store.drain import default_threads


def correctness(geometry: StoreGeometry) -> None:
    torch.cuda.set_sync_debug_mode("error")
    try:  # the check below is only as good as this mode: it must catch a synchronising copy
        torch.ones(1, device="cuda").cpu()
        raise AssertionError("torch's sync debug mode did not catch a synchronising copy")
    except RuntimeError:
        pass
    finally:
        torch.cuda.set_sync_debug_mode("default")
    segment = ParitySegment.create(f"gpu-{uuid.uuid4().hex[:8]}", 0, geometry, ring_entries=2048)
    try:
        drain = ParityDrain(segment).start()
        submitted = []
        for step in range(1, 201):
            # Slot ids on the device, as SGLang's out_cache_loc, with padded tokens' slot 0 among them;
            # every other step from the host, as before.
            slots = torch.randperm(geometry.slots - 1, device="cuda")[:256] + 1
            slots[::50] = 0
            if step % 2:
                slots = slots.cpu()
            parity = torch.randint(0, 256, (256, geometry.record_bytes), dtype=torch.uint8, device="cuda")
            torch.cuda.set_sync_debug_mode("error")  # a submit that waits on the device raises
            try:
                drain.submit(step, slots, parity)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            submitted.append((slots, parity))
        assert drain.flush(120), "drain did not catch up"
        drain.stop()
        expected = {}
        for slots, parity in submitted:
            for slot, row in zip(slots.tolist(), parity.cpu()):
                if slot != 0:
                    expected[slot] = row
        slots = torch.tensor(sorted(expected))
        result = segment.read(slots)
        assert result.usable.all() and not result.corrupt
        assert all(torch.equal(result.parity[i], expected[s]) for i, s in enumerate(slots.tolist()))
        assert int(segment.slot_steps[0]) == 0 and not segment.table[0].any(), "padding slot stored"
        counters = drain.counters()
        assert counters.pin_error == 0 and counters.pageable_copies == 0, counters
        drained_gb = counters.bytes_drained / 1e9
        print(f"ok: {counters.records_drained} records, {drained_gb:.2f} GB drained from the GPU, slot ids "
              "from the device on every other step, no submit waited on the device, padding never stored")
    finally:
        segment.close(unlink=True)


def drain_vs_pinned_memcpy(geometry: StoreGeometry, thread_counts: list[int], steps: int = 400,
                           rows: int = 256, ring_steps: int = 50) -> None:
    """D2H drain throughput (GPU parity and slot ids -> durable in the host table) vs a plain pinned
    D2H copy of the same bytes, in the same run. The ring holds a quarter of the steps, so the drain
    runs in its steady state (the producer waits for room), over a table committed beforehand."""
    segment = ParitySegment.create(f"gpu-{uuid.uuid4().hex[:8]}", 0, geometry, ring_entries=ring_steps * rows)
    try:
        segment.table.fill_(0)
        parities = [torch.randint(0, 256, (rows, geometry.record_bytes), dtype=torch.uint8, device="cuda")
                    for _ in range(4)]
        gb = steps * parities[0].numel() / 1e9
        pinned = torch.empty_like(parities[0], device="cpu").pin_memory()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for step in range(steps):
            pinned.copy_(parities[step % 4], non_blocking=True)
        torch.cuda.synchronize()
        copy_rate = gb / (time.perf_counter() - started)
        step = 0
        for threads in thread_counts:
            drain = ParityDrain(segment, threads=threads).start()
            slot_sets = [torch.randperm(geometry.slots - 1, device="cuda")[:rows] + 1 for _ in range(16)]
            torch.cuda.synchronize()
            started, submit_s = time.perf_counter(), 0.0
            for _ in range(steps):
                step += 1
                before = time.perf_counter()
                drain.submit(step, slot_sets[step % 16], parities[step % 4])
                submit_s += time.perf_counter() - before
            assert drain.flush(120)
            drain_s = time.perf_counter() - started
            counters = drain.counters()
            drain.stop()
            rate = counters.bytes_drained / 1e9 / drain_s
            plural = "s" if threads > 1 else ""
            print(f"drain {rate:.2f} GB/s durable with {threads} thread{plural} vs pinned "
                  f"D2H memcpy {copy_rate:.2f} GB/s: ratio {rate / copy_rate:.3f} ({gb:.2f} GB; the batch "
                  f"writes took {counters.write_seconds:.2f} s of {drain_s:.2f} s, the producer spent "
                  f"{submit_s:.2f} s in submit, stalled {counters.stall_seconds:.2f} s of it)")
    finally:
        segment.close(unlink=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default=",".join(map(str, sorted({1, default_threads()}))),
                        help="thread counts to measure (default: 1 and this host's default, "
                        f"{default_threads()})")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    geometry = StoreGeometry("rs", 4, 2, "bfloat16", 8, 128, 32, 8192)  # 64 KiB of parity per slot
    correctness(geometry)
    drain_vs_pinned_memcpy(geometry, [int(t) for t in args.threads.split(",")])


if __name__ == "__main__":
    main()
