"""Drills on the KV and its parity (only with ``--ghost-enable-fault-injection``): destroy ranks' KV,
corrupt host parity, pause the drain. Each runs on every rank's worker thread at the same point
between two steps (collective), on the protector it is given."""

from __future__ import annotations

import structlog
import torch

log = structlog.get_logger("ghostserve.protector")


def inject(protector, ranks: list[int]) -> dict:
    """Destroy the named ranks' KV (every layer and slot, overwritten with random bytes, not zeros) and
    their parity still in flight, at this step boundary."""
    p = protector
    discarded = 0
    if p.rank in ranks:
        generator = torch.Generator(device=p.device).manual_seed(p.step)
        for buffer in (*p.kv.pool.k_buffer, *p.kv.pool.v_buffer):
            raw = buffer.view(torch.uint8)
            raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, device=p.device,
                                    generator=generator))
        discarded = p.drain.discard_pending()
        p.metrics.add("ghostserve_faults_injected_total")
    p.lost.update(ranks)
    log.warning("fault injected", rank=p.rank, step=p.step, lost_ranks=ranks, discarded_records=discarded)
    return {"lost_ranks": ranks, "step": p.step, "discarded_records": sum(p.gather_objects(discarded))}


def corrupt(protector, rank: int, count: int) -> dict:
    """Flip one byte in the host parity of ``count`` live, durable slots of ``rank`` (a drill for the
    checksum path; the records stay marked durable)."""
    p = protector
    chosen: list[int] = []
    if p.rank == rank:
        p.drain.flush()
        protected = p.coverage()[2]
        picks = torch.randperm(len(protected), generator=torch.Generator().manual_seed(p.step))[:count]
        chosen = sorted(protected[picks].tolist())
        for slot in chosen:
            p.segment.table[slot, 0] ^= 0xFF
    chosen = sum(p.gather_objects(chosen), [])
    log.warning("parity corrupted", rank=p.rank, step=p.step, target_rank=rank, slots=len(chosen))
    return {"rank": rank, "slots": chosen, "step": p.step}


def pause_drain(protector, pause: bool) -> dict:
    (protector.drain.pause if pause else protector.drain.resume)()
    return {"paused": pause, "step": protector.step}
