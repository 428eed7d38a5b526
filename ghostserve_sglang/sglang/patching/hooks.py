"""The wrappers the patch table installs. Each is thin: call SGLang's method unchanged, then tell this
process's Protector what happened. Positional arguments are read only where the declared signature
(``releases.json``) fixes them.

A failure inside GhostServe's part of a wrapper is counted and logged once and never reaches SGLang,
unless strict mode is on; a failure of SGLang's own method always propagates untouched.
"""

from __future__ import annotations

import time

import torch

from ...control import ControlRequest
from ...drills import process as drills
from ...store import StoreError
from .. import operations
from ..protection.collectives import peer_lost
from ..protection.kv import UnsupportedPool, check_pool
from ..restart import handover
from . import compatibility, refusal
from .state import STATE, guarded, log


def _arg(args: tuple, kwargs: dict, index: int, name: str):
    return kwargs[name] if name in kwargs else args[index]


def scheduler_init(wrapped, instance, args, kwargs):
    """Every rank starts its Protector once the scheduler (and its model runner) exist. Failing to
    start protection that was asked for stops the server: it must not run unprotected silently.

    Under the launcher's supervision the start-up's ``torch.distributed`` calls are recorded (a
    replacement of a peer replays them), and a replacement rank receives the survivors' state here."""
    if STATE.settings is None or not STATE.settings.enabled or STATE.protector is not None:
        return wrapped(*args, **kwargs)
    from sglang.srt.runtime_context import get_parallel

    from ..protection.protector import Protector
    from ..restart import liveness, rejoin

    server_args = _arg(args, kwargs, 0, "server_args")
    instance_id = STATE.settings.instance_id or str(server_args.port)
    refused = compatibility.refusal(server_args, STATE.settings)
    if refused is not None:  # a server started without the launcher, which checks this before the start
        refusal.refuse(instance_id, refused)
    generation = rejoin.membership.replacement_generation() if rejoin.enabled() else None
    if generation is not None:
        if STATE.settings.enable_fault_injection:
            drills.check_replacement(instance_id, rejoin.membership.replacement_rank())
        rejoin.arrive(generation, rejoin.membership.replacement_rank(), server_args.tp_size)
    started = time.time()
    with rejoin.MEMBERS.transcript.recording():
        wrapped(*args, **kwargs)
        try:
            check_pool(instance.tp_worker.model_runner.token_to_kv_pool)
            STATE.protector = Protector(STATE.settings, instance.tp_worker.model_runner, instance_id,
                                        get_parallel().tp_group, replacement=generation is not None,
                                        supervised=rejoin.enabled(), hook_errors=STATE.errors)
        except (UnsupportedPool, StoreError) as exc:
            refusal.refuse(instance_id, str(exc), get_parallel().tp_group.rank_in_group)
    STATE.protector.scheduler = instance
    if rejoin.enabled():
        liveness.WRITER = liveness.Stamps(instance_id, STATE.protector.rank)
    if generation is not None:
        announced = rejoin.membership.read()
        phases = {"spawn_seconds": started - announced["noticed_at"], "join_seconds": time.time() - started}
        hang = announced.get("hung", {}).get(str(STATE.protector.rank))
        if hang is not None:  # this rank's predecessor hung and was ended
            phases["hang_detect_seconds"] = hang
            STATE.protector.metrics.add("ghostserve_rank_stalls_total")
        rejoin.join(instance, STATE.protector, generation, phases)


def pull_raw_reqs(wrapped, instance, args, kwargs):
    """Rank 0 adds pending control requests to what it pulled; SGLang's broadcast carries them. After
    rank 0 was replaced, requests sent again by the main process are admitted once (handover)."""
    reqs = wrapped(*args, **kwargs)
    protector = STATE.protector
    if reqs is not None and protector is not None and protector.control is not None:
        if protector.settings.enable_fault_injection:
            drills.after_pull(protector.rank, reqs)
        reqs = handover.admit(reqs)
        reqs.extend(protector.control.take())
    return reqs


