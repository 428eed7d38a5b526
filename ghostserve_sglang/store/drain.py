"""The background drain: moves staged parity into the slot table off the forward path, in step order,
and advances the durable watermark.

The producer (the step loop) calls ``submit(step, slots, parity)`` once per step; the call only copies
slot ids and rows into the segment's staging ring (asynchronously, from a GPU, without waiting for
it) and returns. A thread writes ring entries into the table, in one native call per batch shared
among ``threads`` threads, and, when every entry of a step is in, moves the watermark to that step.
When the ring is full the producer waits up to ``stall_timeout_s``; then ``on_full="block"`` keeps
waiting for the drain and ``on_full="drop"`` gives up protection of the rest of that step (its slots
are invalidated). A paused or stopping drain frees nothing, so a full ring then drops under either
setting. Both outcomes are counted; a producer never waits on a drain thread that has failed.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time

import torch

from ..threads import daemon
from .geometry import StoreError
from .segment import RING_HEAD, RING_TAIL, WATERMARK, ParitySegment

ON_FULL = ("block", "drop")


def default_threads(cpus: int | None = None) -> int:
    """Threads that share a batch's writes by default: 1 on hosts of up to 4 cores (they belong to
    the model's processes; the drain's single thread already keeps up with a CPU-served model there),
    else half the cores, at most 8 (a GPU host's drain must keep up with device-to-host copies of tens
    of GB/s, and it works in bursts: its threads sleep between batches). ``cpus`` defaults to the cores
    this process may run on."""
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
    return 1 if cpus <= 4 else min(8, cpus // 2)


@dataclasses.dataclass
class DrainCounters:
    """Totals since start, and the lag of the durable watermark behind the last submitted step."""

    bytes_drained: int = 0
    records_drained: int = 0
    steps_submitted: int = 0
    stalls: int = 0
    stall_seconds: float = 0.0
    drops: int = 0
    dropped_records: int = 0
    discarded_records: int = 0
    write_seconds: float = 0.0
    checksum_failures: int = 0
    pin_error: int = 0  # CUDA's error when the staging ring could not be pinned (0: pinned or no GPU)
    pageable_copies: int = 0  # device-to-host copies into an unpinned ring (synchronous)
    lag_steps: int = 0
    lag_seconds: float = 0.0


class ParityDrain:
    """``threads``: how many threads share each batch's writes (the drain's own included), fixed for
    the drain's life; None picks ``default_threads()``. Batches too small to pay for waking a helper
    (under 128 KiB a thread) run on the drain thread alone."""

    def __init__(
        self, segment: ParitySegment, stall_timeout_s: float = 0.05, on_full: str = "block",
        batch_entries: int = 4096, sync: bool = False, threads: int | None = None,
    ) -> None:
        if threads is None:
            threads = default_threads()
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 64:
            raise StoreError(f"threads={threads!r} is not allowed; it must be an int from 1 to 64")
        if on_full not in ON_FULL:
            raise StoreError(f"on_full={on_full!r} is not allowed; allowed: {', '.join(ON_FULL)}")
        if not stall_timeout_s >= 0:
            raise StoreError(f"stall_timeout_s={stall_timeout_s!r} is not allowed; it must be >= 0")
        self.segment = segment
        self.threads = threads
        self.sync = sync  # msync each written batch before it counts as durable (a store on disk)
        self._latencies: collections.deque[float] = collections.deque(maxlen=65536)
        self.stall_timeout_s = stall_timeout_s
        self.on_full = on_full
        self._batch = batch_entries
        self._cv = threading.Condition()
        self._head = segment.control(RING_HEAD)
        self._tail = segment.control(RING_TAIL)
        self._last_step = segment.watermark
        self._steps: collections.deque[tuple[int, int, float]] = collections.deque()  # step, end, t
        self._invalidations: collections.deque[tuple[int, torch.Tensor]] = collections.deque()
        self._copies: collections.deque[tuple[int, int, torch.cuda.Event]] = collections.deque()
        self._stream = None
        self._paused = False
        self._writing = False
        self._stopping = False
        self._failure: BaseException | None = None
        self._counters = DrainCounters()
        self._thread = daemon(self._run, "ghostserve-drain")

    # -- producer side ---------------------------------------------------------------------------
    def start(self) -> ParityDrain:
        if torch.cuda.is_available():
            self._counters.pin_error = self.segment.pin()
            self._stream = torch.cuda.Stream()
        self._thread.start()
        return self

    def submit(self, step: int, slots: torch.Tensor, parity: torch.Tensor,
               captured_at: float | None = None) -> None:
        """Stage one step's parity rows (``parity[i]`` belongs to ``slots[i]``; slots distinct, except
        slot 0, the padding slot, whose rows are staged and never stored, so a producer need not
        filter them out). ``captured_at`` (``time.monotonic()``) is when the KV was written; the
        checkpoint latency of the step runs from then until it is durable.

        ``slots`` may live on the host or on the device that holds ``parity`` (integers, int64 best).
        From a GPU both are copied on the drain's side stream, after the work queued so far on the
        current stream, without waiting: nothing here synchronises with the device, except dropping
        rows when the ring is full (``on_full="drop"``), which needs the dropped slot ids on the host."""
        if step <= self._last_step:
            raise StoreError(f"step {step} is not after the last submitted step {self._last_step}")
        record = self.segment.geometry.record_bytes
        if parity.dim() != 2 or parity.shape[1] != record or slots.dim() != 1 or len(parity) != len(slots):
            raise StoreError(f"parity is {list(parity.shape)} and slots {list(slots.shape)}, expected "
                             f"[{len(slots)}, {record}] uint8 and [{len(slots)}]")
        if slots.is_cuda and parity.is_cuda:
            slots = slots.to(parity.device, torch.int64).contiguous()  # queued on the device: no wait
        else:
            slots = slots.to("cpu", torch.int64)
        cap, done, n = self.segment.ring_entries, 0, len(slots)
        while done < n:
            free = self._wait_for_space()
            if free == 0:  # on_full == "drop" and the bound passed
                self._drop(slots[done:])
                break
            start = self._head % cap
            take = min(free, n - done, cap - start)
            self.segment.ring_steps_array[start : start + take] = step
            self._copy(start, slots[done : done + take], parity[done : done + take])
            with self._cv:
                self._head += take
                self.segment.set_control(RING_HEAD, self._head)
                self._cv.notify_all()
            done += take
        with self._cv:
            self._last_step = step
            self._counters.steps_submitted += 1
            self._steps.append((step, self._head, captured_at or time.monotonic()))
            self._advance_watermark()

    def invalidate(self, slots: torch.Tensor) -> None:
        """Slots were freed: drop their parity now and after any of their records still staged."""
        slots = torch.as_tensor(slots, dtype=torch.int64).cpu()
        self.segment.invalidate(slots)
        with self._cv:
            self._invalidations.append((self._head, slots))
            self._apply_invalidations()

    def _copy(self, start: int, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Fill ring entries from ``start`` with ``slots`` and ``rows``: host sources at once, device
        sources on the side stream, with one event for both (the drain waits on it)."""
        ring_slots = self.segment.ring_slots[start : start + len(rows)]
        ring = self.segment.ring[start : start + len(rows)]
        on_device = [(dst, src) for dst, src in ((ring_slots, slots), (ring, rows)) if src.is_cuda]
        for dst, src in ((ring_slots, slots), (ring, rows)):
            if not src.is_cuda:
                dst.copy_(src)
        if not on_device:
            return
        device = on_device[-1][1].device
        if not self.segment.pinned:
            self._counters.pageable_copies += 1
        if self._stream is None:  # submitted before start()
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream())  # the producer's (same device)
        with torch.cuda.stream(self._stream):
            for dst, src in on_device:
                dst.copy_(src, non_blocking=True)
                src.record_stream(self._stream)
            event = torch.cuda.Event()
            event.record(self._stream)
        with self._cv:
            self._copies.append((self._head, self._head + len(rows), event))

    def _wait_for_space(self) -> int:
        """Free ring entries, waiting for the drain when there are none. Gives up (0: the caller drops)
        after the stall timeout with ``on_full="drop"``, and also with ``"block"`` while the drain is
        paused or stopping: only a drain that runs frees entries, and a wait on one that does not
        would stop the scheduler and every control request behind it."""
        cap = self.segment.ring_entries
        with self._cv:
            self._raise_if_failed()
            if self._head - self._tail < cap:
                return cap - (self._head - self._tail)
            started = time.monotonic()
            self._counters.stalls += 1
            deadline = started + self.stall_timeout_s
            while self._head - self._tail >= cap:
                if self._paused or self._stopping:
                    break  # nothing frees room: drop now rather than slow every step
                remaining = deadline - time.monotonic()
                if self.on_full == "drop" and remaining <= 0:
                    break
                self._cv.wait(max(0.0, remaining) if self.on_full == "drop" else 0.1)
                self._raise_if_failed()
            self._counters.stall_seconds += time.monotonic() - started
            return cap - (self._head - self._tail)

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise StoreError(f"the drain thread failed, parity is no longer stored: {self._failure!r}")

    def _drop(self, slots: torch.Tensor) -> None:
        self._counters.drops += 1
        self._counters.dropped_records += len(slots)
        self.invalidate(slots)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything submitted is durable; False if ``timeout_s`` passed first, or at once
        while the drain is paused or stopping (it would never be)."""
        with self._cv:
            self._cv.wait_for(lambda: self.segment.watermark >= self._last_step or self._paused
                              or self._stopping or self._failure is not None, timeout_s)
            self._raise_if_failed()
            return self.segment.watermark >= self._last_step

    def discard_pending(self) -> int:
        """Forget every staged record not yet in the table, as when the device that produced them
        failed: their slots lose their parity (never an older record in its place). Returns how many
        records were discarded."""
        with self._cv:
            self._cv.wait_for(lambda: not self._writing)
            while self._copies:  # they may still be filling ring_slots
                self._copies.popleft()[2].synchronize()
            head, tail, cap = self._head, self._tail, self.segment.ring_entries
            if head > tail:
                positions = torch.arange(tail, head) % cap
                self.segment.invalidate(self.segment.ring_slots[positions].clone())
            self._counters.discarded_records += head - tail
            self._tail = head
            self.segment.set_control(RING_TAIL, head)
            self._apply_invalidations()
            self._advance_watermark()
            self._cv.notify_all()
            return head - tail

    def pause(self) -> None:
        """Stop draining (staged records stay in the ring, not durable) until ``resume``."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def stop(self, flush: bool = True, timeout_s: float | None = None) -> bool:
        """Stop the drain thread (after a flush, if asked) and wait for copies still in flight into
        the ring. False if the thread had not ended within ``timeout_s``."""
        if flush and not self._paused:
            self.flush()
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout_s)
        with self._cv:
            pending = [event for _, _, event in self._copies]
        for event in pending:
            event.synchronize()
        return not self._thread.is_alive()

    def latencies(self) -> list[float]:
        """Checkpoint latency (captured -> durable, seconds) of the most recent steps, oldest first."""
        with self._cv:
            return list(self._latencies)

    def counters(self) -> DrainCounters:
        with self._cv:
            snapshot = dataclasses.replace(self._counters)
            snapshot.checksum_failures = self.segment.checksum_failures
            snapshot.lag_steps = self._last_step - self.segment.watermark
            snapshot.lag_seconds = time.monotonic() - self._steps[0][2] if self._steps else 0.0
            return snapshot

    # -- drain thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._drain_batches()
        except Exception as exc:  # reported to the producer by its next submit or flush
            with self._cv:
                self._failure = exc
                self._writing = False
                self._cv.notify_all()

    def _drain_batches(self) -> None:
        cap = self.segment.ring_entries
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stopping or (not self._paused and self._head > self._tail))
                if self._stopping:
                    return
                start = self._tail
                count = min(self._head - start, self._batch, cap - start % cap, self._next_cut(start))
                self._writing = True
            self._wait_copies(start + count)
            started = time.monotonic()
            stored = self.segment.write_staged(start % cap, count, self.threads)
            if self.sync:
                self.segment.sync()
            written = time.monotonic() - started
            with self._cv:
                self._counters.write_seconds += written
                self._writing = False
                self._tail = start + count
                self.segment.set_control(RING_TAIL, self._tail)
                self._counters.records_drained += stored  # padding (slot 0) is not stored
                self._counters.bytes_drained += stored * self.segment.geometry.record_bytes
                self._apply_invalidations()
                self._advance_watermark()
                self._cv.notify_all()

    def _wait_copies(self, end: int) -> None:
        """Wait for the device-to-host copies that fill ring positions below ``end``."""
        with self._cv:
            pending = [event for start, _, event in self._copies if start < end]
        for event in pending:
            event.synchronize()
        with self._cv:
            while self._copies and self._copies[0][1] <= end:
                self._copies.popleft()

    def _next_cut(self, start: int) -> int:
        """Entries from ``start`` up to the first invalidation staged after it: a batch ends there, so a
        slot freed and written again is invalidated between its old record and its new one."""
        later = [position - start for position, _ in self._invalidations if position > start]
        return min(later, default=self.segment.ring_entries)

    def _apply_invalidations(self) -> None:
        while self._invalidations and self._invalidations[0][0] <= self._tail:
            self.segment.invalidate(self._invalidations.popleft()[1])

    def _advance_watermark(self) -> None:
        while self._steps and self._steps[0][1] <= self._tail:
            step, _, captured_at = self._steps.popleft()
            self.segment.set_control(WATERMARK, step)
            self._latencies.append(time.monotonic() - captured_at)
            self._cv.notify_all()
