"""Drills that end or hang a rank's process, for testing the replacement of a dead or hung rank (only
with ``--ghost-enable-fault-injection``): ``ghostserve kill-rank`` and the moments it can pick, and
``ghostserve hang-rank`` and the points where the rank blocks for ever."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import threading

from ..shm import shm_dir

SIGNALS = ("KILL", "TERM", "SEGV")
# ERROR: the rank's next forward raises, and SGLang ends the process; STOP (with --at hold only): the
# process stops and never reaches the rendezvous, as one blocked in a collective would.
HOWS = (*SIGNALS, "ERROR", "STOP")
# When: at once; before its next output; before its next output that finishes a request; (rank 0) right
# after it pulled requests from the tokenizer, before it broadcast them to the other ranks; when it
# starts holding for the replacement of another rank that died; in the forward of its next batch and of
# every later batch holding one of that batch's requests, its replacements too (a request that crashes
# the model every time).
MOMENTS = ("now", "output", "finish", "pulled", "hold", "batch")
KILL_DELAY_SECONDS = 0.2  # the reply leaves rank 0 before the target goes
FORWARD_ERROR = threading.Event()  # set on the target rank: its next forward raises
AT_MOMENT: dict = {}  # on the target rank, for a moment other than "now": {"moment": ..., "how": ...}
# Where a hung rank blocks: its next forward (a kernel that never returns), its next all-reduce inside
# the forward, before it hands its part over (its peers wait in a collective that never completes; CPU),
# or at the top of its loop before the request broadcast (a loop that stops, as an idle one would).
HANG_POINTS = ("forward", "collective", "idle")
HANG_AT: dict = {}  # on the target rank: {"at": point}
# On the target of ``kill-rank --at batch`` and its replacements: {"how": ..., "rids": the requests of
# the batch that killed it first (None until then)}; kept in a file for the replacements.
KILLING_BATCH: dict = {}


class DrillError(RuntimeError):
    """Raised on purpose by a drill."""


def kill_rank(protector, rank: int, how: str, fail_replacement: bool = False,
              moment: str = "now") -> dict:
    """Every rank reports its pid; rank ``rank`` then ends: it sends itself the signal ``how`` from a
    timer thread, so the signal lands wherever its scheduler happens to be (prefill, decode, idle), or,
    for ``ERROR``, its next forward raises. With ``moment`` ``output`` (``finish``) it ends instead just
    before it sends its next output (one that finishes a request) to the detokenizer, so that output is
    lost; with ``pulled``, rank 0 ends right after it pulled new requests, which no other rank has.
    With ``fail_replacement`` the rank started in its place fails at start-up, as one whose device is
    gone would."""
    if not (isinstance(rank, int) and 0 <= rank < protector.ranks):
        return {"error": f"rank={rank!r} is not allowed; give a rank in 0..{protector.ranks - 1}"}
    if how not in HOWS:
        return {"error": f"signal={how!r} is not allowed; allowed: {', '.join(HOWS)}"}
    if moment not in MOMENTS:
        return {"error": f"at={moment!r} is not allowed; allowed: {', '.join(MOMENTS)}"}
    if how == "STOP" and moment != "hold":
        return {"error": f"signal='STOP' with at={moment!r} is not allowed: STOP goes with at='hold' "
                         "(a rank stopped outside a replacement is no death the supervisor could see)"}
    if moment == "pulled" and rank != 0:
        return {"error": f"at='pulled' is for rank 0 only (it alone pulls requests); got rank={rank}"}
    pids = protector.call(lambda: protector.gather_objects(os.getpid()))
    if protector.rank == rank:
        if fail_replacement:
            open(_marker(protector.instance_id, "fail-replacement", rank), "w").close()
        if moment == "batch":
            KILLING_BATCH.update(how=how, rids=None)
        elif moment != "now":
            AT_MOMENT.update(moment=moment, how=how)
        elif how == "ERROR":
            FORWARD_ERROR.set()
        else:
            signum = getattr(signal, f"SIG{how}")
            threading.Timer(KILL_DELAY_SECONDS, os.kill, (os.getpid(), signum)).start()
    return {"rank": rank, "pid": pids[rank], "signal": how, "at": moment,
            "fail_replacement": fail_replacement}


def hang_rank(protector, ranks: list[int], at: str) -> dict:
    """Every rank reports its pid; each of ``ranks`` blocks for ever when it next reaches ``at`` (all
    in one request: a hung rank handles no later one). Its process lives: only the supervisor's hang
    check (its progress stamp) can find it."""
    if not ranks or not all(isinstance(r, int) and 0 <= r < protector.ranks for r in ranks):
        return {"error": f"rank={ranks!r} is not allowed; give ranks in 0..{protector.ranks - 1}"}
    if at not in HANG_POINTS:
        return {"error": f"at={at!r} is not allowed; allowed: {', '.join(HANG_POINTS)}"}
    pids = protector.call(lambda: protector.gather_objects(os.getpid()))
    if protector.rank in ranks:
        HANG_AT["at"] = at
    return {"ranks": sorted(ranks), "pids": [pids[r] for r in sorted(ranks)], "at": at}


def hang_here(point: str) -> None:
    """On the target of a ``hang-rank`` drill: block for ever if this is its point."""
    if HANG_AT.get("at") == point:
        threading.Event().wait()


def before_output(rank: int, reqs) -> None:
    """On the target of a ``kill-rank --at output|finish`` drill: end here if this output qualifies."""
    if AT_MOMENT.get("moment") not in ("output", "finish"):
        return
    finish = AT_MOMENT["moment"] == "finish"
    if any((r.finished() or (r.stream and not finish)) and not r.finished_output for r in reqs):
        _end(rank, "output")


def after_pull(rank: int, reqs) -> None:
    """On rank 0 under a ``kill-rank --at pulled`` drill: end here if it pulled a generate request."""
    if AT_MOMENT.get("moment") == "pulled" and any(hasattr(r, "input_ids") for r in reqs):
        _end(rank, "pull")


def _end(rank: int, where: str) -> None:
    how = AT_MOMENT.pop("how")
    AT_MOMENT.clear()
    if how == "ERROR":
        raise DrillError(f"ghostserve drill: TP rank {rank}'s {where} raised (kill-rank --signal ERROR)")
    os.kill(os.getpid(), getattr(signal, f"SIG{how}"))


def at_hold(rank: int) -> None:
    """On the target of a ``kill-rank --at hold`` drill: end (or stop) here, as it starts holding."""
    if AT_MOMENT.get("moment") == "hold":
        _end(rank, "hold")


def before_forward(rank: int) -> None:
    hang_here("forward")
    if FORWARD_ERROR.is_set():
        raise DrillError(f"ghostserve drill: TP rank {rank}'s forward raised (kill-rank --signal ERROR)")


def in_batch(protector, batch) -> None:
    """On the target of a ``kill-rank --at batch`` drill, in the forward of ``batch``: the first batch
    names the requests (kept for the replacements); any batch holding one of them ends the rank."""
    if not KILLING_BATCH:
        return
    rids = {req.rid for req in batch.reqs}
    if KILLING_BATCH["rids"] is None and rids:
        KILLING_BATCH["rids"] = sorted(rids)
        with open(_marker(protector.instance_id, "killing-batch", protector.rank), "w") as f:
            json.dump(KILLING_BATCH, f)
    if rids & set(KILLING_BATCH["rids"] or ()):
        AT_MOMENT["how"] = KILLING_BATCH["how"]
        _end(protector.rank, "forward")


def check_replacement(instance_id: str, rank: int) -> None:
    """In a replacement rank at start-up: fail if a drill asked for it (once); take over a
    ``kill-rank --at batch`` drill of the rank it replaces."""
    marker = _marker(instance_id, "fail-replacement", rank)
    if os.path.exists(marker):
        os.unlink(marker)
        raise DrillError(f"ghostserve drill: the replacement of TP rank {rank} fails at start-up "
                         "(kill-rank --fail-replacement)")
    with contextlib.suppress(FileNotFoundError), open(_marker(instance_id, "killing-batch", rank)) as f:
        KILLING_BATCH.update(json.load(f))


def remove_markers(instance_id: str) -> None:
    """What the drills left in shared memory (the server is stopping)."""
    for path in glob.glob(_marker(instance_id, "*", "*")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _marker(instance_id: str, drill: str, rank) -> str:

    return os.path.join(shm_dir(), f"ghostserve-{instance_id}-drill-{drill}-rank{rank}")
