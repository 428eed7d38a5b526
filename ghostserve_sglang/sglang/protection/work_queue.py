"""The hand-over from the scheduler thread to GhostServe's worker thread: items in the order the
scheduler issued them, bounded in bytes of device memory, each ready only when the device work that
produced it has run.

On a GPU, the scheduler thread's tensor operations are queued on SGLang's stream and run later. An
item (the gathered rows of a step, a copy of freed slot indices, a control request that reads the KV)
is therefore put with an event recorded after the last operation that produced it, and the worker's
stream waits for that event before it touches the item. Tensors the worker receives are marked as used
on its stream, so their memory is not reused while its work on them is still queued.

The bound counts the bytes of the items waiting plus the one the worker holds. A ``put`` that would
pass it waits for the worker (backpressure, counted); into an empty queue any item passes, so one item
larger than the bound never waits forever. After ``close`` nothing waits: puts are dropped and the
worker's ``get`` returns None.
"""

from __future__ import annotations

import collections
import threading
import time

import torch


class WorkQueue:
    def __init__(self, limit_bytes: int, device: torch.device) -> None:
        self.limit_bytes = limit_bytes
        self._on_gpu = device.type == "cuda"
        self._items: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._bytes = 0  # waiting and held by the worker
        self._held = 0
        self._busy = False  # the worker holds an item (got, not done)
        self._closed = False
        self.stalls = 0
        self.stall_seconds = 0.0

    def put(self, item: tuple, nbytes: int = 0, if_idle=None) -> bool:
        """Queue ``item`` (its tensors hold ``nbytes`` of device memory) after the work issued so far
        on the current stream; waits while the bound would be passed. False: closed, not queued.
        ``if_idle``: a function whose result is appended to ``item``, called (under the queue's lock)
        only when nothing is queued and the worker holds no item, else None is appended: a first
        part of the item's work that may start at once, since nothing of the worker's comes before."""
        event = None
        if self._on_gpu:
            event = torch.cuda.Event()
            event.record()
        with self._cv:
            if self._bytes and self._bytes + nbytes > self.limit_bytes and not self._closed:
                self.stalls += 1
                started = time.monotonic()
                self._cv.wait_for(lambda: self._closed or not self._bytes
                                  or self._bytes + nbytes <= self.limit_bytes)
                self.stall_seconds += time.monotonic() - started
            if self._closed:
                return False
            if if_idle is not None:
                item = (*item, if_idle() if not self._items and not self._busy else None)
            self._bytes += nbytes
            self._items.append((item, nbytes, event))
            self._cv.notify_all()
            return True

    def get(self) -> tuple | None:
        """The next item, once its producer's device work has run (for the current stream); None
        after ``close``. Call ``done`` when finished with it."""
        with self._cv:
            self._cv.wait_for(lambda: self._items or self._closed)
            if self._closed:
                return None
            item, self._held, event = self._items.popleft()
            self._busy = True
        if event is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(event)
            for value in item:
                if isinstance(value, torch.Tensor) and value.is_cuda:
                    value.record_stream(stream)
        return item

    def done(self) -> None:
        """The worker is finished with the item it got last: its bytes no longer count."""
        with self._cv:
            self._bytes -= self._held
            self._held = 0
            self._busy = False
            self._cv.notify_all()

    def close(self) -> list[tuple]:
        """Stop: nothing more is queued or handed out. Returns the items that were still waiting."""
        with self._cv:
            self._closed = True
            dropped = [item for item, _, _ in self._items]
            self._items.clear()
            self._cv.notify_all()
            return dropped

    @property
    def queued_bytes(self) -> int:
        with self._cv:
            return self._bytes
