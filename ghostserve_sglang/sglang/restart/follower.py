"""Node >= 1's part of a replacement (docs/rank-restart.md, "Across nodes"): its supervisor reports its
ranks' deaths to node 0's, which decides; it starts the replacements announced for its own ranks (ending
those of an attempt a later death made void), reports each once it joined, ends a survivor of its own
that never reached the rendezvous, and beats, so that node 0 knows the node is there."""

from __future__ import annotations

import time

import structlog

from . import coordination, hangs, membership, nodes, semaphores

log = structlog.get_logger("ghostserve.supervisor")


class Follower:
    def __init__(self, supervisor) -> None:
        self.supervisor = supervisor
        self.reported: set[int] = set()  # pids whose death was reported
        self.following: dict = {}  # rank -> its replacement (process, pipes), of supervisor.generation
        self.announced_at = 0.0  # when the generation followed was seen

    def report(self, dead: list) -> None:
        """``dead``: (rank, process) of this node's ranks that ended."""
        s = self.supervisor
        cause = s._describe(s._local(dead))
        if not s.rejoin_timeout_s:
            s.fail_stop(f"{cause}; the server cannot continue without it")
        for rank, process in dead:
            nodes.report_death(rank, process.pid, s._how(process))
            self.reported.add(process.pid)

    def follow(self) -> None:
        """Each poll: start the replacements of a new generation's ranks of this node (ending those of
        the attempt it made void), report each once it joined, carry out node 0's hang verdicts, and end
        a survivor of this node that never reached the rendezvous."""
        s = self.supervisor
        announced = membership.read()
        if announced is not None and announced["generation"] > s.generation:
            mine = [r for r in announced["replaced"] if r in s.processes]
            s._void(self.following)
            s.generation, self.announced_at = announced["generation"], time.monotonic()
            s.replacing = bool(mine)
            self.following = {rank: s._spawn(rank, announced["port"]) for rank in mine}
        for rank, (process, reader, _) in self.following.items():
            if reader.closed:
                continue
            if reader.poll():
                try:
                    reader.recv()
                except EOFError:
                    process.join(timeout=30)
                    s.fail_stop(f"TP rank {rank}'s replacement (pid {process.pid}) "
                                f"{s._how(process)} before it joined")
                reader.close()
                nodes.mark_joined(s.generation, rank)
                s.restarts[rank] = s.restarts.get(rank, 0) + 1
                log.warning("rank replaced", rank=rank, pid=process.pid, restarts=s.restarts[rank],
                            generation=s.generation, node=s.node)
            elif process.exitcode is not None:
                s.fail_stop(f"TP rank {rank}'s replacement (pid {process.pid}) "
                            f"{s._how(process)} before it joined")
        # Joined replacements stay followed until node 0 marks the generation done: a later death may
        # still make it void, and then they are ended and started again.
        if self.following and announced is None and all(r.closed for _, r, _ in self.following.values()):
            self.following, s.replacing = {}, False
            semaphores.remove_orphaned(s.started_at)
        if s.hang_timeout_s:
            hangs.end_requested(s)
        if announced is not None and time.monotonic() - self.announced_at > membership.STRAGGLER_SECONDS:
            s._end_stragglers(set(announced["replaced"]))

    def beat(self) -> None:
        """Raise this node's heartbeat until the server stops; stand down when node 0 is gone."""
        s = self.supervisor
        while not s.stopping.wait(nodes.BEAT_SECONDS) and s._thread.is_alive():  # beats while it supervises
            try:
                nodes.beat(s.node)
            except coordination.CoordinatorLost as exc:
                self.stand_down(f"node 0 is gone: {exc}")
                return

    def stand_down(self, reason: str) -> None:
        """Stop this node's part: node 0 is gone (stopped, or lost), and with it the server, or this
        node can no longer supervise its ranks (node 0 then finds the node lost)."""
        s = self.supervisor
        if s.stopping.is_set():
            return
        log.warning("stopping this node's ranks", node=s.node, reason=reason)
        s.standing_down = True
        s.stopping.set()
