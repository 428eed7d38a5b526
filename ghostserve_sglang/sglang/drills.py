"""Drills that end a rank's process, for testing what the supervisor does about it (only with
``--ghost-enable-fault-injection``). The KV drills (inject-fault, corrupt-parity, drain) live with the
protector, whose state they touch."""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = ("KILL", "TERM", "SEGV")
KILL_DELAY_SECONDS = 0.2  # the reply leaves rank 0 before the target goes


def kill_rank(protector, rank: int, signal_name: str) -> dict:
    """Every rank reports its pid; rank ``rank`` then sends itself ``signal_name`` from a timer thread,
    so the signal lands wherever its scheduler happens to be (prefill, decode, idle)."""
    if not (isinstance(rank, int) and 0 <= rank < protector.ranks):
        return {"error": f"rank={rank!r} is not allowed; give a rank in 0..{protector.ranks - 1}"}
    if signal_name not in SIGNALS:
        return {"error": f"signal={signal_name!r} is not allowed; allowed: {', '.join(SIGNALS)}"}
    pids = protector.call(lambda: protector.gather_objects(os.getpid()))
    if protector.rank == rank:
        signum = getattr(signal, f"SIG{signal_name}")
        threading.Timer(KILL_DELAY_SECONDS, os.kill, (os.getpid(), signum)).start()
    return {"rank": rank, "pid": pids[rank], "signal": signal_name}
