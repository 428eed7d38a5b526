"""The scrub (``ghostserve scrub``): recompute parity from the live KV of every rank and compare it
with the host store, slot by slot. Runs on every rank's worker thread at the same point (collective)."""

from __future__ import annotations

import time

import structlog
import torch
import torch.distributed as dist

log = structlog.get_logger("ghostserve.protector")


def scrub(protector, wait: bool = True) -> dict:
    """Counts of live slots whose parity matches, differs, is not durable yet, or fails its checksum;
    ``wait``: flush the drain first, so that everything captured so far counts as durable."""
    p = protector
    started = time.monotonic()
    if wait:
        p.drain.flush()
    live = p.live_slots()
    status = torch.zeros(len(live), dtype=torch.int64)  # 0 match, 1 not durable, 2 mismatch
    corrupt = 0
    for part, state in zip(live.split(p.chunk_slots), status.split(p.chunk_slots)):
        expected = p.encode_slots(part).cpu()  # collective: the same parts everywhere
        stored = p.segment.read(part)
        state[~stored.usable] = 1
        state[stored.usable & (stored.parity != expected).any(dim=1)] = 2
        state[torch.isin(part, torch.tensor(stored.corrupt, dtype=torch.int64))] = 2
        corrupt += len(stored.corrupt)
    p.all_reduce(status, dist.ReduceOp.MAX)
    protected = int((status == 0).sum())
    kv_bytes = protected * p.kv.layers * p.kv.slot_layer_bytes * p.ranks
    mine = {"bytes": protected * p.geometry.record_bytes, "corrupt": corrupt}
    per_rank = p.gather_objects(mine)
    parity_bytes = sum(r["bytes"] for r in per_rank)
    result = {
        "instance_id": p.instance_id, "step": p.step, "live_slots": len(live),
        "matching": protected, "mismatching": int((status == 2).sum()),
        "not_durable": int((status == 1).sum()), "corrupt": sum(r["corrupt"] for r in per_rank),
        "kv_bytes": kv_bytes, "parity_bytes": parity_bytes,
        "parity_to_kv": parity_bytes / kv_bytes if kv_bytes else None,
        "seconds": time.monotonic() - started,
    }
    p.metrics.add("ghostserve_scrub_mismatches_total", result["mismatching"])
    log.info("scrub", rank=p.rank, step=p.step, **{k: v for k, v in result.items()
                                                    if k not in ("instance_id", "step")})
    return result
