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

from ...drills import process as drills
from ..protection.collectives import peer_lost
from . import handover, liveness, membership, policy, snapshot
from .regroup import Transcript

log = structlog.get_logger("ghostserve.rejoin")

ANNOUNCEMENT_WAIT_SECONDS = 10.0  # a failed collective without a replacement announced is a real error
RENDEZVOUS_WAIT_SECONDS = 3600.0  # the supervisor's own deadline (--ghost-rejoin-timeout-seconds) decides
PROGRESS = {"run_batch": 0, "ingest": 1}  # with equal broadcasts: failed in the forward < in the next ingest


class RejoinError(RuntimeError):
    """The ranks could not agree after a replacement; the server must fail stop."""


@dataclasses.dataclass
class Membership:
    generation: int = 0
    transcript: Transcript = dataclasses.field(default_factory=Transcript)
    restarts: dict = dataclasses.field(default_factory=dict)  # tp rank -> replacements seen
    broadcasts: int = 0  # request broadcasts this rank completed (how far it got)
    suspects: policy.Suspects | None = None  # the last death in a forward, until its batch ran (policy)


MEMBERS = Membership()
ABANDONED = object()  # run_batch's result for a batch rolled back by a replacement
# A replacement's phases before the rebuild's own: the survivors' detection (failed collective to the
# supervisor's announcement), the replacement's start (announcement to SGLang's scheduler init) and its
# join (weights loaded, groups re-formed), then the state transfer.
PHASES = ("hang_detect_seconds", "detect_seconds", "spawn_seconds", "join_seconds", "state_transfer_seconds")


def enabled() -> bool:
    return membership.supervised()


def hold(scheduler, protector, exc: BaseException, phase: str, batch=None) -> bool:
    """A survivor's collective failed with ``exc`` in ``phase``. Returns once the group is whole again
    and the state agrees; raises ``exc`` if no replacement is announced (a real error). Returns whether
    this rank took the state of a survivor that had got further (then the interrupted call is void)."""
    liveness.enter(liveness.HOLDING)
    announced = membership.wait_for(MEMBERS.generation, ANNOUNCEMENT_WAIT_SECONDS)
    if announced is None:
        raise exc
    if protector.settings.enable_fault_injection:
        drills.at_hold(protector.rank)
    started = time.monotonic()
    log.warning("peer lost; holding for its replacement", rank=protector.rank, step=protector.step,
                phase=phase, lost_ranks=announced["replaced"], generation=announced["generation"],
                error=str(exc)[:200])
    phases = {"detect_seconds": time.monotonic() - started}
    while True:  # another rank may die while this one is being replaced: then a new generation
        protector.quiesce()
        try:
            _rendezvous(announced, protector.rank, [scheduler, protector])
            return _transfer(scheduler, protector, announced["replaced"], phase, batch, phases)
        except Exception as again:
            if not (isinstance(again, _Superseded) or peer_lost(again)):
                raise
            later = membership.wait_for(announced["generation"], ANNOUNCEMENT_WAIT_SECONDS)
            if later is None:
                raise
            log.warning("another rank lost during the replacement", rank=protector.rank,
                        lost_ranks=later["replaced"], generation=later["generation"], error=str(again)[:200])
            announced = later


def join(scheduler, protector, generation: int, phases: dict) -> None:
    """The replacement's side, at the end of its start-up (``phases`` says how long it took): receive
    the state, then settle."""
    MEMBERS.generation = generation
    _transfer(scheduler, protector, membership.read()["replaced"], None, None, phases)
    if handover.CHANNEL is not None:  # this is rank 0: send what the clients did not get
        handover.take_over(scheduler, handover.ask_main_process("delivered"))


class _Superseded(RuntimeError):
    """A later generation was announced before every rank arrived at this one."""


def arrive(generation: int, rank: int, world: int) -> None:
    """Mark this rank's arrival at ``generation`` and wait for every other rank's."""
    membership.arrive(generation, rank)
    if not membership.gathered(generation, world, RENDEZVOUS_WAIT_SECONDS):
        raise _Superseded(f"generation {generation} was superseded before every rank arrived")


def _rendezvous(announced: dict, rank: int, holders: list) -> None:
    from sglang.srt.distributed import parallel_state

    arrive(announced["generation"], rank, _tp_group().world_size)
    MEMBERS.generation = announced["generation"]
    coordinators = [ref() for ref in parallel_state._groups.values()]
    scheduler = holders[0]
    # SGLang's scheduler watchdog counts a batch that makes no progress as stuck; this one waits on purpose.
    in_flight, scheduler.cur_batch_for_debug = scheduler.cur_batch_for_debug, None
    try:
        changed = MEMBERS.transcript.replay(f"tcp://{announced['host']}:{announced['port']}",
                                            [parallel_state, *filter(None, coordinators), *holders])
    finally:
        scheduler.cur_batch_for_debug = in_flight
    log.info("groups re-formed", generation=announced["generation"], holders_changed=changed)


