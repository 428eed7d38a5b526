"""The wrappers where a survivor notices a peer's death, as a failed collective, and holds for its
replacement (``restart.rejoin``; docs/rank-restart.md), and where each rank stamps the phase of SGLang's
loop it enters (``restart.liveness``: receiving the request broadcast, scheduling, forward, output,
holding). Without the launcher's supervision, or for any other error, SGLang's own behaviour is
unchanged."""

from __future__ import annotations

from ...drills import process as drills
from ..protection.collectives import peer_lost
from ..restart import liveness, rejoin
from .state import STATE


def _holding_protector(exc: BaseException):
    """This rank's Protector if ``exc`` is a peer's death the launcher replaces; else None."""
    protector = STATE.protector
    return protector if rejoin.enabled() and protector is not None and peer_lost(exc) else None


def broadcast_reqs(wrapped, instance, args, kwargs):
    """``SchedulerRequestReceiver._broadcast_reqs_across_ranks``: on a peer's death, hold, then send
    the same requests again to the re-formed group."""
    drills.hang_here("idle")
    while True:
        liveness.next_iteration()
        try:
            result = wrapped(*args, **kwargs)
            rejoin.MEMBERS.broadcasts += 1
            liveness.enter(liveness.SCHEDULING)
            return result
        except Exception as exc:
            protector = _holding_protector(exc)
            if protector is None:
                raise
            if rejoin.hold(protector.scheduler, protector, exc, "ingest"):
                # A survivor got these requests (they are in the state now): join the next broadcast.
                pulled = args[0] if args else kwargs.get("recv_reqs")
                args, kwargs = ([] if pulled is not None else None,), {}


def run_batch(wrapped, instance, args, kwargs):
    """``Scheduler.run_batch``: on a peer's death during the batch, hold, then roll the batch back."""
    counters = (instance.forward_ct, instance.processed_tokens_counter)
    batch = args[0] if args else kwargs["batch"]
    liveness.enter(liveness.FORWARD)
    try:
        if STATE.protector is not None and STATE.protector.settings.enable_fault_injection:
            drills.in_batch(STATE.protector, batch)
        result = wrapped(*args, **kwargs)
        liveness.enter(liveness.OUTPUT)
        if rejoin.MEMBERS.suspects is not None:
            rejoin.batch_ran(batch)
        return result
    except Exception as exc:
        protector = _holding_protector(exc)
        if protector is None:
            raise
        instance.forward_ct, instance.processed_tokens_counter = counters
        rejoin.hold(instance, protector, exc, "run_batch", batch)
        return rejoin.ABANDONED


def process_batch_result(wrapped, instance, args, kwargs):
    """``Scheduler.process_batch_result``: nothing to process for a rolled-back batch."""
    result = args[1] if len(args) > 1 else kwargs.get("result")
    if result is rejoin.ABANDONED:
        return None
    return wrapped(*args, **kwargs)

