"""Who is in the TP group now: a small file the supervisor writes when it replaces a rank, and the
scheduler processes read (docs/rank-restart.md, "Spawn").

``/dev/shm/ghostserve-<instance>-members.json`` holds the generation (how many replacements so far), the
port of the fresh rendezvous every rank joins, and the ranks being replaced. It is written whole and
renamed into place, so a reader never sees half of it.

Before a rank enters the rendezvous of a generation it leaves an arrival mark and waits for every
rank's (``arrive``, ``gathered``). A rank that dies before that point (a second death during a
replacement) then never holds the others in a rendezvous that cannot complete: they see the next
generation announced instead and go on to that one. A survivor that never arrives while another has
is stuck in a collective its peers have left (gloo does not fail such a wait): the supervisor ends it
and replaces it too.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import time

from ...store.segment import SHM_DIR

POLL_SECONDS = 0.05
REPLACEMENT_ENV = "GHOSTSERVE_REPLACEMENT_GENERATION"  # set in a replacement rank's environment
REPLACEMENT_RANK_ENV = "GHOSTSERVE_REPLACEMENT_RANK"
SUPERVISED_ENV = "GHOSTSERVE_SUPERVISED"  # the launcher supervises the ranks and cleans up after them


def path(instance_id: str) -> str:
    return os.path.join(SHM_DIR, f"ghostserve-{instance_id}-members.json")


def _mark(instance_id: str, generation: int | str, rank: int | str) -> str:
    return os.path.join(SHM_DIR, f"ghostserve-{instance_id}-arrived-g{generation}-rank{rank}")


def announce(instance_id: str, generation: int, port: int, replaced: list[int],
             hung: dict[int, float] | None = None) -> None:
    """``hung``: the replaced ranks that were ended as hung, with the seconds their stamp had stood
    still when that was found."""
    for mark in glob.glob(_mark(instance_id, "*", "*")):  # earlier generations' arrivals
        os.unlink(mark)
    target = path(instance_id)
    staging = f"{target}.{os.getpid()}.tmp"
    with open(staging, "w") as f:
        json.dump({"generation": generation, "port": port, "replaced": replaced,
                   "hung": {str(r): s for r, s in (hung or {}).items()}, "noticed_at": time.time()}, f)
    os.replace(staging, target)


def read(instance_id: str) -> dict | None:
    try:
        with open(path(instance_id)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def wait_for(instance_id: str, after: int, timeout_s: float) -> dict | None:
    """The first announcement with a generation above ``after``, or None after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = read(instance_id)
        if current is not None and current["generation"] > after:
            return current
        if time.monotonic() > deadline:
            return None
        time.sleep(POLL_SECONDS)


def arrive(instance_id: str, generation: int, rank: int) -> None:
    open(_mark(instance_id, generation, rank), "w").close()


def arrived(instance_id: str, generation: int, ranks: list[int]) -> list[int]:
    """Those of ``ranks`` that have arrived at ``generation``."""
    return [r for r in ranks if os.path.exists(_mark(instance_id, generation, r))]


def gathered(instance_id: str, generation: int, ranks: int, timeout_s: float) -> bool:
    """Wait until all ``ranks`` ranks have arrived at ``generation``; False as soon as a later one is
    announced (or after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while len(arrived(instance_id, generation, list(range(ranks)))) < ranks:
        current = read(instance_id)
        if (current is not None and current["generation"] > generation) or time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


def remove(instance_id: str) -> None:
    for name in (path(instance_id), *glob.glob(_mark(instance_id, "*", "*"))):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def supervised() -> bool:
    return os.environ.get(SUPERVISED_ENV) == "1"


def replacement_generation() -> int | None:
    value = os.environ.get(REPLACEMENT_ENV)
    return int(value) if value else None


def replacement_rank() -> int:
    return int(os.environ[REPLACEMENT_RANK_ENV])
