"""What one rank reports about its protection: its part of ``ghostserve status``, and the metrics it
refreshes every second (also while idle, so that lag is seen to return to 0)."""

from __future__ import annotations

import os
import time

import structlog

log = structlog.get_logger("ghostserve.protector")


def quantiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99), "mean": sum(ordered) / len(ordered), "count": len(ordered)}


def status(protector, restarts: int, extra: dict | None = None) -> dict:
    """Every rank's status, gathered (worker thread, collective); ``restarts``: how many times this
    rank was replaced; ``extra``: more of this rank's fields."""
    p = protector
    counters = p.drain.counters()
    live, durable, protected = p.coverage()
    mine = {
        "rank": p.rank, "pid": os.getpid(), "code": p.settings.code,
        "parity_shards": p.geometry.parity_shards,
        "exchange": p.collectives.transport,
        "step": p.step, "durable_watermark": p.segment.watermark,
        "lag_steps": counters.lag_steps, "lag_seconds": counters.lag_seconds,
        "live_slots": len(live), "protected_slots": len(protected),
        "parity_bytes_in_use": len(durable) * p.geometry.record_bytes,
        "host_bytes": p.segment.size_bytes, "record_bytes": p.geometry.record_bytes,
        "bytes_drained": counters.bytes_drained, "stalls": counters.stalls, "drops": counters.drops,
        "capture_queue_bytes": p.queue_bytes, "capture_queue_stalls": p.work_queue.stalls,
        "capture_queue_stall_seconds": p.work_queue.stall_seconds,
        "checksum_failures": counters.checksum_failures, "errors": sum(p.errors.values()),
        "pageable_copies": counters.pageable_copies,
        "lost_ranks": sorted(p.lost), "recoveries": len(p.recoveries),
        "last_recovery": p.recoveries[-1] if p.recoveries else None,
        "restarts": restarts,
        "steps_lost_with_peer": p.steps_lost_with_peer,
        "capture_seconds": p.seconds["capture"], "worker_seconds": p.seconds["worker"],
        "worker_cpu_seconds": p.seconds["worker_cpu"],
        "exchange_wait_seconds": p.collectives.wait_seconds,
        "drain_write_seconds": counters.write_seconds,
        "checkpoint_latency_seconds": quantiles(p.drain.latencies()),
        **(extra or {}),
    }
    return {"instance_id": p.instance_id, "ranks": p.gather_objects(mine)}


def refresh_metrics(protector, period_s: float = 1.0) -> None:
    """The metrics thread: refresh every ``period_s`` until the protector closes, and log
    backpressure as it happens. Errors counted by the hooks (``protector.hook_errors``) count too."""
    p = protector
    m, warned = p.metrics, False
    while True:
        time.sleep(period_s)
        if p.closed:
            return
        try:
            counters = p.drain.counters()
            m.mirror("ghostserve_parity_drained_bytes_total", counters.bytes_drained)
            m.mirror("ghostserve_checksum_failures_total", counters.checksum_failures)
            m.mirror("ghostserve_errors_total", sum(p.errors.values()) + sum(p.hook_errors.values()))
            stalls = counters.stalls + p.work_queue.stalls  # the ring's and the capture queue's
            for name, what in (("ghostserve_backpressure_stalls_total", stalls),
                               ("ghostserve_backpressure_drops_total", counters.drops)):
                if m.mirror(name, what) > 0:
                    log.warning("backpressure", rank=p.rank, step=p.step, stalls=counters.stalls,
                                capture_queue_stalls=p.work_queue.stalls, drops=counters.drops,
                                dropped_records=counters.dropped_records,
                                stall_seconds=counters.stall_seconds)
            m.set("ghostserve_checkpoint_lag_steps", counters.lag_steps)
            m.set("ghostserve_checkpoint_lag_seconds", counters.lag_seconds)
            m.set("ghostserve_durable_watermark", p.segment.watermark)
            live, durable, protected = p.coverage()
            m.set("ghostserve_host_store_used_bytes", len(durable) * p.geometry.record_bytes)
            m.set("ghostserve_protected_tokens", len(protected))
            m.set("ghostserve_unprotected_tokens", len(live) - len(protected))
            m.set("ghostserve_lost_ranks", len(p.lost))
        except Exception as exc:  # e.g. a racing read of SGLang's allocator; the next round retries
            if not warned:
                log.warning("metrics refresh failed; retrying", rank=p.rank, step=p.step, error=repr(exc))
                warned = True