def _transfer(scheduler, protector, lost: list[int], phase: str | None, batch, phases: dict) -> bool:
    """Every rank, once the groups are re-formed: the survivor that got furthest (``phase`` None: a
    replacement) sends its state; whoever is behind it loads it; then settle. Returns whether this rank
    loaded the state."""
    started = time.monotonic()
    tp = _tp_group()
    mine = None if phase is None else (MEMBERS.broadcasts, PROGRESS[phase])
    every: list = [None] * tp.world_size
    dist.all_gather_object(every, mine, group=tp.cpu_group)
    source = max((r for r in range(tp.world_size) if every[r] is not None), key=lambda r: (every[r], -r))
    data = None
    if tp.rank_in_group == source:
        data = snapshot.take(scheduler, {"step": protector.step, "phase": phase, "restarts": MEMBERS.restarts,
                                         "broadcasts": MEMBERS.broadcasts, "suspects": MEMBERS.suspects,
                                         "written": protector.written.cpu()})
    data = _broadcast(data, source, tp)
    loads = mine != every[source]
    if loads:
        interrupted = batch
        extra = snapshot.load(scheduler, data)
        protector.step, MEMBERS.restarts = extra["step"], extra["restarts"]
        protector.written.copy_(extra["written"])
        MEMBERS.broadcasts, MEMBERS.suspects = extra["broadcasts"], extra["suspects"]
        phase, batch = extra["phase"], scheduler.cur_batch_for_debug
        if interrupted is not None:  # SGLang's loop makes its own (now stale) batch the last one
            _stand_in(scheduler, interrupted, scheduler.last_batch if phase == "ingest" else batch)
            batch = interrupted if phase == "run_batch" else batch
    snapshot.clear_free_rows(scheduler)
    phases["state_transfer_seconds"] = time.monotonic() - started
    _settle(scheduler, protector, lost, phase, batch, phases, len(data))
    if loads and phase == "run_batch":
        scheduler.last_batch = batch  # what SGLang's loop sets after the (rolled back) batch
    return loads


def _stand_in(scheduler, stale, loaded) -> None:
    """Make the batch object SGLang's loop holds (``stale``) the loaded one in all but identity."""
    from .regroup import repoint

    if loaded is None:
        stale.filter_batch(keep_indices=[])
        return
    stale.__dict__ = loaded.__dict__
    repoint([(loaded, stale)], [scheduler])


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
    protector.resume_after_rejoin(MEMBERS.generation)
    killed = {req.rid for req in batch.reqs} if phase == "run_batch" and batch is not None else set()
    ended = policy.implicated(MEMBERS.suspects, lost, killed)
    MEMBERS.suspects = policy.Suspects(tuple(lost), frozenset(killed)) if killed and not ended else None
    if phase == "run_batch":
        # The batch being formed already merged the previous one into the running batch; the
        # retraction takes back the running batch and, if it is a new prefill batch, this one.
        extend = batch is not None and batch.forward_mode.is_extend() and batch is not scheduler.running_batch
        scheduler.last_batch = batch if extend else None
    result = protector.recover(scheduler, lost, retract=phase == "run_batch", restart_phases=phases)
    if phase == "run_batch" and batch is not None:
        batch.filter_batch(keep_indices=[])
    _end_requests(scheduler, ended, policy.cause(lost))
    log.info("rank replaced", rank=protector.rank, step=protector.step, lost_ranks=lost, phase=phase,
             state_bytes=state_bytes, outcome=result["outcome"], generation=MEMBERS.generation)


def _end_requests(scheduler, rids: list[str], reason: str) -> None:
    """Answer ``rids`` (back in the waiting queue after the rollback) with an error, through SGLang's own
    abort; every rank ends the same ones."""
    from sglang.srt.managers.io_struct import AbortReq

    if rids:
        log.error("requests ended: their batch killed a rank twice", rids=rids, reason=reason)
    for rid in rids:
        scheduler.abort_request(AbortReq(rid=rid, abort_message=reason, finished_reason={
            "type": "abort", "status_code": 500, "message": reason}))


def batch_ran(batch) -> None:
    """A forward completed: a batch that holds the suspects' requests no longer kills (policy)."""
    if MEMBERS.suspects is not None and any(req.rid in MEMBERS.suspects.rids for req in batch.reqs):
        MEMBERS.suspects = None


def _tp_group():
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().tp_group


def _broadcast(data: bytes | None, source: int, tp) -> bytes:
    box = [data]
    dist.broadcast_object_list(box, src=tp.ranks[source], group=tp.cpu_group)
    return box[0]
