"""One scheduler rank's protection: capture each step's KV writes, exchange columns across the TP group,
encode parity and hand it to the drain; run control requests' work on its worker thread.

The scheduler thread only gathers the written slots' bytes and queues them. A worker thread owns
everything collective (the column all-to-all and the control requests' gathers) on GhostServe's own
groups or same-host exchange (``collectives.py``), so SGLang's own collectives never interleave with
ours, and it handles queued steps, frees and control
requests strictly in the order the scheduler issued them, which is the same on every rank.

Parity placement (DESIGN §4): each rank's bytes of a slot-layer are cut into N column chunks; rank j
receives chunk j of every rank, encodes m parity chunks and keeps them in its own host segment as
``[layers, m, column_bytes]`` per slot. ``replicate`` keeps the rank's own bytes, no exchange.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import queue
import signal
import time

import structlog
import torch

from ... import threads
from ...control import ControlServer
from ...settings import Settings
from ...shm import shm_dir
from ...store.drain import ParityDrain
from ...store.geometry import StoreGeometry
from ...store.segment import ParitySegment, check_space, segment_path
from . import exchange, recovery, reporting
from .collectives import TPCollectives, peer_lost
from .column_encoder import ColumnEncoder
from .kv import KVView, live_slots
from .work_queue import WorkQueue

log = structlog.get_logger("ghostserve.protector")

AUTO_QUEUE_FRACTION, AUTO_QUEUE_MIN_BYTES = 1 / 64, 16 << 20  # --ghost-capture-queue-mib 0
PARTS_PER_QUEUE = 4  # a write larger than a quarter of the queue bound is captured in parts
EXCHANGE_ROUND_MAX_BYTES = 64 << 20  # the same-host exchange's buffer; larger sends take more rounds


def capture_queue_bytes(settings: Settings, kv: KVView) -> int:
    """The bound on captured KV rows waiting for the worker, in bytes of device memory."""
    if settings.capture_queue_mib:
        return settings.capture_queue_mib << 20
    return max(AUTO_QUEUE_MIN_BYTES, int(kv.slots * kv.slot_bytes * AUTO_QUEUE_FRACTION))


class Protector:
    """``model_runner`` gives the pool (checked first by ``kv.check_pool``) and its allocator;
    ``collectives`` replaces the TP group's own (``TPCollectives``), for ranks emulated on one device.
    ``supervised``: the launcher replaces a dead peer (this rank holds for it) and removes the host files
    at the end; ``hook_errors``: the patch layer's error counts, reported with this rank's own."""

    def __init__(self, settings: Settings, model_runner, instance_id: str, tp_group,
                 replacement: bool = False, collectives=None, supervised: bool = False,
                 hook_errors: dict | None = None) -> None:
        self.settings = settings
        self.supervised = supervised
        self.hook_errors = {} if hook_errors is None else hook_errors
        self.instance_id = instance_id
        self.model_runner = model_runner
        self.allocator = model_runner.token_to_kv_pool_allocator
        self.kv = KVView(model_runner.token_to_kv_pool)
        self.rank, self.ranks = tp_group.rank_in_group, tp_group.world_size
        code = "replicate" if settings.code == "file" else settings.code  # file: the same layout, on disk
        parity_shards = self.ranks if code == "replicate" else settings.parity_shards
        self.geometry = StoreGeometry(code, self.ranks, parity_shards, self.kv.dtype_name, self.kv.heads,
                                      self.kv.head_dim, self.kv.layers, self.kv.slots)
        self.device = self.kv.pool.k_buffer[0].device
        self.encoder = ColumnEncoder(code, self.ranks, parity_shards, self.device)
        self.codec = self.encoder.code
        # How captured rows are cut: into every rank's column for the exchange, or whole (replicate).
        self.exchanges = code != "replicate"
        self.cut = ((self.ranks, self.geometry.column_bytes) if self.exchanges
                    else (1, self.kv.slot_layer_bytes))
        # Slots written since they were last freed, on the scheduler thread. With a page size above 1 an
        # allocated page's later slots hold no KV until the request reaches them: nothing to protect.
        self.written = torch.zeros(self.kv.slots, dtype=torch.bool, device=self.device)
        self.queue_bytes = capture_queue_bytes(settings, self.kv)
        self.chunk_slots = max(1, self.queue_bytes // (PARTS_PER_QUEUE * self.kv.slot_bytes))
        exchange_round = min(EXCHANGE_ROUND_MAX_BYTES, self.ranks * self.kv.layers
                             * self.geometry.column_bytes * self.chunk_slots)
        self.collectives = collectives or TPCollectives(tp_group, self.device, self.exchanges, instance_id,
                                                        exchange_round, started=not replacement)
        ring_entries = max(1, settings.staging_mib * 2**20 // self.geometry.record_bytes)
        on_disk = settings.code == "file"
        directory = settings.file_dir if on_disk else shm_dir()
        os.makedirs(directory, mode=0o700, exist_ok=True)
        existing = settings.existing_store
        found = os.path.exists(segment_path(instance_id, self.rank, directory))
        if replacement:  # the dead rank's segment holds the parity this rank's rebuild needs
            existing = "attach" if found else "fail"
        if not found:
            check_space(self.geometry, ring_entries, directory, ranks=self.ranks)
        self.segment = ParitySegment.create(instance_id, self.rank, self.geometry, ring_entries,
                                            existing=existing, directory=directory)
        self.drain = ParityDrain(self.segment, settings.stall_timeout_seconds, settings.on_full,
                                 sync=on_disk).start()
        pin_error = self.drain.counters().pin_error
        if pin_error:
            log.warning("the host staging ring could not be pinned; device-to-host copies of parity are "
                        "synchronous (counted as pageable_copies)", rank=self.rank, cuda_error=pin_error,
                        ring_bytes=ring_entries * self.geometry.record_bytes)
        self.step = 0
        self.closed = False
        self.scheduler = None  # set by the scheduler's init wrapper
        self.holding = False  # a peer died: queued steps are dropped until the group is whole again
        self.steps_lost_with_peer = 0
        # Time spent per thread, for the overhead account; the worker's wall time includes waiting for
        # its peers in the exchange, its CPU time does not.
        self.seconds = {"capture": 0.0, "worker": 0.0, "worker_cpu": 0.0}
        self.lost: set[int] = set()
        self.recoveries: list[dict] = []
        self.errors: dict[str, int] = {}
        self._failure: BaseException | None = None
        self.work_queue = WorkQueue(self.queue_bytes, self.device)
        self._stream = torch.cuda.Stream() if self.device.type == "cuda" else None
        self._worker = threads.daemon(self._work, "ghostserve-encode")
        self._worker.start()
        self.control = ControlServer(instance_id) if self.rank == 0 else None
        from ...metrics import Metrics  # after SGLang set PROMETHEUS_MULTIPROC_DIR

        self.metrics = Metrics(self.rank, settings.code)
        self.metrics.set("ghostserve_host_store_capacity_bytes", self.segment.size_bytes)
        self._reporter = threads.daemon(reporting.refresh_metrics, "ghostserve-metrics", (self,))
        self._reporter.start()
        atexit.register(self.close)
        for signum in (signal.SIGTERM, signal.SIGINT):  # a stop; a replacement of a rank stopped
            self._unlink_on(signum)  # this way starts without parity and recomputes
        log.info("config", rank=self.rank, step=0, **dataclasses.asdict(settings))
        log.info("protection started", rank=self.rank, step=0, code=code, ranks=self.ranks,
                 parity_shards=parity_shards, exchange=self.collectives.transport,
                 record_bytes=self.geometry.record_bytes,
                 slots=self.kv.slots, segment=self.segment.path, ring_entries=ring_entries,
                 capture_queue_bytes=self.queue_bytes, capture_part_slots=self.chunk_slots)

    # -- scheduler thread --------------------------------------------------------------------------
    def after_forward(self, forward_batch) -> None:
        """Queue the slots this forward wrote, with a copy of their bytes taken now."""
        loc = getattr(forward_batch, "out_cache_loc", None)
        if loc is None or loc.numel() == 0:
            return
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return  # graph capture: the replay runs this method again with real slots
        started = time.perf_counter()
        self.record_write(loc)
        spent = time.perf_counter() - started
        self.seconds["capture"] += spent
        self.metrics.capture_seconds.observe(spent)

    def record_write(self, slots: torch.Tensor) -> None:
        """Slots whose KV was just (re)written by any path: protect them as one step, or as one step
        per part of at most ``chunk_slots`` slots (the same parts on every rank)."""
        self.raise_failure()
        self.written.index_fill_(0, slots.to(self.device, torch.int64), True)
        for part in slots.split(self.chunk_slots):
            self.step += 1
            self.metrics.add("ghostserve_steps_captured_total")
            columns = self.kv.gather_columns(part, *self.cut)
            self.work_queue.put(("step", self.step, part.clone(), columns, time.monotonic()), columns.nbytes,
                                if_idle=lambda columns=columns: self._post_early(columns))

    def _post_early(self, columns: torch.Tensor) -> tuple[int, int] | None:
        """Post a captured step's exchange round now (the worker is idle): see ``exchange.py``."""
        if self.holding or not self.exchanges:
            return None
        return self.collectives.post_early(columns)

    def on_free(self, slots: torch.Tensor) -> None:
        self.raise_failure()
        self.written.index_fill_(0, slots.to(self.device, torch.int64), False)
        self.work_queue.put(("free", slots.clone()))

    def live_slots(self) -> torch.Tensor:
        """Slots that hold KV someone may read: allocated, and written since they were allocated."""
        live = live_slots(self.allocator, self.kv.slots)
        return live[self.written.cpu()[live]]

    def recover(self, scheduler, lost: list[int], retract: bool = False,
                restart_phases: dict | None = None) -> dict:
        """Rebuild what parity allows (worker, collective), then have SGLang recompute the rest.
        ``retract``: retract the running requests even when every slot was rebuilt (a batch was
        interrupted); ``restart_phases``: the phases of a rank replacement that came before."""
        started = time.monotonic()
        log.warning("recovery started", rank=self.rank, step=self.step, lost_ranks=lost)
        result = self.call(lambda: recovery.rebuild(self, lost, self.settings.recompute_below_tokens))
        bad = result.pop("bad")
        if len(bad) or retract:
            result.update(recovery.recompute(scheduler, self.allocator, self.kv.slots, bad))
        if restart_phases:
            result["phases"] = {**restart_phases, **result["phases"]}
            result["restart"] = True
        result["step"] = self.step
        result["seconds"] = time.monotonic() - started + sum((restart_phases or {}).values())
        result["outcome"] = ("rebuilt" if not len(bad) else "recomputed" if not result["slots_rebuilt"]
                             else "rebuilt_and_recomputed")
        if "recompute_seconds" in result:
            result["phases"]["recompute_seconds"] = result.pop("recompute_seconds")
        self.lost.difference_update(lost)
        self.recoveries.append(result)
        self.metrics.recovered(result["outcome"], result["seconds"], result["slots_rebuilt"],
                               result["slots_recomputed"])
        if restart_phases and self.rank in lost:
            self.metrics.restarted(result["phases"])
        for phase, seconds in result["phases"].items():
            log.info("recovery phase", rank=self.rank, step=self.step, phase=phase.removesuffix("_seconds"),
                     seconds=seconds)
        log.info("recovery", rank=self.rank, **result)
        return result

    def call(self, fn):
        """Run ``fn`` on the worker thread after every step queued before it; return its result."""
        box: queue.Queue = queue.Queue(maxsize=1)
        stopped = RuntimeError("GhostServe's worker has stopped; the server is shutting down")
        if not self.work_queue.put(("call", fn, box)):
            raise stopped
        while True:
            try:
                result = box.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._worker.is_alive():
                    raise stopped from self._failure
        if isinstance(result, BaseException):
            raise result
        return result

    def quiesce(self) -> None:
        """A peer died: drop the steps still queued (their exchange cannot happen) and wait until the
        worker is idle, so that the groups can be re-formed under it."""
        self.holding = True
        self.call(lambda: None)

    def resume_after_rejoin(self, generation: int) -> None:
        """Every rank, at the same point, once the groups are re-formed at ``generation``."""
        self.collectives.start_exchange(generation)
        self.holding = False
        self._failure = None

    def raise_failure(self) -> None:
        if self._failure is not None and self.settings.strict:
            raise RuntimeError(f"GhostServe worker failed: {self._failure!r}") from self._failure

    def _unlink_on(self, signum: int) -> None:
        """Stopping the server (SIGTERM, Ctrl-C) removes this rank's host files, then does what the
        signal did before. A crash (SIGKILL) leaves them for recovery."""
        previous = signal.getsignal(signum)

        def handler(sig, frame):
            self.unlink_files()
            if callable(previous):
                previous(sig, frame)
            else:
                signal.signal(sig, signal.SIG_DFL)
                os.kill(os.getpid(), sig)

        signal.signal(signum, handler)

    def unlink_files(self) -> None:
        for path in (self.segment.path, self.control.path if self.control else None):
            if path and os.path.exists(path):
                os.unlink(path)
        exchange.remove(self.instance_id, self.rank)

    def close(self) -> None:
        """Stop the worker and the drain without waiting for queued work (bounded waits). The host
        segment is unmapped only once nothing can touch it any more."""
        if self.closed:
            return
        self.closed = True
        self._close_queue("GhostServe is shutting down")
        self.drain.pause()  # a worker waiting for ring room drops its step and goes on
        self._worker.join(timeout=30)
        self._reporter.join(timeout=5)
        drained = self.drain.stop(flush=False, timeout_s=30)
        if drained and not self._worker.is_alive() and not self._reporter.is_alive():
            self.segment.close()
        if self.control is not None:
            self.control.close()
        if not self.supervised:  # else a replacement re-attaches; the launcher removes them
            self.unlink_files()

    # -- worker thread -----------------------------------------------------------------------------
    def _work(self) -> None:
        stream = torch.cuda.stream(self._stream) if self._stream is not None else None
        if stream is not None:
            stream.__enter__()
        while True:
            try:
                item = self.work_queue.get()
            except Exception as exc:  # the device failed under the wait: nothing more can be done
                self._failure = exc
                self.count_error("worker", exc)
                self._close_queue(f"GhostServe's worker failed: {exc!r}")
                return
            if item is None:
                return
            kind = item[0]
            try:
                if kind == "step" and self.holding:
                    self.steps_lost_with_peer += 1
                elif kind == "step":
                    self._encode_step(*item[1:])
                elif kind == "free":
                    self.drain.invalidate(item[1].cpu())
                elif kind == "call":
                    item[2].put(self._run_call(item[1]))
            except Exception as exc:
                if self.supervised and peer_lost(exc):  # the scheduler thread holds too
                    self.steps_lost_with_peer += 1
                else:
                    self._failure = exc
                    self.count_error("worker", exc)
            finally:
                item = None  # its tensors no longer count against the queue's bound
                self.work_queue.done()

    def _close_queue(self, reason: str) -> None:
        """Close the queue to the worker; control calls still waiting in it are answered with ``reason``."""
        for _, _, box in (item for item in self.work_queue.close() if item[0] == "call"):
            box.put(RuntimeError(reason))

    def _run_call(self, fn):
        """``fn``'s result, or its exception (the caller raises it), once the device work it queued
        on this stream has finished: SGLang's next forward never sees KV half written."""
        try:
            result = fn()
        except Exception as exc:
            result = exc
        if self._stream is not None:
            try:
                self._stream.synchronize()
            except Exception as exc:
                result = exc
        return result

    def _encode_step(self, step: int, slots: torch.Tensor, columns: torch.Tensor, captured_at: float,
                     posted: tuple[int, int] | None) -> None:
        """Exchange, encode, stage: a fixed number of launches, no host synchronisation. Slot 0 (padded
        tokens' writes, never live) goes along; the drain skips it. ``posted``: the step's exchange
        round, if the scheduler thread posted it early."""
        started, cpu = time.perf_counter(), time.thread_time()
        records = self.encode_columns(columns, posted)
        self.drain.submit(step, slots, records, captured_at)
        self.metrics.add("ghostserve_parity_produced_bytes_total", records.numel())
        self.seconds["worker"] += time.perf_counter() - started
        self.seconds["worker_cpu"] += time.thread_time() - cpu

    def count_error(self, where: str, exc: BaseException) -> None:
        """Errors inside GhostServe are counted; the first of each kind is logged with its traceback."""
        self.errors[where] = self.errors.get(where, 0) + 1
        if self.errors[where] == 1:
            log.error("ghostserve error; protection of affected slots is lost", where=where,
                      rank=self.rank, step=self.step, error=repr(exc), exc_info=exc)

    def encode_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """This rank's parity records ``[n, record_bytes]`` of ``slots`` as the pool holds them now (the
        same slots on every rank). Collective for xor and rs."""
        return self.encode_columns(self.kv.gather_columns(slots, *self.cut))

    def encode_columns(self, columns: torch.Tensor, posted: tuple[int, int] | None = None) -> torch.Tensor:
        """Records of captured ``columns`` (``kv.gather_columns(slots, *self.cut)``): exchanged first
        for xor and rs (collective; ``posted``: the exchange round already posted for them); where
        parity is the XOR of the columns and the exchange can reduce, both in one pass."""
        if not self.exchanges:
            return self.encoder.encode(columns)
        if self.encoder.is_xor and self.collectives.reduces_xor:
            ranks, n, layers, column = columns.shape
            return self.collectives.reduce_scatter_xor(columns, posted).view(n, layers * column)
        return self.encoder.encode(self.collectives.all_to_all(columns, posted))

    # -- collectives on GhostServe's own groups (worker thread) ------------------------------------
    def exchange_columns(self, slots: torch.Tensor) -> torch.Tensor:
        """Cut each slot-layer's bytes into ``ranks`` columns and send column j to rank j: returns
        ``[ranks, n, layers, column_bytes]`` where entry i is rank i's column of this rank's index."""
        return self.all_to_all(self.kv.gather_columns(slots, self.ranks, self.geometry.column_bytes))

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        return self.collectives.all_to_all(send)

    def all_reduce(self, tensor: torch.Tensor, op) -> None:
        self.collectives.all_reduce(tensor, op)

    def gather_objects(self, value):
        return self.collectives.gather_objects(value)

    def coverage(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Live slots, slots with durable parity, and the live ones among those (protected)."""
        live = self.live_slots()
        durable = self.segment.durable_slots()
        return live, durable, live[torch.isin(live, durable)]

