"""GhostServe's Prometheus metrics, exported through SGLang's own ``/metrics`` (``--enable-metrics``).

SGLang runs prometheus-client in multiprocess mode and sets ``PROMETHEUS_MULTIPROC_DIR`` before it spawns
the scheduler processes; this module is imported only inside them (by the Protector), after that. Every
series carries ``tp_rank``; the only other labels are bounded (``code``, ``outcome``). Every gauge names
its multiprocess mode: each rank writes its own labelled series, so "most recent" is that rank's value.

May import: nothing else in the package.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
OUTCOMES = ("rebuilt", "rebuilt_and_recomputed", "recomputed")
LABELS = ("tp_rank", "code")


_SERIES: dict[str, object] = {}  # one of each per process, whichever Protector asks first


def _series(kind: type, name: str, doc: str, labels: tuple[str, ...] = LABELS, **options):
    if name not in _SERIES:
        _SERIES[name] = kind(name, doc, labels, **options)
    return _SERIES[name]


def _gauge(name: str, doc: str) -> Gauge:
    return _series(Gauge, name, doc, multiprocess_mode="mostrecent")


class Metrics:
    """One rank's series. Counters that mirror the drain's totals are advanced by the difference since
    the last ``sync``."""

    def __init__(self, tp_rank: int, code: str) -> None:
        labels = {"tp_rank": str(tp_rank), "code": code}
        c = {}
        for name, doc in (
            ("ghostserve_steps_captured_total", "Forward steps whose KV writes were captured."),
            ("ghostserve_parity_produced_bytes_total", "Parity bytes encoded and handed to the drain."),
            ("ghostserve_parity_drained_bytes_total", "Parity bytes made durable in the host store."),
            ("ghostserve_backpressure_stalls_total", "Times a step waited for room in the staging ring or "
             "the capture queue."),
            ("ghostserve_backpressure_drops_total", "Steps whose protection was dropped: staging full."),
            ("ghostserve_checksum_failures_total", "Host parity records that failed their CRC on read."),
            ("ghostserve_faults_injected_total", "Faults injected by the fault-injection drill."),
            ("ghostserve_slots_rebuilt_total", "KV slots rebuilt from parity by recoveries."),
            ("ghostserve_slots_recomputed_total", "KV slots left to SGLang to recompute by recoveries."),
            ("ghostserve_scrub_mismatches_total", "Slots whose host parity differed from the KV in scrubs."),
            ("ghostserve_errors_total", "Errors inside GhostServe (counted, logged once; SGLang continued)."),
            ("ghostserve_rank_restarts_total", "Times this TP rank's process died and was replaced."),
            ("ghostserve_rank_stalls_total", "Times this TP rank hung (its progress stamp stood still while "
             "a peer waited for it) and was ended and replaced."),
        ):
            c[name] = _series(Counter, name, doc).labels(**labels)
        self.counters = c
        self.recoveries = _series(Counter, "ghostserve_recoveries_total", "Recoveries, by outcome.",
                                  (*LABELS, "outcome"))
        self.recoveries_by_outcome = {o: self.recoveries.labels(**labels, outcome=o) for o in OUTCOMES}
        g = {}
        for name, doc in (
            ("ghostserve_checkpoint_lag_steps", "Steps captured but not yet durable in the host store."),
            ("ghostserve_checkpoint_lag_seconds", "Age of the oldest step not yet durable."),
            ("ghostserve_durable_watermark", "Last step whose parity is entirely durable (step number)."),
            ("ghostserve_host_store_used_bytes", "Host parity bytes holding durable records."),
            ("ghostserve_host_store_capacity_bytes", "Size of this rank's host parity segment."),
            ("ghostserve_protected_tokens", "Live KV slots whose parity is durable on this rank."),
            ("ghostserve_unprotected_tokens", "Live KV slots without durable parity on this rank."),
            ("ghostserve_lost_ranks", "Ranks whose KV is lost and not yet recovered."),
        ):
            g[name] = _gauge(name, doc).labels(**labels)
        self.gauges = g
        self.capture_seconds = _series(
            Histogram, "ghostserve_capture_overhead_seconds", "Time a forward step spends in GhostServe's "
            "capture on the scheduler thread.", buckets=LATENCY_BUCKETS).labels(**labels)
        self.recovery_seconds = _series(
            Histogram, "ghostserve_recovery_duration_seconds", "Wall time of a recovery, rebuild and "
            "recompute.", buckets=LATENCY_BUCKETS).labels(**labels)
        self.restart_phase_seconds = _series(
            Histogram, "ghostserve_rank_restart_phase_seconds", "Wall time of each phase of a rank "
            "replacement (hang_detect, hold, join, state_transfer, flush, read, exchange, decode, scatter, "
            "recompute).",
            (*LABELS, "phase"), buckets=LATENCY_BUCKETS)
        self._labels = labels
        self._mirrored: dict[str, float] = {}

    def add(self, name: str, amount: float = 1) -> None:
        self.counters[name].inc(amount)

    def mirror(self, name: str, total: float) -> float:
        """Advance a counter to ``total`` (a running total kept elsewhere); returns the increase."""
        increase = total - self._mirrored.get(name, 0)
        if increase > 0:
            self.counters[name].inc(increase)
            self._mirrored[name] = total
        return increase

    def set(self, name: str, value: float) -> None:
        self.gauges[name].set(value)

    def restarted(self, phases: dict[str, float]) -> None:
        """This rank's process is a replacement that has just joined and been rebuilt."""
        self.add("ghostserve_rank_restarts_total")
        for phase, seconds in phases.items():
            name = phase.removesuffix("_seconds")
            self.restart_phase_seconds.labels(**self._labels, phase=name).observe(seconds)

    def recovered(self, outcome: str, seconds: float, rebuilt: int, recomputed: int) -> None:
        self.recoveries_by_outcome[outcome].inc()
        self.recovery_seconds.observe(seconds)
        self.add("ghostserve_slots_rebuilt_total", rebuilt)
        self.add("ghostserve_slots_recomputed_total", recomputed)