def stream_output(wrapped, instance, args, kwargs):
    """``SchedulerOutputStreamer.stream_output``, every rank: keep the requests it finished, which a
    replacement rank 0 may have to answer again."""
    protector = STATE.protector
    if protector is not None and protector.settings.enable_fault_injection:
        drills.before_output(protector.rank, _arg(args, kwargs, 0, "reqs"))
    result = wrapped(*args, **kwargs)
    if STATE.protector is not None:
        guarded("stream_output", handover.remember_finished, _arg(args, kwargs, 0, "reqs"))
    return result


def process_input_requests(wrapped, instance, args, kwargs):
    """Every rank takes the control requests out of the broadcast and handles them at this point."""
    reqs = _arg(args, kwargs, 0, "recv_reqs")
    controls = [r for r in reqs if isinstance(r, ControlRequest)]
    if not controls:
        return wrapped(*args, **kwargs)
    rest = [r for r in reqs if not isinstance(r, ControlRequest)]
    if "recv_reqs" in kwargs:
        kwargs = {**kwargs, "recv_reqs": rest}
    else:
        args = (rest, *args[1:])
    result = wrapped(*args, **kwargs)
    protector = STATE.protector
    for request in controls:
        try:
            reply = operations.handle(protector, request, instance)
        except Exception as exc:
            log.error("control request failed", op=request.op, rank=protector.rank, step=protector.step,
                      error=repr(exc), exc_info=exc)
            if STATE.settings.strict and not peer_lost(exc):
                raise
            # A peer that died during the request's collective is held for at the next broadcast.
            reply = {"error": f"{request.op} failed on rank {protector.rank}: {exc!r}"}
        if protector.control is not None:
            protector.control.reply(request.request_id, reply)
    return result


def model_forward(wrapped, instance, args, kwargs):
    protector = STATE.protector
    if protector is not None and protector.settings.enable_fault_injection:
        drills.before_forward(protector.rank)
    output = wrapped(*args, **kwargs)
    if protector is not None and instance is protector.model_runner:
        guarded("capture", protector.after_forward, _arg(args, kwargs, 0, "forward_batch"))
    return output


def _ours(allocator) -> bool:
    protector = STATE.protector
    return protector is not None and getattr(allocator, "_kvcache", None) is protector.kv.pool


def token_free(wrapped, instance, args, kwargs):
    """A free outside a free group takes effect now; inside one it is repeated by ``free_group_end``."""
    effective = instance.free_group is None
    result = wrapped(*args, **kwargs)
    if effective and _ours(instance):
        guarded("free", STATE.protector.on_free, _arg(args, kwargs, 0, "free_index"))
    return result


def release_page_ids(wrapped, instance, args, kwargs):
    """The paged allocator's single choke point for freed pages."""
    result = wrapped(*args, **kwargs)
    if _ours(instance) and args:
        pages = torch.cat([p.to("cpu", torch.int64).flatten() for p in args])
        slots = (pages[:, None] * instance.page_size + torch.arange(instance.page_size)).flatten()
        guarded("free", STATE.protector.on_free, slots)
    return result


def allocator_clear(wrapped, instance, args, kwargs):
    """A cleared allocator (flush_cache) frees every slot at once."""
    result = wrapped(*args, **kwargs)
    if _ours(instance):
        guarded("free", STATE.protector.on_free, torch.arange(STATE.protector.kv.slots))
    return result


def _pool_write(where: str, index: int, name: str):
    """A wrapper for a KV pool method that writes the slots in its argument ``name`` (position
    ``index``) outside a forward step: they are captured as a step of their own."""

    def wrapper(wrapped, instance, args, kwargs):
        result = wrapped(*args, **kwargs)
        protector = STATE.protector
        if protector is not None and instance is protector.kv.pool:
            guarded(where, protector.record_write, _arg(args, kwargs, index, name))
        return result

    return wrapper


pool_load_cpu_copy = _pool_write("load_cpu_copy", 1, "indices")  # KV loaded back from host
pool_move_kv_cache = _pool_write("move_kv_cache", 0, "tgt_loc")
