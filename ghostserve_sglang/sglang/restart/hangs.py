"""Finding hung ranks from their progress stamps (``liveness``; docs/rank-restart.md, "A rank that
hangs"), on one node or several.

Each node's supervisor reads its own ranks' stamps from its shared memory. On one node it judges them
itself. With several, the other nodes publish theirs in the membership store (``nodes``) and node 0's
supervisor judges every rank together, since a hung rank's waiting peers may be on another node; a
verdict for another node's rank is left in the store, and that node's supervisor ends the process.
An ended rank is found dead and replaced like any other.
"""

from __future__ import annotations

import time

import structlog

from . import liveness, nodes

log = structlog.get_logger("ghostserve.supervisor")

FENCE_SECONDS = 10.0  # how long a hung rank ended with SIGKILL may take to exit (uninterruptible sleep)


def check(s) -> None:
    """Supervisor ``s``'s periodic check: end the ranks ``liveness.judge`` finds hung (SIGKILL: a stopped
    or stuck process runs no handler). One that does not exit within ``FENCE_SECONDS`` ends in a fail
    stop."""
    now = time.monotonic()
    for pid, (_, ended_at, _) in s.hung.items():
        alive = any(p.pid == pid and p.exitcode is None for p in s.processes.values())
        if alive and now - ended_at > FENCE_SECONDS:
            s.fail_stop(f"TP rank process pid {pid} hung and did not exit within {FENCE_SECONDS:g} s "
                        "of SIGKILL (uninterruptible sleep?)")
    stamps = liveness.read(s.instance_id, sorted(s.processes), now)
    if stamps is None or any(stamp.pid != s.processes[stamp.rank].pid for stamp in stamps):
        return  # a rank has not stamped yet
    stopped = {r for r, p in s.processes.items() if liveness.stopped(p.pid)}
    if s.nnodes > 1 and not s.decides:
        nodes.publish_stamps(s.node, stamps, stopped)
        return
    if s.nnodes > 1:
        remote = s.remote_stamps.read()
        if remote is None:
            return  # a node's stamps are not fresh (starting, or replacing a rank)
        stamps, stopped = stamps + remote[0], stopped | remote[1]
    verdict = liveness.judge(stamps, s.hang_timeout_s, stopped)
    if s.nnodes > 1 and not verdict.told_apart and verdict.stalled_seconds < s.hang_timeout_s + \
            nodes.STAMPS_FRESH_SECONDS:
        return  # another node's stamps, a poll or two behind, may still name the culprit
    by_rank = {stamp.rank: stamp for stamp in stamps}
    for rank in verdict.hung:
        stamp, process = by_rank[rank], s.processes.get(rank)
        if stamp.pid in s.hung or (process is not None and process.exitcode is not None):
            continue
        what = f"hung in {liveness.PHASES[stamp.phase]} for {stamp.age:.1f} s and was ended"
        log.error("rank hung; ending it so that it is replaced", rank=rank, pid=stamp.pid,
                  reason=verdict.reason, detect_seconds=round(stamp.age, 3),
                  waited_seconds=round(verdict.stalled_seconds, 3), **liveness.describe(stamp))
        s.hung[stamp.pid] = (what, now, stamp.age)
        s.frontend.set_health(False)
        if process is not None:
            process.kill()
        else:
            nodes.end_hung(rank, stamp.pid, what, stamp.age)


def end_requested(s) -> None:
    """Node >= 1: end this node's ranks that node 0 found hung."""
    for rank, pid, what, age in nodes.hung_to_end(sorted(s.processes)):
        process = s.processes[rank]
        if process.pid == pid and pid not in s.hung and process.exitcode is None:
            log.error("rank hung; ending it so that it is replaced", rank=rank, pid=pid, found_by="node 0")
            s.hung[pid] = (what, time.monotonic(), age)
            process.kill()
