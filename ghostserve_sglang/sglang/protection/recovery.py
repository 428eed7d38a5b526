"""Recovery of lost KV (DESIGN §7): rebuild what parity allows, recompute the rest, never keep wrong KV.

``rebuild`` runs on every rank's worker thread at the same step (it is collective). A live slot is
rebuilt only when every record it needs is durable, passes its checksum and carries the same step on
every rank, so that the parity describes the slot's current bytes; for xor and rs that is every rank's
record of the slot (rank j encodes column j), for replicate only the lost rank's own copy. Column j of a
lost rank is decoded by rank j from the survivors' column j and rank j's host parity, then sent back.

``recompute`` runs on the scheduler thread for the slots that could not be rebuilt: SGLang retracts the
running requests (their KV not held by the prefix cache is freed) and, if the prefix cache still holds
an unrebuilt slot, drops the cache too; the requests are then prefilled again by SGLang's own scheduler
(only their uncached suffix, or all of it after a cache drop) and continue generating.
"""

from __future__ import annotations

import time

import structlog
import torch
import torch.distributed as dist

from .kv import live_slots

log = structlog.get_logger("ghostserve.recovery")


class Phases:
    """Wall time per named phase, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


def rebuild(p, lost: list[int], recompute_below_tokens: int = 0) -> dict:
    """Rebuild the lost ranks' live slots from the survivors and host parity. Returns the counts, the
    phases and ``bad``: the live slots left for ``recompute``."""
    phases = Phases()
    p.drain.resume()  # a drill may have paused it; recovery needs what it holds
    p.drain.flush()  # survivors' staged parity is in host memory; the lost ranks' was discarded
    phases.done("flush_seconds")
    live = p.live_slots()
    stored = p.segment.read(live)
    steps = torch.where(stored.usable, stored.steps, torch.full_like(stored.steps, -1))
    geometry, me = p.geometry, p.rank
    if geometry.code == "replicate":
        needed = steps if me in lost else torch.full_like(steps, torch.iinfo(torch.int64).max)
        low = needed.clone()
        p.all_reduce(low, dist.ReduceOp.MIN)
        ok = low > 0
    else:
        low, high = steps.clone(), steps.clone()
        p.all_reduce(low, dist.ReduceOp.MIN)
        p.all_reduce(high, dist.ReduceOp.MAX)
        ok = (low == high) & (low > 0)
        if len(lost) > geometry.parity_shards:
            ok[:] = False  # more losses than the code tolerates: nothing can be rebuilt
    if int(ok.sum()) < recompute_below_tokens:
        ok[:] = False  # re-prefill is the cheaper recovery for this little context
    phases.done("read_seconds")

    good, records = live[ok], stored.parity[ok]
    n, layers = len(good), p.kv.layers
    # In parts of at most chunk_slots slots (bounded device memory), the same parts on every rank
    # (splitting nothing would give one empty part).
    for part, part_records in zip(good.split(p.chunk_slots), records.split(p.chunk_slots)) if n else ():
        if geometry.code != "replicate":
            parity = part_records.view(len(part), layers, geometry.parity_shards, geometry.column_bytes)
            _decode(p, lost, part, parity.to(p.device), phases)
        elif me in lost:  # the record is the rank's own rows
            rows = part_records.view(len(part), layers, -1).to(p.device)
            phases.done("decode_seconds")
            p.kv.scatter(part, rows)
            phases.done("scatter_seconds")
    per_rank = p.gather_objects((n * geometry.record_bytes, len(stored.corrupt), phases.seconds))
    names = dict.fromkeys(name for _, _, seconds in per_rank for name in seconds)  # ranks differ in phases
    slowest = {name: max(s.get(name, 0.0) for _, _, s in per_rank) for name in names}
    return {"lost_ranks": sorted(lost), "live_slots": len(live), "slots_rebuilt": n,
            "slots_recomputed": len(live) - n, "bytes_read_from_host": sum(r[0] for r in per_rank),
            "checksum_failures": sum(r[1] for r in per_rank), "phases": slowest, "bad": live[~ok]}


def _decode(p, lost: list[int], slots: torch.Tensor, parity: torch.Tensor, phases: Phases) -> None:
    """Rebuild the lost ranks' rows of ``slots`` from the survivors' columns and ``parity``
    (``[n, layers, m, column]``, this rank's records of them); collective."""
    n, layers, width = len(slots), p.kv.layers, p.kv.slot_layer_bytes
    ranks, column = p.ranks, p.geometry.column_bytes
    columns = p.exchange_columns(slots)  # [ranks, n, layers, column]; lost: garbage
    phases.done("exchange_seconds")
    shards = [None if i in lost else columns[i] for i in range(ranks)]
    shards += [parity[:, :, r].contiguous() for r in range(p.geometry.parity_shards)]
    decoded = p.codec.reconstruct(shards)
    back = torch.zeros_like(columns)
    for f in lost:
        back[f] = decoded[f]
    phases.done("decode_seconds")
    returned = p.all_to_all(back)  # at rank f: column j of its rows, from rank j
    phases.done("exchange_seconds")
    if p.rank in lost:
        rows = returned.permute(1, 2, 0, 3).reshape(n, layers, ranks * column)[:, :, :width]
        p.kv.scatter(slots, rows.contiguous())
        phases.done("scatter_seconds")


def recompute(scheduler, allocator, total_slots: int, bad: torch.Tensor) -> dict:
    """Make SGLang prefill again every request whose KV includes ``bad`` slots (scheduler thread, the
    same on every rank). Raises if an unrebuilt slot would stay live."""
    from sglang.srt.managers.io_struct import ContinueGenerationReqInput, PauseGenerationReqInput

    started = time.monotonic()
    running = len(scheduler.running_batch.reqs)
    scheduler.pause_generation(PauseGenerationReqInput(mode="retract"))
    cache_dropped = False
    if torch.isin(live_slots(allocator, total_slots), bad).any():
        cache_dropped = bool(scheduler.flush_cache(empty_cache=False))
    scheduler.continue_generation(ContinueGenerationReqInput(torch_empty_cache=False))
    left = int(torch.isin(live_slots(allocator, total_slots), bad).sum())
    if left:
        raise RuntimeError(f"{left} slots without valid KV are still live after recompute")
    return {"requests_retracted": running, "prefix_cache_dropped": cache_dropped,
            "recompute_seconds": time.monotonic() - started}
