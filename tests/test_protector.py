"""One rank's Protector in this process, on SGLang's real KV pool and allocator (TP=1, replicate): the
capture queue's byte bound, captures in parts, and scrub and rebuild in parts."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from ghostserve_sglang.drills import kv as kv_drills
from ghostserve_sglang.sglang.protection.scrub import scrub as scrub_parity
from ghostserve_sglang.sglang.protection.work_queue import WorkQueue
from ghostserve_sglang.testing.rig import make_protector, stop, written

SLOTS = 256
PART = 16  # 1 MiB queue / (4 parts x 16 KiB a slot: 4 layers x K and V x 8 heads x 64 x 4 bytes)


@pytest.fixture(scope="module")
def protector():
    p = make_protector(capture_queue_mib="1")
    yield p
    stop(p)


@pytest.fixture
def sizes(protector, monkeypatch):
    """The number of slots of every KV gather (capture, scrub, rebuild: cut into columns) and scatter
    the protector makes."""
    seen = {"gather": [], "scatter": []}
    for key, calls in seen.items():
        name = {"gather": "gather_columns"}.get(key, key)
        original = getattr(protector.kv, name)
        monkeypatch.setattr(protector.kv, name, lambda slots, *a, _o=original, _c=calls, **k: (
            _c.append(len(slots)), _o(slots, *a, **k))[1])
    return seen


def test_a_write_larger_than_a_quarter_of_the_queue_is_captured_in_parts(protector, sizes):
    assert (protector.queue_bytes, protector.chunk_slots) == (1 << 20, PART)
    before = protector.step
    written(protector, 5 * PART + 1, seed=1)
    assert protector.step - before == 6  # five whole parts and one slot
    assert sizes["gather"] == [PART] * 5 + [1]
    scrub = protector.call(lambda: scrub_parity(protector))
    assert (scrub["live_slots"], scrub["matching"], scrub["mismatching"], scrub["not_durable"]) == (
        5 * PART + 1, 5 * PART + 1, 0, 0)
    assert sizes["gather"][6:] == [PART] * 5 + [1]  # the scrub too


def test_a_lost_kv_is_rebuilt_part_by_part_to_the_same_bytes(protector, sizes):
    written(protector, 7 * PART + 3, seed=2)
    live = protector.coverage()[0]
    before = protector.kv.gather(live).clone()
    protector.call(lambda: kv_drills.inject(protector, [0]))
    assert not torch.equal(protector.kv.gather(live), before)
    result = protector.recover(None, [0])
    assert result["outcome"] == "rebuilt" and result["slots_rebuilt"] == len(live)
    assert sizes["scatter"] and max(sizes["scatter"]) == PART and sum(sizes["scatter"]) == len(live)
    assert torch.equal(protector.kv.gather(live), before)


def test_the_queue_passes_one_item_larger_than_the_bound_and_releases_bytes_on_done():
    queue = WorkQueue(limit_bytes=100, device=torch.device("cpu"))
    assert queue.put(("big",), 500)  # an empty queue takes any item
    waiting = threading.Thread(target=queue.put, args=(("next",), 10))
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive() and queue.stalls == 1  # 500 + 10 > 100: backpressure
    assert queue.get() == ("big",)
    waiting.join(0.2)
    assert waiting.is_alive()  # the worker still holds "big"
    queue.done()
    waiting.join(5)
    assert not waiting.is_alive() and queue.queued_bytes == 10 and queue.stall_seconds > 0.15


def test_a_closed_queue_releases_a_waiting_producer_and_the_worker():
    queue = WorkQueue(limit_bytes=100, device=torch.device("cpu"))
    queue.put(("a",), 100)
    waiting = threading.Thread(target=queue.put, args=(("b",), 10))
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()
    queue.close()
    waiting.join(5)
    assert not waiting.is_alive()
    assert queue.get() is None and queue.put(("c",), 1) is False


def test_work_may_start_at_once_only_when_nothing_comes_before_it():
    """``if_idle`` (a step's early exchange post) runs only while nothing is queued and the worker
    holds nothing: otherwise its work would come before work queued earlier."""
    queue = WorkQueue(limit_bytes=100, device=torch.device("cpu"))
    early = lambda: "started"  # noqa: E731
    queue.put(("a",), if_idle=early)
    queue.put(("b",), if_idle=early)
    assert queue.get() == ("a", "started")
    queue.put(("c",), if_idle=early)  # "b" waits, and the worker holds "a"
    queue.done()
    assert queue.get() == ("b", None)
    queue.done()
    assert queue.get() == ("c", None)
    queue.put(("d",), if_idle=early)  # the worker holds "c"
    queue.done()
    assert queue.get() == ("d", None)
    queue.done()
    queue.put(("e",), if_idle=early)  # idle
    assert queue.get() == ("e", "started")


def test_ghostserve_threads_carry_their_names_at_the_os_level(protector):
    """``top -H`` and ``ps -L`` tell GhostServe's threads apart from SGLang's: the OS names of this
    process's threads include the worker's, the drain's and the metrics refresher's."""
    names = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as comm:
            names.add(comm.read().strip())
    assert {"gs-encode", "gs-drain", "gs-metrics"} <= names, names
