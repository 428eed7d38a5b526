"""The restart policy, as data in one place (docs/rank-restart.md, "Crash loops").

- **Intensity** (the supervisor, in the main process): a rank may be replaced at most ``max_restarts``
  times within ``period_seconds``; its next death in that period is a fail stop, not another
  replacement (an OTP supervisor's restart intensity and period). 0 turns the limit off.
- **A batch that kills** (every scheduler rank, the same decision from the same state): when a rank
  dies in the forward of a batch, the survivors remember which rank and which requests; if the batch
  run again after the replacement ends that rank again before a forward of those requests completed,
  the requests both batches held are the cause (a request that crashes the model every time). They are
  answered with an error naming it and taken out; the server serves on without them.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 3  # replacements of one rank within period_seconds; 0: no limit
    period_seconds: float = 600.0

    def refusal(self, rank: int, replaced_at: list[float], now: float) -> str | None:
        """Why ``rank`` must not be replaced again (None: replace it). ``replaced_at``: when its earlier
        replacements started (monotonic seconds)."""
        recent = [t for t in replaced_at if now - t < self.period_seconds]
        if not self.max_restarts or len(recent) < self.max_restarts:
            return None
        return (f"TP rank {rank} was already replaced {len(recent)} time(s) within "
                f"{self.period_seconds:g} s (--ghost-max-restarts={self.max_restarts}, "
                f"--ghost-restart-period-seconds={self.period_seconds:g}); it is not replaced again")


@dataclasses.dataclass(frozen=True)
class Suspects:
    """The rank(s) that died in the forward of a batch, and the requests that batch held."""
    ranks: tuple[int, ...]
    rids: frozenset[str]


def implicated(suspects: Suspects | None, lost: list[int], rids: set[str]) -> list[str]:
    """The requests to answer with an error after ``lost`` died in the forward of a batch holding
    ``rids``: those the previous such death's batch held too, when it was the same rank; else none."""
    if suspects is None or not set(lost) & set(suspects.ranks):
        return []
    return sorted(rids & suspects.rids)


def cause(lost: list[int]) -> str:
    """The error message of an implicated request."""
    ranks = ", ".join(str(r) for r in lost)
    return (f"GhostServe: TP rank {ranks} died in the forward of a batch holding this request, and again "
            "when the batch ran after its replacement; the request is ended so that the server serves "
            "the others")
