"""A scheduler rank's side of replacing a dead peer (docs/rank-restart.md): survivors hold, everyone
re-forms the groups, the replacement receives the state, the lost KV is rebuilt, serving resumes.

Survivors notice the death as a failed collective in one of two places of SGLang's loop: the request
broadcast at the top of an iteration (``ingest``), or inside the forward of the batch just formed
(``run_batch``). In both they wait for the supervisor's announcement of a replacement, replay their
start-up calls against the new rendezvous (``regroup``), and the lowest survivor sends its state
(``snapshot``). Then every rank, the replacement included, checks a digest of that state, rebuilds the
lost rank's KV from parity and recomputes what parity does not cover. An interrupted ``ingest`` is
simply retried. An interrupted ``run_batch`` is rolled back through SGLang's retraction: its requests go
back to the waiting queue with the KV they had (kept in the prefix cache), and are scheduled again.
"""

from __future__ import annotations

import dataclasses
import time

import structlog
import torch
import torch.distributed as dist

from . import handover, membership, snapshot
from .regroup import Transcript

log = structlog.get_logger("ghostserve.rejoin")

ANNOUNCEMENT_WAIT_SECONDS = 10.0  # a failed collective without a replacement announced is a real error


class RejoinError(RuntimeError):
    """The ranks could not agree after a replacement; the server must fail stop."""


@dataclasses.dataclass
class Membership:
    instance_id: str = ""
    generation: int = 0
    transcript: Transcript = dataclasses.field(default_factory=Transcript)
    restarts: dict = dataclasses.field(default_factory=dict)  # tp rank -> replacements seen


MEMBERS = Membership()
ABANDONED = object()  # run_batch's result for a batch rolled back by a replacement
# A replacement's phases before the rebuild's own: the survivors' detection (failed collective to the
# supervisor's announcement), the replacement's start (announcement to SGLang's scheduler init) and its
# join (weights loaded, groups re-formed), then the state transfer.
PHASES = ("detect_seconds", "spawn_seconds", "join_seconds", "state_transfer_seconds")


