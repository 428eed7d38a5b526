"""Control requests (``ghostserve status``, ``scrub``, ``recover`` and the drills): what each one does.
Every rank runs ``handle`` for a request at the same point between two steps, so the collective parts
(on the protector's worker thread) meet.

May import: sglang.restart, sglang.protection, drills, settings, logs, metrics, control, store, codec.
"""

from __future__ import annotations

from ..control import ControlRequest
from ..drills import kv as kv_drills
from ..drills import process as process_drills
from .protection import reporting, scrub
from .restart import liveness, rejoin

# need --ghost-enable-fault-injection
DRILLS = ("inject-fault", "corrupt-parity", "drain", "kill-rank", "hang-rank")


def _node() -> int:
    """The node this rank runs on (``--node-rank`` of its launcher)."""
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().node_rank


def handle(protector, request: ControlRequest, scheduler) -> dict:
    """Carry out ``request`` on this rank; the reply of rank 0 goes to the client."""
    p, args = protector, request.args
    if request.op == "status":
        mine = {"node": _node(), **liveness.own()}  # the stamp read now, as the loop stamped it
        return p.call(lambda: reporting.status(p, rejoin.MEMBERS.restarts.get(p.rank, 0), mine))
    if request.op == "scrub":
        return p.call(lambda: scrub.scrub(p, wait=bool(args.get("wait", True))))
    if request.op in DRILLS and not p.settings.enable_fault_injection:
        return {"error": f"{request.op} is refused: the server runs without --ghost-enable-fault-injection"}
    if request.op == "drain":
        return p.call(lambda: kv_drills.pause_drain(p, bool(args["pause"])))
    if request.op == "corrupt-parity":
        return p.call(lambda: kv_drills.corrupt(p, int(args["rank"]), int(args["slots"])))
    if request.op == "kill-rank":
        return process_drills.kill_rank(p, args.get("rank"), args.get("signal", "KILL"),
                                        bool(args.get("fail_replacement", False)), args.get("at", "now"))
    if request.op == "hang-rank":
        return process_drills.hang_rank(p, args.get("ranks") or [], args.get("at", "forward"))
    ranks = args.get("ranks") or sorted(p.lost)
    if not ranks:
        return {"error": f"{request.op} needs --rank: no rank has lost its KV"}
    valid = all(isinstance(r, int) and 0 <= r < p.ranks for r in ranks)
    if not valid or len(set(ranks)) != len(ranks):
        return {"error": f"ranks={ranks} is not allowed; give distinct ranks in 0..{p.ranks - 1}"}
    if request.op == "recover":
        return p.recover(scheduler, ranks)
    reply = {"fault": p.call(lambda: kv_drills.inject(p, ranks))}
    if args.get("recover", p.settings.auto_recover):
        reply["recovery"] = p.recover(scheduler, ranks)
    return reply
