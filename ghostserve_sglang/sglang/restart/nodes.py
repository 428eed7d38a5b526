"""What the launchers of a multi-node server tell each other through the membership store
(``coordination``; docs/rank-restart.md, "Across nodes").

Node 0's supervisor decides every replacement; each other node's supervisor watches its own ranks,
reports their deaths, starts the replacements announced for them and reports when those joined. Every
launcher but node 0's raises its heartbeat counter twice a second; node 0's takes a node whose counter
has stood still for ``NODE_TIMEOUT_SECONDS`` as lost with every rank and all host parity it held. Any
supervisor that fails stop leaves the reason for the others, which stop too.
"""

from __future__ import annotations

import time

from . import coordination, liveness

BEAT_SECONDS = 0.5
NODE_TIMEOUT_SECONDS = 5.0  # ten missed beats: the node's launcher is gone (or its host is)
# How long node 0 waits, after a death of its own, for other nodes' reports of deaths at the same moment
# (reported after the same shutdown check, plus a poll): those are replaced together with it.
REPORT_SECONDS = 0.6
STAMPS_FRESH_SECONDS = 1.0  # a node's published stamps older than this are not judged


def layout(tp_size: int, nnodes: int, node: int) -> list[int]:
    """The TP ranks SGLang runs on ``node``: a contiguous share of ``tp_size / nnodes``."""
    per_node = tp_size // nnodes
    return list(range(node * per_node, (node + 1) * per_node))


def register(node: int, ranks: list[int], pid: int) -> None:
    coordination.put(f"node/{node}", {"ranks": ranks, "pid": pid, "at": time.time()})


def report_death(rank: int, pid: int, how: str) -> None:
    """A node >= 1 supervisor: one of its ranks' processes ended."""
    coordination.put(f"death/{coordination.count('deaths')}", {"rank": rank, "pid": pid, "how": how})


class Deaths:
    """Node 0's reader of the reported deaths, each returned once."""

    def __init__(self) -> None:
        self.seen = 0

    def new(self) -> list[tuple[int, int, str]]:
        """(rank, pid, how) of each death reported since the last call."""
        found = []
        for n in range(self.seen + 1, coordination.count("deaths", 0) + 1):
            report = coordination.get(f"death/{n}")
            if report is None:  # counted, not yet written: next time
                break
            found.append((report["rank"], report["pid"], report["how"]))
            self.seen = n
        return found


def mark_joined(generation: int, rank: int) -> None:
    coordination.put(f"joined/g{generation}/rank{rank}", time.time())


def joined(generation: int, ranks: list[int]) -> list[int]:
    return [r for r in ranks if coordination.has(f"joined/g{generation}/rank{r}")]


def beat(node: int) -> None:
    coordination.count(f"beat/{node}")


class Heartbeats:
    """Node 0's view of the other nodes' heartbeats, on its own clock."""

    def __init__(self, nnodes: int) -> None:
        self.last = {node: (0, time.monotonic()) for node in range(1, nnodes)}

    def lost(self) -> list[tuple[int, float]]:
        """The nodes that beat once and then stood still for ``NODE_TIMEOUT_SECONDS``, with how long."""
        now, lost = time.monotonic(), []
        for node, (count, since) in self.last.items():
            current = coordination.count(f"beat/{node}", 0)
            if current != count:
                self.last[node] = (current, now)
            elif count and now - since > NODE_TIMEOUT_SECONDS:
                lost.append((node, now - since))
        return lost


def publish_stamps(node: int, stamps: list, stopped: set[int]) -> None:
    """Node >= 1: its ranks' progress stamps (ages on its own clock), for node 0 to judge hangs."""
    rows = [[s.rank, s.iteration, s.phase, s.age, s.pid] for s in stamps]
    coordination.put(f"stamps/{node}", {"stamps": rows, "stopped": sorted(stopped), "at": time.monotonic()})


class RemoteStamps:
    """Node 0's reader of the other nodes' published stamps; a node's count only while it keeps
    publishing them (not while it replaces a rank, or before it started)."""

    def __init__(self, nnodes: int) -> None:
        self.last = {node: (None, 0.0) for node in range(1, nnodes)}

    def read(self) -> tuple[list, set[int]] | None:
        now, stamps, stopped = time.monotonic(), [], set()
        for node, (seen, since) in self.last.items():
            published = coordination.get(f"stamps/{node}")
            if published is None:
                return None
            if published["at"] != seen:
                self.last[node], since = (published["at"], now), now
            elif now - since > STAMPS_FRESH_SECONDS:
                return None
            # Aged by the time since it was seen here: a published age is a little behind.
            stamps += [liveness.Stamp(r, i, phase, age + now - since, pid)
                       for r, i, phase, age, pid in published["stamps"]]
            stopped |= set(published["stopped"])
        return stamps, stopped


def end_hung(rank: int, pid: int, what: str, age: float) -> None:
    """Node 0: another node's rank is hung; that node's supervisor ends it."""
    coordination.put(f"end/{rank}", {"pid": pid, "what": what, "age": age})


def hung_to_end(ranks: list[int]) -> list[tuple[int, int, str, float]]:
    """Node >= 1: (rank, pid, what, age) of each of ``ranks`` node 0 found hung (its current process or
    an earlier one)."""
    found = []
    for rank in ranks:
        verdict = coordination.get(f"end/{rank}")
        if verdict is not None:
            found.append((rank, verdict["pid"], verdict["what"], verdict["age"]))
    return found


def request_stop(reason: str) -> None:
    coordination.put("stop", reason)


def stop_reason() -> str | None:
    return coordination.get("stop")
