"""What a replacement TP rank 0 takes over from the dead one (docs/rank-restart.md, "Rank 0").

Rank 0 alone pulls requests from the tokenizer and sends outputs to the detokenizer; every other rank
keeps the same request state and only skips the send. When rank 0 dies, two things can be missing
from the survivors' state:

- **Outputs the clients never got.** The survivor counted an output as sent when its own (skipped)
  send ran; rank 0's real send may have died with it. The replacement asks the main process how many
  output tokens each pending request has received, rewinds its send offsets to that, and sends the
  rest. Requests that finished in the last steps are kept (``RECENT``) so that a lost final output is
  sent again too. In the rare case that rank 0 had already sent more than the survivor computed, the
  request is aborted with an error naming the restart (its tokens cannot be sent twice).
- **Requests rank 0 pulled but never broadcast.** The main process keeps each dispatched request
  (``journal``) and, once the replacement is ready, sends every pending one again wrapped in
  ``Redelivered``, then ``RedeliveryDone``. Rank 0 admits a redelivered request only if its id is
  unknown: not in the survivors' state, not already received (requests the tokenizer queued while
  no rank 0 was connected arrive first, as they were sent).
"""

from __future__ import annotations

import collections
import dataclasses
import pickle

import structlog

log = structlog.get_logger("ghostserve.handover")

RECENT_OUTPUTS = 8  # stream_output calls with finished requests that are kept for a replacement
RECENT: collections.deque = collections.deque(maxlen=RECENT_OUTPUTS)  # lists of finished Req
CHANNEL = None  # a replacement rank 0's pipe to the supervisor (set before SGLang's scheduler starts)


@dataclasses.dataclass(frozen=True)
class Redelivered:
    """A request the main process sends again to a replacement rank 0 (its pickled original)."""

    rid: str
    payload: bytes


@dataclasses.dataclass(frozen=True)
class RedeliveryDone:
    """Every pending request has been sent again; rank 0 stops tracking request ids."""


@dataclasses.dataclass
class Takeover:
    known: set | None = None  # request ids rank 0 has, while a redelivery is expected
    aborts: list = dataclasses.field(default_factory=list)  # AbortReq to broadcast with the next pull


TAKEOVER = Takeover()


def remember_finished(reqs) -> None:
    """After every ``stream_output`` (every rank): keep the requests whose final output it sent."""
    finished = [r for r in reqs if r.finished() and r.finished_output]
    if finished:
        RECENT.append(finished)


def _live(scheduler) -> list:
    reqs = [*scheduler.waiting_queue, *scheduler.running_batch.reqs]
    for batch in (scheduler.last_batch, scheduler.cur_batch_for_debug):
        if batch is not None:
            reqs.extend(batch.reqs)
    if scheduler.chunked_req is not None:
        reqs.append(scheduler.chunked_req)
    return list({id(r): r for r in reqs}.values())


def take_over(scheduler, delivered: dict[str, int]) -> dict:
    """On the replacement rank 0, after the state transfer: ``delivered`` is what each pending request
    has received (output tokens, from the main process). Sends what is missing; returns counts."""
    from sglang.srt.managers.io_struct import AbortReq

    live = _live(scheduler)
    finished = [r for batch in RECENT for r in batch]
    resend, rewound, aborted = [], 0, 0
    for req in [*live, *finished]:
        if req.rid not in delivered:
            continue  # nobody waits for it (already answered, or aborted by its client)
        got, sent = delivered[req.rid], req.send_token_offset
        if got > sent:  # the dead rank 0 was a step ahead of the survivor: those tokens are out
            req.send_token_offset = len(req.output_ids)
            TAKEOVER.aborts.append(AbortReq(rid=req.rid, abort_message="ghostserve: rank 0 was replaced "
                                            "after it sent output the survivors had not computed"))
            aborted += 1
            continue
        if got == sent and not (req.finished() and req.finished_output):
            continue
        _rewind(req, got)
        rewound += 1
        if req.finished():
            req.finished_output = False
            resend.append(req)
    if resend:
        scheduler.output_streamer.stream_output(resend, any(r.return_logprob for r in resend))
    rids = {r.rid for r in live} | {r.rid for r in finished}
    for deferred in getattr(scheduler, "_deferred_input_requests", []):
        rids.update(request_ids(deferred))
    TAKEOVER.known = rids
    counts = {"rewound": rewound, "finished_resent": len(resend), "aborted": aborted, "known": len(rids)}
    log.info("rank 0 taken over", **counts)
    return counts


def _rewind(req, got: int) -> None:
    """Make the next output of ``req`` start after its first ``got`` output tokens (what the client
    has), as SGLang's streamer counts them."""
    req.send_token_offset = got
    req.send_output_token_logprobs_offset = got
    if got == 0 or req.read_offset is None:
        req.send_decode_id_offset = 0  # the detokenizer has nothing for it: start with the prompt tail
    else:
        req.send_decode_id_offset = (req.read_offset - req.surr_offset) + got


def admit(reqs: list) -> list:
    """Rank 0, on what it pulled: unwrap redelivered requests it does not have; drop the others."""
    admitted = []
    for req in reqs:
        if isinstance(req, RedeliveryDone):
            log.info("redelivery done")
            TAKEOVER.known = None
            continue
        if isinstance(req, Redelivered):
            if TAKEOVER.known is None or req.rid in TAKEOVER.known:
                continue
            log.warning("request redelivered", rid=req.rid)
            req = pickle.loads(req.payload)
        elif TAKEOVER.known is not None and set(request_ids(req)) & TAKEOVER.known:
            log.warning("request received twice; the second is dropped", rids=request_ids(req))
            continue
        if TAKEOVER.known is not None:
            TAKEOVER.known.update(request_ids(req))
        admitted.append(req)
    if TAKEOVER.aborts:
        admitted.extend(TAKEOVER.aborts)
        TAKEOVER.aborts.clear()
    return admitted


def requests(obj) -> list:
    """The tokenized requests one message to the scheduler carries: a batch's items, or itself."""
    items = getattr(obj, "batch", None)
    return items if isinstance(items, list) else [obj]


def request_ids(obj) -> list[str]:
    """The request ids a tokenized request (or a batch of them) carries."""
    return [item.rid for item in requests(obj) if isinstance(getattr(item, "rid", None), str)]


def ask_main_process(question: str) -> object:
    """Rank 0's replacement asks the supervisor (in SGLang's main process) and waits for the answer."""
    CHANNEL.send(question)
    return CHANNEL.recv()
