"""The scheduler state a replacement rank receives from a survivor (docs/rank-restart.md, the table).

Every TP rank runs the same scheduler on the same broadcast inputs, so a survivor's state is the state
the dead rank had. ``take`` pickles it once: the queues and batches (one pickle, so a request held by
several of them stays one object), the request-row table, the token-slot free list, the prefix tree
(SGLang's Python tree core, with its module-level clocks), the relay of the last sampled tokens, and the
random generators. Objects every rank builds for itself at start-up (pools, allocator, model config,
the tree wrapper) travel as names and are replaced on load by the receiver's own. ``digest`` condenses
what drives decisions, so that ranks can check they agree after a load.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import weakref

import numpy as np
import torch

from . import handover

SCHEDULER_FIELDS = (
    "waiting_queue", "running_batch", "last_batch", "cur_batch_for_debug", "chunked_req",
    "_pending_chunked_abort_req", "_deferred_input_requests", "_prefill_decode_interval_remaining",
    "new_token_ratio_tracker", "processed_tokens_counter", "forward_ct", "_engine_paused",
    "return_health_check_ipcs",
)
COPIED = {*SCHEDULER_FIELDS, "tree_core"}  # never sent as a name: the receiver gets the sender's
PLAIN = (torch.Tensor, list, tuple, dict, set, str, bytes, int, float, bool, type(None))


def _singletons(scheduler) -> dict[str, object]:
    """Objects each rank owns for itself, by a name that is the same on every rank."""
    named: dict[str, object] = {"scheduler": scheduler}
    owners = {"scheduler": scheduler, "tree_cache": scheduler.tree_cache,
              "tp_worker": scheduler.tp_worker, "model_runner": scheduler.tp_worker.model_runner}
    for owner_name, owner in owners.items():
        named[owner_name] = owner
        for attr, value in vars(owner).items():
            if attr in COPIED or isinstance(value, PLAIN):
                continue
            named.setdefault(f"{owner_name}.{attr}", value)
    for key, component in scheduler.tree_cache.components.items():
        named[f"component.{key}"] = component
    return named


class _Pickler(pickle.Pickler):
    def __init__(self, file, names: dict[int, str]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.names = names

    def persistent_id(self, obj):
        return self.names.get(id(obj))

    def reducer_override(self, obj):
        if isinstance(obj, weakref.ref) and type(obj) is weakref.ref:
            return weakref.ref, (obj(),)
        if isinstance(obj, _plain_types()):  # their own pickling is for another process's view of them
            return _plain, (type(obj), dict(vars(obj)))
        if isinstance(obj, torch.Tensor) and obj.untyped_storage().nbytes() > obj.nbytes:
            return torch.Tensor.clone, (obj.clone(),)  # a view: send its elements, not its storage
        return NotImplemented


def _plain_types() -> tuple[type, ...]:
    from sglang.srt.observability.req_time_stats import ReqTimeStatsBase

    return (ReqTimeStatsBase,)


def _plain(cls: type, attributes: dict):
    obj = cls.__new__(cls)
    obj.__dict__.update(attributes)
    return obj


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, objects: dict[str, object]) -> None:
        super().__init__(file)
        self.objects = objects

    def persistent_load(self, name):
        return self.objects[name]


def _tree_counters() -> dict:
    from sglang.srt.mem_cache.unified_cache.components import base
    from sglang.srt.mem_cache.unified_cache.unified_tree_core import UnifiedTreeNode

    return {"clock": base._LAST_ACCESS_TIME_COUNTER_FLOAT, "uuids": dict(base._COMPONENT_UUID_COUNTERS),
            "node_ids": UnifiedTreeNode.counter}


def _set_tree_counters(counters: dict) -> None:
    from sglang.srt.mem_cache.unified_cache.components import base
    from sglang.srt.mem_cache.unified_cache.unified_tree_core import UnifiedTreeNode

    base._LAST_ACCESS_TIME_COUNTER_FLOAT = counters["clock"]
    base._COMPONENT_UUID_COUNTERS.clear()
    base._COMPONENT_UUID_COUNTERS.update(counters["uuids"])
    UnifiedTreeNode.counter = counters["node_ids"]


def _rows_in_use(pool) -> torch.Tensor:
    """The request rows not on the free list (the others are rewritten before they are read)."""
    used = torch.ones(pool.req_to_token.shape[0], dtype=torch.bool)
    used[list(pool.free_slots)] = False
    return used.nonzero().flatten()


def clear_free_rows(scheduler) -> None:
    """Every rank, after a transfer: zero the request rows not in use. Only the rows in use travel, so
    a replacement's free rows are zeros while a survivor's hold what earlier requests left there; a row
    taken again keeps that tail beyond its request's tokens (never read, but digested), so all ranks
    start from the same zeros."""
    pool = scheduler.req_to_token_pool
    free = torch.ones(pool.req_to_token.shape[0], dtype=torch.bool)
    free[_rows_in_use(pool)] = False
    pool.req_to_token[free.to(pool.req_to_token.device)] = 0


# The allocator's free state: free pages (token allocator: slots), pages released while a flush is
# pending, and the paged allocator's freed pages waiting to be sorted.
ALLOCATOR_FIELDS = ("free_pages", "release_pages", "staged_pages", "num_staged_pages")


def _tensors(value) -> list[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else list(value) if isinstance(value, list) else []


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return [v.to(device) for v in value] if isinstance(value, list) else value


def take(scheduler, extra: dict) -> bytes:
    """The survivor's state, pickled; ``extra`` travels with it (GhostServe's own step, the phase)."""
    pool, allocator = scheduler.req_to_token_pool, scheduler.token_to_kv_pool_allocator
    rows = _rows_in_use(pool)
    state = {
        "scheduler": {n: getattr(scheduler, n) for n in SCHEDULER_FIELDS if hasattr(scheduler, n)},
        "policy_refresh_calls": getattr(scheduler.policy, "_waiting_prefix_refresh_calls", None),
        "pending_flush": scheduler.flush_wrapper._pending,  # a flush_cache deferred until idle
        "recent_finished": list(handover.RECENT),  # a replacement rank 0 may answer them again
        "rows": rows, "req_to_token": pool.req_to_token[rows],
        "free_slots": list(pool.free_slots),
        "req_generation": pool.req_generation,
        "allocator": {n: getattr(allocator, n) for n in ALLOCATOR_FIELDS if hasattr(allocator, n)},
        "tree_core": scheduler.tree_cache.tree_core, "tree_counters": _tree_counters(),
        "output_tokens": scheduler.future_map.output_tokens_buf,
        "new_seq_lens": scheduler.future_map.new_seq_lens_buf,
        "rng": {"torch": torch.get_rng_state(), "random": random.getstate(),
                "numpy": np.random.get_state()},
        "extra": extra,
    }
    names = {id(obj): name for name, obj in _singletons(scheduler).items()}
    buffer = io.BytesIO()
    _Pickler(buffer, names).dump(state)
    return buffer.getvalue()


def load(scheduler, data: bytes) -> dict:
    """Put a survivor's state into this (fresh) scheduler. Returns the ``extra`` it carried."""
    from .regroup import repoint

    state = _Unpickler(io.BytesIO(data), _singletons(scheduler)).load()
    for name, value in state["scheduler"].items():
        setattr(scheduler, name, value)
    scheduler.flush_wrapper._pending = state["pending_flush"]
    handover.RECENT.clear()
    handover.RECENT.extend(state["recent_finished"])
    if state["policy_refresh_calls"] is not None:
        scheduler.policy._waiting_prefix_refresh_calls = state["policy_refresh_calls"]
    pool, allocator = scheduler.req_to_token_pool, scheduler.token_to_kv_pool_allocator
    pool.req_to_token[state["rows"]] = state["req_to_token"].to(pool.req_to_token.device)
    pool.free_slots[:] = state["free_slots"]
    pool.req_generation.copy_(state["req_generation"])
    for name, value in state["allocator"].items():
        setattr(allocator, name, _to(value, allocator.device))
    cache, core = scheduler.tree_cache, state["tree_core"]
    old_core = cache.tree_core
    repoint([(old_core, core)], [cache, *cache.components.values(), scheduler])
    _set_tree_counters(state["tree_counters"])
    scheduler.future_map.output_tokens_buf.copy_(state["output_tokens"])
    scheduler.future_map.new_seq_lens_buf.copy_(state["new_seq_lens"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["random"])
    np.random.set_state(state["rng"]["numpy"])
    return state["extra"]


def digest(scheduler, extra: object = None) -> dict[str, int]:
    """63-bit digests of what drives allocation and scheduling, by part; equal on ranks that agree."""
    pool, allocator, cache = (scheduler.req_to_token_pool, scheduler.token_to_kv_pool_allocator,
                              scheduler.tree_cache)

    def of_tensor(tensor: torch.Tensor) -> bytes:
        return tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes()

    parts = {
        "free_slots": repr(pool.free_slots).encode(),
        "free_pages": b"".join(of_tensor(t) for name in ALLOCATOR_FIELDS
                               for t in _tensors(getattr(allocator, name, None))),
        "req_to_token": of_tensor(pool.req_to_token[_rows_in_use(pool)]) + of_tensor(pool.req_generation),
        "rng": of_tensor(torch.get_rng_state()),
        "waiting": repr([r.rid for r in scheduler.waiting_queue]).encode(),
        "running": repr([r.rid for r in scheduler.running_batch.reqs]).encode(),
        "tree_sizes": repr((cache.evictable_size(), cache.protected_size())).encode(),
        "tree_clocks": repr(_tree_counters()).encode(),
        "extra": repr(extra).encode(),
    }
    return {name: int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 1
            for name, data in parts.items()}