def peer_lost(exc: BaseException) -> bool:
    """Whether an error looks like a collective failing because a peer is gone."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or "gloo" in text or "Connection closed" in text


def enabled() -> bool:
    return membership.supervised()


def hold(scheduler, protector, exc: BaseException, phase: str, batch=None) -> None:
    """A survivor's collective failed with ``exc`` in ``phase``. Returns once the group is whole again
    and the state agrees; raises ``exc`` if no replacement is announced (a real error)."""
    announced = membership.wait_for(MEMBERS.instance_id, MEMBERS.generation, ANNOUNCEMENT_WAIT_SECONDS)
    if announced is None:
        raise exc
    started = time.monotonic()
    lost = announced["replaced"]
    log.warning("peer lost; holding for its replacement", rank=protector.rank, step=protector.step,
                phase=phase, lost_ranks=lost, generation=announced["generation"], error=str(exc)[:200])
    protector.quiesce()
    phases = {"detect_seconds": time.monotonic() - started}
    # SGLang's scheduler watchdog counts a batch that makes no progress as stuck; this one waits on purpose.
    in_flight, scheduler.cur_batch_for_debug = scheduler.cur_batch_for_debug, None
    try:
        _regroup(announced, [scheduler, protector])
    finally:
        scheduler.cur_batch_for_debug = in_flight
    started = time.monotonic()
    tp = _tp_group()
    source = min(r for r in range(tp.world_size) if r not in lost)
    data = None
    if tp.rank_in_group == source:
        data = snapshot.take(scheduler, {"step": protector.step, "phase": phase,
                                         "restarts": MEMBERS.restarts})
    data = _broadcast(data, source, tp)
    phases["state_transfer_seconds"] = time.monotonic() - started
    _settle(scheduler, protector, lost, phase, batch, phases, len(data))


def join(scheduler, protector, generation: int, phases: dict) -> None:
    """The replacement's side, at the end of its start-up (``phases`` says how long it took): receive
    the state, then settle."""
    started = time.monotonic()
    announced = membership.read(MEMBERS.instance_id)
    MEMBERS.generation = generation
    lost = announced["replaced"]
    tp = _tp_group()
    source = min(r for r in range(tp.world_size) if r not in lost)
    data = _broadcast(None, source, tp)
    extra = snapshot.load(scheduler, data)
    protector.step = extra["step"]
    MEMBERS.restarts = extra["restarts"]
    phase, batch = extra["phase"], scheduler.cur_batch_for_debug
    phases["state_transfer_seconds"] = time.monotonic() - started
    _settle(scheduler, protector, lost, phase, batch, phases, len(data))
    if phase == "run_batch":
        scheduler.last_batch = batch  # what SGLang's loop sets after the (rolled back) batch
    if handover.CHANNEL is not None:  # this is rank 0: send what the clients did not get
        handover.take_over(scheduler, handover.ask_main_process("delivered"))


def _regroup(announced: dict, holders: list) -> None:
    """Re-form the groups; SGLang's group coordinators (its module globals) and ``holders`` are
    re-pointed at the new ones."""
    from sglang.srt.distributed import parallel_state

    MEMBERS.generation = announced["generation"]
    coordinators = [ref() for ref in parallel_state._groups.values()]
    changed = MEMBERS.transcript.replay(f"tcp://127.0.0.1:{announced['port']}",
                                        [parallel_state, *filter(None, coordinators), *holders])
    log.info("groups re-formed", generation=announced["generation"], holders_changed=changed)


def _settle(scheduler, protector, lost: list[int], phase: str, batch, phases: dict, state_bytes: int) -> None:
    """Every rank: check that the state agrees, rebuild the lost KV, roll back an interrupted batch."""
    tp = _tp_group()
    parts = snapshot.digest(scheduler, (protector.step, phase))
    low, high = torch.tensor(list(parts.values())), torch.tensor(list(parts.values()))
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=tp.cpu_group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=tp.cpu_group)
    differing = [name for name, lo, hi in zip(parts, low.tolist(), high.tolist()) if lo != hi]
    if differing:
        raise RejoinError(f"scheduler state differs across ranks after the replacement of rank(s) {lost}: "
                          f"{', '.join(differing)}")
    for rank in lost:
        MEMBERS.restarts[rank] = MEMBERS.restarts.get(rank, 0) + 1
    every: list = [None] * tp.world_size
    dist.all_gather_object(every, phases, group=tp.cpu_group)
    phases = {name: max(p.get(name, 0.0) for p in every) for name in PHASES if any(name in p for p in every)}
    protector.resume_after_rejoin()
    if phase == "run_batch":
        # The batch being formed already merged the previous one into the running batch; the
        # retraction takes back the running batch and, if it is a new prefill batch, this one.
        extend = batch is not None and batch.forward_mode.is_extend() and batch is not scheduler.running_batch
        scheduler.last_batch = batch if extend else None
    result = protector.recover(scheduler, lost, retract=phase == "run_batch", restart_phases=phases)
    if phase == "run_batch" and batch is not None:
        batch.filter_batch(keep_indices=[])
    log.info("rank replaced", rank=protector.rank, step=protector.step, lost_ranks=lost, phase=phase,
             state_bytes=state_bytes, outcome=result["outcome"], generation=MEMBERS.generation)


def _tp_group():
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().tp_group


def _broadcast(data: bytes | None, source: int, tp) -> bytes:
    box = [data]
    dist.broadcast_object_list(box, src=tp.ranks[source], group=tp.cpu_group)
    return box[0]


# -- wrappers (patches.TARGETS) ---------------------------------------------------------------------
def _holding_protector(exc: BaseException):
    """This rank's Protector if ``exc`` is a peer's death the launcher replaces; else None."""
    from .hooks import STATE

    protector = STATE.protector
    return protector if enabled() and protector is not None and peer_lost(exc) else None


def broadcast_reqs(wrapped, instance, args, kwargs):
    """``SchedulerRequestReceiver._broadcast_reqs_across_ranks``: on a peer's death, hold, then send
    the same requests again to the re-formed group."""
    while True:
        try:
            return wrapped(*args, **kwargs)
        except Exception as exc:
            protector = _holding_protector(exc)
            if protector is None:
                raise
            hold(protector.scheduler, protector, exc, "ingest")


def run_batch(wrapped, instance, args, kwargs):
    """``Scheduler.run_batch``: on a peer's death during the batch, hold, then roll the batch back."""
    counters = (instance.forward_ct, instance.processed_tokens_counter)
    try:
        return wrapped(*args, **kwargs)
    except Exception as exc:
        protector = _holding_protector(exc)
        if protector is None:
            raise
        instance.forward_ct, instance.processed_tokens_counter = counters
        hold(instance, protector, exc, "run_batch", args[0] if args else kwargs["batch"])
        return ABANDONED


def process_batch_result(wrapped, instance, args, kwargs):
    """``Scheduler.process_batch_result``: nothing to process for a rolled-back batch."""
    result = args[1] if len(args) > 1 else kwargs.get("result")
    if result is ABANDONED:
        return None
    return wrapped(*args, **kwargs)

