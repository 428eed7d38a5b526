"""The main process's record of the requests it sent to TP rank 0 (docs/rank-restart.md, "Rank 0").

ZMQ has no acknowledgement: a request rank 0 had pulled but not yet broadcast to the other ranks dies
with it, and nothing in SGLang sends it again (the client would wait forever). The tokenizer manager
sends every request through one method; the journal keeps a pickled copy of each generate and
embedding request there, keyed by request id, for as long as the tokenizer manager waits for its
answer. When a replacement rank 0 is ready, ``redeliver`` sends every pending one again; the
replacement admits only those it does not have (``handover.admit``).
"""

from __future__ import annotations

import pickle

import structlog

from .handover import Redelivered, RedeliveryDone, requests

log = structlog.get_logger("ghostserve.journal")

SENT: dict[str, bytes] = {}  # rid -> pickled tokenized request


def _journaled_types() -> tuple[type, ...]:
    from sglang.srt.managers import io_struct

    return (io_struct.TokenizedGenerateReqInput, io_struct.TokenizedEmbeddingReqInput)


def record(manager, obj) -> None:
    for item in requests(obj):
        if isinstance(item, _journaled_types()):
            SENT[item.rid] = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    if len(SENT) > 2 * len(manager.rid_to_state) + 64:  # forget the answered ones, now and then
        for rid in [rid for rid in SENT if rid not in manager.rid_to_state]:
            del SENT[rid]


def pending(manager) -> dict:
    """Request id -> state, for every request sent to the scheduler and not yet answered in full."""
    return {rid: state for rid, state in list(manager.rid_to_state.items()) if not state.finished}


def delivered(manager) -> dict[str, int]:
    """How many output tokens each pending request has received."""
    return {rid: len(state.output_ids) for rid, state in pending(manager).items()}


def redeliver(manager) -> int:
    """Send every pending journalled request again (to a replacement rank 0), then the end marker."""
    from sglang.srt.managers.io_struct import sock_send, wrap_as_pickle

    sent = 0
    for rid in pending(manager):
        if rid in SENT:
            sock_send(manager.send_to_scheduler, wrap_as_pickle(Redelivered(rid, SENT[rid])))
            sent += 1
    sock_send(manager.send_to_scheduler, wrap_as_pickle(RedeliveryDone()))
    log.info("pending requests sent again to the replacement rank 0", requests=sent)
    return sent


# -- wrappers for the main-process patch targets (patches.MAIN_TARGETS) -------------------------------
def dispatch_to_scheduler(wrapped, instance, args, kwargs):
    """``TokenizerManager._dispatch_to_scheduler``: journal, then send as SGLang does."""
    record(instance, args[0] if args else kwargs["obj"])
    return wrapped(*args, **kwargs)


async def async_dispatch_to_scheduler(wrapped, instance, args, kwargs):
    """``TokenizerManager._async_dispatch_to_scheduler``: the same, for the async path."""
    record(instance, args[0] if args else kwargs["obj"])
    return await wrapped(*args, **kwargs)
