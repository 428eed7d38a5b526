"""Progress stamps and the judgement of a hung rank (docs/rank-restart.md, "A rank that hangs").

Each scheduler rank of a supervised server writes, in a small shared-memory table
(``/dev/shm/ghostserve-<instance>-stamps``), its loop iteration, the phase it is in and when it entered
it (``time.monotonic()``, one clock for every process of the host). The supervisor reads the table
without the ranks' help: a stopped or stuck process cannot forget to stop writing.

A rank is hung when it has stayed in one phase longer than ``--ghost-hang-timeout-seconds`` while
another rank waits for it in a collective (the request broadcast at the top of SGLang's loop, or an
all-reduce inside the forward). The culprit is the rank that is not waiting: a process the kernel
reports stopped, or a rank outside any collective whose stamp is as old. When every old stamp is in a
collective (the culprit cannot be told apart), the rank with the oldest stamp is ended; if the group is
still stuck one timeout later the check picks the next one, and past the parity shards the replacement
fails stop. Every rank busy in compute (a long prefill) is work, not a hang: nobody waits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import numpy as np

from ...shm import shm_dir

MAX_RANKS = 256
STARTING, RECEIVING, SCHEDULING, FORWARD, COLLECTIVE, OUTPUT, HOLDING = range(7)
PHASES = ("starting", "receiving", "scheduling", "forward", "collective", "output", "holding")
WAITING = (RECEIVING, COLLECTIVE)  # phases in which a rank waits for its peers
ITERATION, PHASE, ENTERED, PID = range(4)


def path(instance_id: str) -> str:
    return os.path.join(shm_dir(), f"ghostserve-{instance_id}-stamps")


def _table(instance_id: str, writable: bool) -> np.memmap | None:
    """The instance's stamp table; created (zeros) by the first writer, None for a reader before that."""
    if not writable and not os.path.exists(path(instance_id)):
        return None
    size = MAX_RANKS * 4 * 8
    if writable:
        fd = os.open(path(instance_id), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)
    return np.memmap(path(instance_id), dtype=np.float64, mode="r+" if writable else "r",
                     shape=(MAX_RANKS, 4))


class Stamps:
    """One rank's row of the table (scheduler process). A stamp is three stores into shared memory."""

    def __init__(self, instance_id: str, rank: int) -> None:
        self.row = _table(instance_id, writable=True)[rank]
        self.iteration = 0
        self.row[PID] = os.getpid()
        self.enter(STARTING)

    def enter(self, phase: int) -> None:
        self.row[PHASE] = phase
        self.row[ENTERED] = time.monotonic()

    def next_iteration(self) -> None:
        self.iteration += 1
        self.row[ITERATION] = self.iteration
        self.enter(RECEIVING)


WRITER: Stamps | None = None  # this scheduler process's stamps, when the launcher supervises it


def enter(phase: int) -> None:
    if WRITER is not None:
        WRITER.enter(phase)


def next_iteration() -> None:
    if WRITER is not None:
        WRITER.next_iteration()


@contextlib.contextmanager
def collective():
    """Around a collective inside a phase (an all-reduce in the forward): the rank waits for its peers
    there; afterwards it is back in its phase, stamped anew."""
    if WRITER is None:
        yield
        return
    phase = int(WRITER.row[PHASE])
    WRITER.enter(COLLECTIVE)
    try:
        yield
    finally:
        WRITER.enter(phase)


@dataclasses.dataclass(frozen=True)
class Stamp:
    rank: int
    iteration: int
    phase: int
    age: float  # seconds in this phase
    pid: int

    @property
    def waiting(self) -> bool:
        return self.phase in WAITING


def read(instance_id: str, ranks: list[int], now: float | None = None) -> list[Stamp] | None:
    """The stamps of ``ranks`` (this node's: each node's table holds its own ranks' rows)."""
    table = _table(instance_id, writable=False)
    if table is None:
        return None
    now = time.monotonic() if now is None else now
    rows = np.array(table)
    return [Stamp(r, int(rows[r, ITERATION]), int(rows[r, PHASE]), now - float(rows[r, ENTERED]),
                  int(rows[r, PID])) for r in ranks]


def own() -> dict:
    """This process's stamp, for ``ghostserve status``: phase and age (empty when not supervised)."""
    if WRITER is None:
        return {}
    row = np.array(WRITER.row)
    return describe(Stamp(-1, int(row[ITERATION]), int(row[PHASE]), time.monotonic() - float(row[ENTERED]),
                          int(row[PID])))


def describe(stamp: Stamp) -> dict:
    return {"phase": PHASES[stamp.phase], "stamp_age_seconds": round(stamp.age, 3),
            "iteration": stamp.iteration}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Who is hung (empty: the group makes progress), and why."""
    hung: list[int]
    reason: str = ""
    stalled_seconds: float = 0.0  # how long the oldest waiting rank has waited
    told_apart: bool = True  # False: no culprit could be told apart; the oldest stamp was chosen


def judge(stamps: list[Stamp], timeout_s: float, stopped: set[int] = frozenset()) -> Verdict:
    """The rule of the module docstring. ``stopped``: ranks whose process the kernel reports stopped."""
    waiting = [s for s in stamps if s.waiting and s.age > timeout_s]
    if not waiting:
        return Verdict([])
    stalled = max(s.age for s in waiting)
    old = [s for s in stamps if s.age > timeout_s and s.phase != HOLDING]
    hung = sorted({s.rank for s in old if s.rank in stopped} | {s.rank for s in old if not s.waiting})
    if hung:
        how = "stopped" if set(hung) <= set(stopped) else "not waiting"
        return Verdict(hung, f"{how}, while rank(s) {[s.rank for s in waiting]} waited in a collective",
                       stalled)
    oldest = max(stamps, key=lambda s: s.age)
    return Verdict([oldest.rank], "every stalled rank waits in a collective; the oldest stamp is ended",
                   stalled, told_apart=False)


def stopped(pid: int) -> bool:
    """Whether the kernel reports the process stopped (SIGSTOP, a debugger)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


def remove(instance_id: str) -> None:
    try:
        os.unlink(path(instance_id))
    except FileNotFoundError:
        pass
