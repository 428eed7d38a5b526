"""Who is in the TP group now: the announcement node 0's supervisor makes when it replaces ranks, in
the server's membership store (``coordination``), which every rank on every node reads
(docs/rank-restart.md, "Spawn").

The announcement holds the generation (how many replacements so far), where the fresh rendezvous every
rank joins is (node 0's host and a port), and the ranks being replaced. Once they have joined it is
marked done.

Before a rank enters the rendezvous of a generation it leaves an arrival mark and waits for every
rank's (``arrive``, ``gathered``). A rank that dies before that point (a second death during a
replacement) then never holds the others in a rendezvous that cannot complete: they see the next
generation announced instead and go on to that one. A survivor that never arrives while another has
is stuck in a collective its peers have left (gloo does not fail such a wait): the supervisor of its
node ends it, and it is replaced too.
"""

from __future__ import annotations

import os
import time

from . import coordination

POLL_SECONDS = 0.05
STRAGGLER_SECONDS = 10.0  # a survivor reaches the rendezvous within a second or two of the announcement
REPLACEMENT_ENV = "GHOSTSERVE_REPLACEMENT_GENERATION"  # set in a replacement rank's environment
REPLACEMENT_RANK_ENV = "GHOSTSERVE_REPLACEMENT_RANK"
SUPERVISED_ENV = "GHOSTSERVE_SUPERVISED"  # the launcher supervises the ranks and cleans up after them


def announce(generation: int, host: str, port: int, replaced: list[int],
             hung: dict[int, float] | None = None) -> None:
    """``hung``: the replaced ranks that were ended as hung, with the seconds their stamp had stood
    still when that was found."""
    coordination.put("members", {"generation": generation, "host": host, "port": port, "replaced": replaced,
                                 "hung": {str(r): s for r, s in (hung or {}).items()},
                                 "noticed_at": time.time()})


def finish(generation: int) -> None:
    """Every replaced rank of ``generation`` has joined; the next death makes a new announcement."""
    coordination.put("members", {"generation": generation, "done": True})


def read() -> dict | None:
    """The announcement of a replacement under way, or None."""
    current = coordination.get("members")
    return None if current is None or current.get("done") else current


def wait_for(after: int, timeout_s: float) -> dict | None:
    """The first announcement with a generation above ``after``, or None after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = read()
        if current is not None and current["generation"] > after:
            return current
        if time.monotonic() > deadline:
            return None
        time.sleep(POLL_SECONDS)


def _mark(generation: int, rank: int) -> str:
    return f"arrived/g{generation}/rank{rank}"


def arrive(generation: int, rank: int) -> None:
    coordination.put(_mark(generation, rank), time.time())


def arrived(generation: int, ranks: list[int]) -> list[int]:
    """Those of ``ranks`` that have arrived at ``generation``."""
    return [r for r in ranks if coordination.has(_mark(generation, r))]


def gathered(generation: int, ranks: int, timeout_s: float) -> bool:
    """Wait until all ``ranks`` ranks have arrived at ``generation``; False as soon as a later one is
    announced (or after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while len(arrived(generation, list(range(ranks)))) < ranks:
        current = coordination.get("members")
        if (current is not None and current["generation"] > generation) or time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


def supervised() -> bool:
    return os.environ.get(SUPERVISED_ENV) == "1"


def replacement_generation() -> int | None:
    value = os.environ.get(REPLACEMENT_ENV)
    return int(value) if value else None


def replacement_rank() -> int:
    return int(os.environ[REPLACEMENT_RANK_ENV])
