"""Host parity store and drain, with plain processes (no SGLang)."""

import os
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import store_writer
import torch

from ghostserve_sglang.store import ParityDrain, ParitySegment, StoreError, StoreGeometry
from ghostserve_sglang.store.segment import OWNER_PID, WATERMARK, check_space

GEOMETRY = StoreGeometry("xor", 2, 1, "bfloat16", 6, 16, 2, 1024)


@pytest.fixture
def instance():
    """A fresh instance id; every segment it named is removed afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    for path in Path("/dev/shm").glob(f"ghostserve-{name}*"):
        path.unlink()


def rows(step: int, slots: torch.Tensor, geometry: StoreGeometry = GEOMETRY) -> torch.Tensor:
    return torch.randint(0, 256, (len(slots), geometry.record_bytes), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(step))


def test_record_size_is_m_over_n_of_the_kv_and_whole_kv_for_replicate():
    kv_bytes = 2 * 6 * 16 * 2  # K and V, 6 heads of 16 bf16 values, per slot per layer
    assert GEOMETRY.record_bytes == 2 * kv_bytes // 2  # two layers, m/N = 1/2
    assert StoreGeometry("rs", 4, 2, "bfloat16", 6, 16, 2, 8).record_bytes == 2 * 2 * kv_bytes // 4
    assert StoreGeometry("replicate", 4, 4, "bfloat16", 6, 16, 2, 8).record_bytes == 2 * kv_bytes


def test_sigkilled_writer_leaves_durable_records_readable(instance):
    durable, staged = 12, 3
    script = Path(__file__).with_name("store_writer.py")
    writer = subprocess.Popen([sys.executable, str(script), instance, str(durable), str(staged)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "READY"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    segment = ParitySegment.attach(instance, 0, store_writer.GEOMETRY)
    assert segment.watermark == durable
    expected_step = {}
    for step in range(1, durable + 1):
        for slot in store_writer.step_slots(step).tolist():
            if slot != 0:  # the padding slot is never stored
                expected_step[slot] = step
    result = segment.read(torch.arange(store_writer.GEOMETRY.slots))
    assert result.corrupt == []
    usable = torch.nonzero(result.usable).flatten().tolist()
    assert sorted(usable) == sorted(expected_step)
    for slot in usable:
        step = expected_step[slot]
        want = store_writer.payload(step, torch.tensor([slot]))[0]
        assert int(result.steps[slot]) == step and torch.equal(result.parity[slot], want)
    staged_records = [(step, slot) for step in range(durable + 1, durable + staged + 1)
                      for slot in store_writer.step_slots(step).tolist()]
    assert segment.pending() == staged_records  # staged, never drained: reported as not durable
    segment.close(unlink=True)


def test_flipped_bytes_fail_the_checksum_and_are_never_handed_out(instance):
    segment = ParitySegment.create(instance, 0, GEOMETRY, ring_entries=64)
    drain = ParityDrain(segment).start()
    slots = torch.arange(1, 200, 7)
    drain.submit(1, slots, rows(1, slots))
    drain.stop()
    victim = int(slots[3])
    offset = segment.table[victim].data_ptr() - segment.table.data_ptr() + segment._offsets["table"] + 5
    with open(segment.path, "r+b") as f:
        byte = os.pread(f.fileno(), 1, offset)[0]
        os.pwrite(f.fileno(), bytes([byte ^ 0x10]), offset)
    result = segment.read(slots)
    assert result.corrupt == [victim]
    assert result.usable.tolist() == [s != victim for s in slots.tolist()]
    assert drain.counters().checksum_failures == 1
    segment.close(unlink=True)


def test_attach_refuses_other_geometry_or_format_version_in_one_line(instance):
    ParitySegment.create(instance, 0, GEOMETRY, ring_entries=8).close()
    other = StoreGeometry("xor", 2, 1, "bfloat16", 6, 16, 2, 2048)
    with pytest.raises(StoreError) as err:
        ParitySegment.attach(instance, 0, other)
    assert "slots=1024 (expected 2048)" in str(err.value) and "\n" not in str(err.value)
    path = f"/dev/shm/ghostserve-{instance}-rank0"
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), (99).to_bytes(4, "little"), 8)
    with pytest.raises(StoreError) as err:
        ParitySegment.attach(instance, 0, GEOMETRY)
    assert "version 99" in str(err.value) and "\n" not in str(err.value)
    # Version 1 sealed records with CRC-32 (zlib) and kept (step, slot) pairs in the ring: refused.
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), (1).to_bytes(4, "little"), 8)
    with pytest.raises(StoreError) as err:
        ParitySegment.attach(instance, 0, GEOMETRY)
    assert "version 1;" in str(err.value) and "version 2" in str(err.value) and "\n" not in str(err.value)


def test_segments_are_private_and_instances_never_touch_each_other(instance):
    a = ParitySegment.create(instance + "-a", 0, GEOMETRY, ring_entries=8)
    b = ParitySegment.create(instance + "-b", 0, GEOMETRY, ring_entries=8)
    assert os.stat(a.path).st_mode & 0o777 == 0o600
    assert os.stat(b.path).st_mode & 0o777 == 0o600
    drain = ParityDrain(a).start()
    drain.submit(1, torch.arange(1, 11), rows(1, torch.arange(1, 11)))
    drain.stop()
    assert len(a.durable_slots()) == 10 and len(b.durable_slots()) == 0
    # Same id again: refused by default, and never removed while its owner is alive.
    with pytest.raises(StoreError, match="already exists"):
        ParitySegment.create(instance + "-a", 0, GEOMETRY, ring_entries=8)
    with pytest.raises(StoreError, match="alive"):
        ParitySegment.create(instance + "-a", 0, GEOMETRY, ring_entries=8, existing="remove")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    a.set_control(OWNER_PID, int(dead.stdout))
    a.close()
    fresh = ParitySegment.create(instance + "-a", 0, GEOMETRY, ring_entries=8, existing="remove")
    assert len(fresh.durable_slots()) == 0
    assert os.path.exists(b.path) and b.control(OWNER_PID) == os.getpid()
    fresh.close(unlink=True)
    b.close(unlink=True)
    assert not os.path.exists(fresh.path) and not os.path.exists(b.path)


def test_reattach_by_flag_recovers_the_records(instance):
    segment = ParitySegment.create(instance, 1, GEOMETRY, ring_entries=8)
    drain = ParityDrain(segment).start()
    drain.submit(1, torch.arange(1, 6), rows(1, torch.arange(1, 6)))
    drain.stop()
    segment.close()
    again = ParitySegment.create(instance, 1, GEOMETRY, ring_entries=8, existing="attach")
    assert again.watermark == 1 and again.read(torch.arange(1, 6)).usable.all()
    again.close(unlink=True)


def test_freed_slots_lose_their_parity_even_when_a_record_is_still_staged(instance):
    segment = ParitySegment.create(instance, 0, GEOMETRY, ring_entries=64)
    drain = ParityDrain(segment).start()
    drain.submit(1, torch.tensor([1, 2, 3]), rows(1, torch.tensor([1, 2, 3])))
    assert drain.flush(5)
    drain.invalidate(torch.tensor([1]))
    drain.pause()
    drain.submit(2, torch.tensor([2, 4]), rows(2, torch.tensor([2, 4])))
    drain.invalidate(torch.tensor([4]))  # freed while its record waits in the ring
    drain.resume()
    drain.stop()
    result = segment.read(torch.tensor([1, 2, 3, 4]))
    assert result.usable.tolist() == [False, True, True, False]
    assert result.steps.tolist()[1:3] == [2, 1]
    segment.close(unlink=True)


def test_full_ring_drops_protection_when_asked_and_counts_it(instance):
    segment = ParitySegment.create(instance, 0, GEOMETRY, ring_entries=8)
    drain = ParityDrain(segment, stall_timeout_s=0.01, on_full="drop").start()
    drain.pause()
    slots = torch.arange(1, 21)
    drain.submit(1, slots, rows(1, slots))
    counters = drain.counters()
    assert (counters.stalls, counters.drops, counters.dropped_records) == (1, 1, 12)
    assert counters.lag_steps == 1
    drain.resume()
    drain.stop()
    assert segment.watermark == 1
    assert segment.read(slots).usable.tolist() == [True] * 8 + [False] * 12
    segment.close(unlink=True)


def test_full_ring_blocks_the_producer_by_default_until_the_drain_catches_up(instance):
    segment = ParitySegment.create(instance, 0, GEOMETRY, ring_entries=8)
    drain = ParityDrain(segment, stall_timeout_s=0.01)  # its thread starts late: a drain behind
    slots = torch.arange(1, 21)
    producer = threading.Thread(target=drain.submit, args=(1, slots, rows(1, slots)))
    producer.start()
    producer.join(0.3)
    assert producer.is_alive()  # blocked on the full ring, nothing dropped
    drain.start()
    producer.join(10)
    drain.stop()
    counters = drain.counters()
    assert counters.stalls >= 1 and counters.drops == 0 and counters.lag_steps == 0
    assert segment.read(slots).usable.all()
    segment.close(unlink=True)


def test_bad_input_is_refused_in_one_line(instance):
    cases = [
        lambda: ParitySegment.create("a/b", 0, GEOMETRY, ring_entries=8),
        lambda: ParitySegment.create(instance, 0, GEOMETRY, ring_entries=0),
        lambda: ParitySegment.create(instance, 0, GEOMETRY, ring_entries=8, existing="maybe"),
        lambda: StoreGeometry("xor", 2, 1, "float64", 6, 16, 2, 8),
        lambda: StoreGeometry("xor", 2, 1, "float16", 6, 16, 0, 8),
    ]
    for case in cases:
        with pytest.raises(StoreError) as err:
            case()
        assert "\n" not in str(err.value) and "allowed" in str(err.value)
    segment = ParitySegment.create(instance, 0, GEOMETRY, ring_entries=8)
    with pytest.raises(StoreError):
        ParityDrain(segment, on_full="sometimes")
    drain = ParityDrain(segment).start()
    drain.submit(3, torch.arange(2), rows(3, torch.arange(2)))
    with pytest.raises(StoreError, match="step 3 is not after"):
        drain.submit(3, torch.arange(2), rows(3, torch.arange(2)))
    with pytest.raises(StoreError, match="expected"):
        drain.submit(4, torch.arange(2), torch.zeros(2, 5, dtype=torch.uint8))
    drain.stop()
    segment.close(unlink=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_a_million_slot_writes_keep_segment_size_and_memory_flat(instance):
    geometry = StoreGeometry("xor", 2, 1, "float16", 1, 8, 1, 4096)
    segment = ParitySegment.create(instance, 0, geometry, ring_entries=2048)
    size = os.stat(segment.path).st_size
    drain = ParityDrain(segment).start()
    gen = torch.Generator().manual_seed(0)
    payload = torch.randint(0, 256, (1000, geometry.record_bytes), dtype=torch.uint8, generator=gen)
    rss_warm = None
    for step in range(1, 1001):
        slots = torch.randperm(geometry.slots - 1, generator=gen)[:1000] + 1  # slot 0: padding
        drain.submit(step, slots, payload)
        if step % 50 == 0:
            drain.invalidate(slots[:100])
        if step == 100:
            drain.flush()
            rss_warm = rss_bytes()
    drain.stop()
    counters = drain.counters()
    assert counters.records_drained == 1_000_000
    assert os.stat(segment.path).st_size == size
    assert rss_bytes() - rss_warm < 16 << 20
    segment.close(unlink=True)


def test_a_slot_freed_and_rewritten_while_its_old_record_is_staged_keeps_the_newest_parity(instance):
    # Freed pages are reused first: slot 5 is written (step 1), freed, and written again (step 2) while
    # step 1's record still waits in the ring. The freeing must not drop step 2's record.
    segment = ParitySegment.create(instance, 0, GEOMETRY, ring_entries=64)
    drain = ParityDrain(segment).start()
    drain.pause()
    slot = torch.tensor([5])
    drain.submit(1, slot, rows(1, slot))
    drain.invalidate(slot)
    drain.submit(2, slot, rows(2, slot))
    drain.resume()
    assert drain.flush(5)
    result = segment.read(slot)
    assert result.usable.tolist() == [True] and result.steps.tolist() == [2]
    assert torch.equal(result.parity, rows(2, slot))
    drain.stop()
    segment.close(unlink=True)


@pytest.mark.parametrize("on_full", ["block", "drop"])
def test_a_paused_drain_never_blocks_the_producer_it_drops_and_counts(instance, on_full):
    segment = ParitySegment.create(instance, 0, GEOMETRY, ring_entries=8)
    drain = ParityDrain(segment, stall_timeout_s=0.05, on_full=on_full).start()
    drain.pause()
    slots = torch.arange(1, 21)
    drain.submit(1, slots, rows(1, slots))  # returns: 8 staged, 12 dropped
    counters = drain.counters()
    assert (counters.stalls, counters.drops, counters.dropped_records) == (1, 1, 12)
    started = time.monotonic()
    assert drain.flush() is False and time.monotonic() - started < 1  # a flush never waits on a pause
    drain.resume()
    drain.submit(2, slots[:4], rows(2, slots[:4]))  # a running drain protects again
    assert drain.flush(5)
    assert segment.read(slots).usable.tolist() == [True] * 8 + [False] * 12
    drain.stop()
    segment.close(unlink=True)


def test_a_producer_waiting_on_a_full_ring_is_released_by_stop(instance):
    segment = ParitySegment.create(instance, 0, GEOMETRY, ring_entries=8)
    drain = ParityDrain(segment, stall_timeout_s=0.01)  # its thread never starts
    slots = torch.arange(1, 21)
    producer = threading.Thread(target=drain.submit, args=(1, slots, rows(1, slots)))
    producer.start()
    producer.join(0.3)
    assert producer.is_alive()
    drain.stop(flush=False)
    producer.join(5)
    assert not producer.is_alive() and drain.counters().dropped_records == 12
    segment.close(unlink=True)


def test_a_failed_drain_thread_is_reported_to_the_producer_in_one_line(instance):
    segment = ParitySegment.create(instance, 0, GEOMETRY, ring_entries=8)
    segment.write_staged = None  # the drain thread's first write raises TypeError
    drain = ParityDrain(segment, stall_timeout_s=0.01).start()
    slots = torch.arange(1, 21)
    with pytest.raises(StoreError, match="drain thread failed") as failure:
        drain.submit(1, slots, rows(1, slots))
    assert "\n" not in str(failure.value)
    with pytest.raises(StoreError, match="drain thread failed"):
        drain.flush(5)
    segment.close(unlink=True)


def test_a_store_larger_than_the_free_space_is_refused_up_front_in_one_line(instance):
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    too_many = free // GEOMETRY.record_bytes + 1  # slots whose table alone passes the free space
    geometry = StoreGeometry("xor", 2, 1, "bfloat16", 6, 16, 2, too_many)
    with pytest.raises(StoreError) as refused:
        check_space(geometry, ring_entries=64)
    message = str(refused.value)
    assert "\n" not in message and "/dev/shm" in message and "--ghost-staging-mib" in message
    assert f"{free / 2**20:,.0f} MiB free" in message
    created = ParitySegment.create(instance, 0, GEOMETRY, 64)
    assert check_space(GEOMETRY, ring_entries=64) == created.size_bytes
    # The ranks of a host share the directory: one rank's store fits, two do not.
    half = StoreGeometry("xor", 2, 1, "bfloat16", 6, 16, 2, free // (2 * GEOMETRY.record_bytes) + 1)
    check_space(half, ring_entries=64, ranks=1)
    with pytest.raises(StoreError, match="for 2 rank"):
        check_space(half, ring_entries=64, ranks=2)


# One rank's shard with 64 KiB records: batches of a few MiB, large enough to be shared among threads.
BIG = StoreGeometry("xor", 2, 1, "bfloat16", 8, 128, 32, 256)


def stage(segment: ParitySegment, start: int, steps: torch.Tensor, slots: torch.Tensor,
          payload: torch.Tensor) -> None:
    """Put records straight into the ring, as ``submit`` does."""
    end = start + len(slots)
    segment.ring_steps[start:end], segment.ring_slots[start:end] = steps, slots
    segment.ring[start:end] = payload


def test_crc32c_known_vectors_natively_in_hardware_and_portably_and_in_python():
    from ghostserve_sglang.store import native

    lib = native.library()
    assert lib is not None  # this machine has a C compiler: the native CRC is tested
    vectors = {  # RFC 3720 (iSCSI) B.4, and the customary check value
        b"123456789": 0xE3069283, b"": 0, bytes(32): 0x8A9136AA, b"\xff" * 32: 0x62A8AB43,
        bytes(range(32)): 0x46DD794E, bytes(range(31, -1, -1)): 0x113FDB5C,
    }
    hardware = lib.ghost_crc32c_hardware(-1)
    try:
        for path in sorted({0, hardware}):  # the SSE4.2 path where the processor has it, and the tables
            lib.ghost_crc32c_hardware(path)
            for data, want in vectors.items():
                assert native.crc32c(data) == want
                assert native.crc32c_python(data) == want
                assert lib.ghost_crc32c_portable(0, data, len(data)) == want
    finally:
        lib.ghost_crc32c_hardware(hardware)
    # Lengths around the three-stream blocks (3 x 256 and 3 x 8192 bytes), at every alignment, and
    # continued from a seed as zlib.crc32 continues.
    gen = torch.Generator().manual_seed(3)
    buffer = torch.randint(0, 256, (3 * 8192 * 2 + 100,), dtype=torch.uint8, generator=gen)
    for length in (1, 7, 8, 9, 767, 768, 769, 3 * 8192 - 1, 3 * 8192, 3 * 8192 + 777, 2 * 3 * 8192 + 5):
        for offset in (0, 1, 5):
            data = buffer[offset : offset + length]
            want = lib.ghost_crc32c_portable(0x1234, data.data_ptr(), length)
            assert native.crc32c(data, 0x1234) == want
            cut = length // 3
            assert native.crc32c(data[cut:], native.crc32c(data[:cut], 0x1234)) == want
    rows = buffer[: 5 * 1000].view(5, 1000)
    assert native.crc32c_rows_python(torch.full((5,), 0x1234), rows).tolist() == [
        lib.ghost_crc32c_portable(0x1234, row.data_ptr(), 1000) for row in rows]


# 27003-byte records: rows start at every alignment, and each spans a long three-stream block.
ODD = StoreGeometry("xor", 4, 1, "uint8", 1, 5, 9001, 256)


@pytest.mark.parametrize("geometry", [BIG, ODD], ids=["64KiB", "27003B"])
def test_threaded_hardware_portable_and_python_writes_give_the_same_table_and_slot_words(instance,
                                                                                       monkeypatch, geometry):
    from ghostserve_sglang.store import native

    lib = native.library()
    gen = torch.Generator().manual_seed(5)
    # 48 records over 40 slots, some staged twice (the later one must win), and the padding slot.
    slots = torch.cat([torch.randperm(geometry.slots - 1, generator=gen)[:40] + 1, torch.tensor([0, 0])])
    slots = torch.cat([slots, slots[torch.randperm(len(slots), generator=gen)[:6]]])
    steps = torch.arange(len(slots)) // 8 + 11
    payload = torch.randint(0, 256, (len(slots), geometry.record_bytes), dtype=torch.uint8, generator=gen)
    hardware = lib.ghost_crc32c_hardware(-1)
    segments = []
    try:
        for rank, (threads, path) in enumerate([(4, hardware), (1, hardware), (4, 0), (1, 0)]):
            segment = ParitySegment.create(instance, rank, geometry, ring_entries=64)
            stage(segment, 3, steps, slots, payload)
            lib.ghost_crc32c_hardware(path)
            assert segment.write_staged(3, len(slots), threads) == len(slots) - int((slots == 0).sum())
            segments.append(segment)
    finally:
        lib.ghost_crc32c_hardware(hardware)
    assert lib.ghost_pool_size() >= 3  # the threaded writes did share their batches
    python = ParitySegment.create(instance, 9, geometry, ring_entries=64)
    stage(python, 3, steps, slots, payload)
    monkeypatch.setattr(native, "library", lambda: None)  # as on a machine without a C compiler
    python.write_staged(3, len(slots))
    monkeypatch.undo()
    last = {slot: i for i, slot in enumerate(slots.tolist()) if slot != 0}
    first = segments[0]
    table, slot_steps, slot_crcs = first.table.clone(), first.slot_steps.clone(), first.slot_crcs.clone()
    for segment in [*segments, python]:
        assert torch.equal(segment.table, table)
        assert torch.equal(segment.slot_steps, slot_steps) and torch.equal(segment.slot_crcs, slot_crcs)
        assert sorted(torch.nonzero(segment.slot_steps).flatten().tolist()) == sorted(last)
        assert segment.slot_steps[list(last)].tolist() == [int(steps[i]) for i in last.values()]
        assert torch.equal(segment.table[list(last)], payload[list(last.values())])
        segment.set_control(WATERMARK, int(steps.max()))
        assert segment.read(torch.tensor(list(last))).usable.all()  # the CRCs check out on read
        segment.close(unlink=True)


def test_a_slot_staged_twice_in_one_threaded_batch_ends_with_its_later_record(instance):
    segment = ParitySegment.create(instance, 0, BIG, ring_entries=128)
    gen = torch.Generator().manual_seed(7)
    slots = torch.arange(1, 33).repeat(4)  # every slot staged four times, its copies far apart
    steps = torch.arange(len(slots)) // 32 + 1
    payload = torch.randint(0, 256, (len(slots), BIG.record_bytes), dtype=torch.uint8, generator=gen)
    stage(segment, 0, steps, slots, payload)
    assert segment.write_staged(0, len(slots), threads=8) == 128
    assert segment.slot_steps[1:33].tolist() == [4] * 32
    assert torch.equal(segment.table[1:33], payload[96:])
    segment.set_control(WATERMARK, 4)
    assert segment.read(torch.arange(1, 33)).usable.all()
    segment.close(unlink=True)


def test_padding_slot_records_are_staged_and_never_stored_nor_refused(instance, monkeypatch):
    from ghostserve_sglang.store import native

    segment = ParitySegment.create(instance, 0, GEOMETRY, ring_entries=64)
    drain = ParityDrain(segment).start()
    drain.pause()
    slots = torch.tensor([0, 5, 0, 7, 0])  # as a producer passes SGLang's out_cache_loc, unfiltered
    drain.submit(1, slots, rows(1, slots))
    assert segment.pending() == [(1, 0), (1, 5), (1, 0), (1, 7), (1, 0)]
    drain.resume()
    assert drain.flush(5)
    drain.stop()
    counters = drain.counters()
    assert (counters.records_drained, counters.bytes_drained) == (2, 2 * GEOMETRY.record_bytes)
    assert segment.slot_steps[0] == 0 and not segment.table[0].any() and segment.slot_crcs[0] == 0
    assert segment.read(torch.tensor([5, 7])).usable.all()
    # The same from Python.
    monkeypatch.setattr(native, "library", lambda: None)
    stage(segment, 0, torch.tensor([2, 2]), torch.tensor([0, 9]), rows(2, torch.tensor([0, 9])))
    assert segment.write_staged(0, 2) == 1
    assert segment.slot_steps[0] == 0 and not segment.table[0].any() and segment.slot_steps[9] == 2
    segment.close(unlink=True)


def test_out_of_range_slots_are_refused_after_the_others_are_stored(instance):
    segment = ParitySegment.create(instance, 0, GEOMETRY, ring_entries=8)
    stage(segment, 0, torch.tensor([1, 1, 1]), torch.tensor([3, GEOMETRY.slots, 4]),
          rows(1, torch.tensor([3, 0, 4])))
    with pytest.raises(StoreError, match="1 staged records name a slot outside"):
        segment.write_staged(0, 3)
    assert segment.slot_steps[[3, 4]].tolist() == [1, 1]
    segment.close(unlink=True)


def test_threads_default_to_one_on_small_hosts_and_are_checked():
    from ghostserve_sglang.store.drain import default_threads

    assert [default_threads(cpus) for cpus in (1, 2, 4, 8, 16, 64)] == [1, 1, 1, 4, 8, 8]
    assert default_threads() >= 1


def test_threads_argument_is_refused_out_of_range(instance):
    segment = ParitySegment.create(instance, 0, GEOMETRY, ring_entries=8)
    for threads in (0, 65, 2.5, True):
        with pytest.raises(StoreError, match="threads="):
            ParityDrain(segment, threads=threads)
    assert ParityDrain(segment, threads=3).threads == 3
    segment.close(unlink=True)


def test_a_threaded_drain_makes_every_step_durable_and_readable(instance):
    segment = ParitySegment.create(instance, 0, BIG, ring_entries=96)
    drain = ParityDrain(segment, threads=4).start()
    gen = torch.Generator().manual_seed(9)
    expected = {}
    for step in range(1, 41):
        slots = torch.randperm(BIG.slots, generator=gen)[:24]  # slot 0 included now and then
        payload = torch.randint(0, 256, (24, BIG.record_bytes), dtype=torch.uint8, generator=gen)
        drain.submit(step, slots, payload)
        expected.update({slot: (step, row) for slot, row in zip(slots.tolist(), payload) if slot != 0})
    assert drain.flush(30)
    drain.stop()
    live = torch.tensor(sorted(expected))
    result = segment.read(live)
    assert result.usable.all() and not result.corrupt
    for i, slot in enumerate(live.tolist()):
        assert int(result.steps[i]) == expected[slot][0] and torch.equal(result.parity[i], expected[slot][1])
    assert segment.slot_steps[0] == 0
    segment.close(unlink=True)


def test_a_forked_child_writes_with_threads_of_its_own(instance):
    """The helper threads do not survive a fork: a child starts its own instead of waiting on them."""
    from ghostserve_sglang.store import native

    segment = ParitySegment.create(instance, 0, BIG, ring_entries=64)
    slots = torch.arange(1, 65)
    payload = torch.zeros(64, BIG.record_bytes, dtype=torch.uint8)
    stage(segment, 0, torch.ones(64, dtype=torch.int64), slots, payload)
    segment.write_staged(0, 64, threads=4)
    assert native.library().ghost_pool_size() >= 3
    pid = os.fork()
    if pid == 0:  # the child: exit at once either way, never back into pytest
        try:
            segment.ring_steps[:] = 2
            segment.write_staged(0, 64, threads=4)
            os._exit(0 if native.library().ghost_pool_size() >= 3 else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's threaded write hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert segment.slot_steps[1:65].tolist() == [2] * 64  # shared memory: the child's write is seen
    segment.close(unlink=True)


def test_discarded_staged_records_take_their_slots_parity_with_them(instance):
    segment = ParitySegment.create(instance, 0, GEOMETRY, ring_entries=64)
    drain = ParityDrain(segment).start()
    drain.submit(1, torch.tensor([1, 2, 3]), rows(1, torch.tensor([1, 2, 3])))
    assert drain.flush(5)
    drain.pause()
    drain.submit(2, torch.tensor([2, 3, 0]), rows(2, torch.tensor([2, 3, 0])))
    assert drain.discard_pending() == 3  # read back from ring_slots: slots 2 and 3 lose step 1's parity
    drain.resume()
    drain.stop()
    assert segment.watermark == 2
    assert segment.read(torch.tensor([1, 2, 3])).usable.tolist() == [True, False, False]
    segment.close(unlink=True)
