"""``ghostserve status`` and ``ghostserve scrub``: ask a running server about its protection.
``ghostserve check-sglang``: check the installed SGLang against the releases GhostServe declares.

May import: anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .control import ControlError, call
from .drills.process import HANG_POINTS, HOWS, MOMENTS


def _instance(args: argparse.Namespace) -> str:
    return args.instance_id or os.environ.get("GHOSTSERVE_INSTANCE_ID") or str(args.port)


def _print_status(reply: dict) -> None:
    print(f"instance {reply['instance_id']}")
    columns = ("rank", "node", "pid", "restarts", "code", "step", "durable_watermark", "lag_steps",
               "live_slots", "protected_slots", "parity_bytes_in_use", "host_bytes", "stalls", "drops",
               "checksum_failures", "errors", "phase", "stamp_age_seconds")
    columns = [c for c in columns if all(c in rank for rank in reply["ranks"])]  # phase: supervised only
    widths = [max(len(c), *(len(str(rank[c])) for rank in reply["ranks"])) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for rank in reply["ranks"]:
        print("  ".join(str(rank[c]).rjust(w) for c, w in zip(columns, widths)))


def _print_scrub(reply: dict) -> None:
    ratio = reply["parity_to_kv"]
    print(f"instance {reply['instance_id']} at step {reply['step']}: {reply['live_slots']} live slots, "
          f"{reply['matching']} matching, {reply['mismatching']} mismatching, "
          f"{reply['not_durable']} not yet durable, {reply['corrupt']} failed checksum; host parity is "
          f"{'n/a' if ratio is None else f'{ratio:.3f}'} of their KV bytes ({reply['seconds']:.2f} s)")


def _check_sglang(declaration: bool) -> int:
    from .sglang.patching import patches

    if declaration:
        print(json.dumps(patches.declaration(), indent=2))
        return 0
    lines = patches.differences()
    for line in lines:
        print(f"ghostserve: {line}", file=sys.stderr)
    if not lines:
        print(f"sglang {patches.sglang_version()}: supported; all {len(patches.ALL_TARGETS)} patch targets "
              "have their declared signatures")
    return 1 if lines else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ghostserve", description=__doc__)
    parser.add_argument("--instance-id", default=None, help="the server's --ghost-instance-id "
                        "(default: GHOSTSERVE_INSTANCE_ID, else the --port value)")
    parser.add_argument("--port", type=int, default=30000, help="the server's port, when the instance "
                        "id was left at its default")
    parser.add_argument("--shm-dir", default=None, help="the server's --ghost-shm-dir (default: "
                        "GHOSTSERVE_SHM_DIR, else /dev/shm)")
    parser.add_argument("--json", action="store_true", help="print the reply as JSON")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the reply")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="per rank: code, protected slots, durable watermark, lag, host bytes")
    scrub = sub.add_parser("scrub", help="recompute parity from the live KV of every rank and compare it "
                           "with the host store; exit 1 on any mismatch")
    scrub.add_argument("--no-wait", action="store_true", help="do not wait for the drain to catch up "
                       "first (slots after the watermark count as not yet durable)")
    inject = sub.add_parser("inject-fault", help="destroy the KV of the given ranks at the next step "
                            "boundary (needs --ghost-enable-fault-injection); recovery follows unless the "
                            "server runs with --ghost-auto-recover=0")
    inject.add_argument("--rank", type=int, action="append", required=True, dest="ranks",
                        help="a rank to hit; repeat for several")
    inject.add_argument("--no-recover", action="store_true", help="do not recover now, whatever "
                        "--ghost-auto-recover says (then run `ghostserve recover`)")
    corrupt = sub.add_parser("corrupt-parity", help="flip a byte in the host parity of some live slots of "
                             "one rank (needs --ghost-enable-fault-injection; the checksum must catch it)")
    corrupt.add_argument("--rank", type=int, required=True)
    corrupt.add_argument("--slots", type=int, default=8, help="how many slots to corrupt")
    recover = sub.add_parser("recover", help="rebuild lost KV from parity, recompute what parity does "
                             "not cover")
    recover.add_argument("--rank", type=int, action="append", dest="ranks",
                         help="a rank whose KV is lost (default: the ranks of the last injected fault)")
    drain = sub.add_parser("drain", help="pause or resume the parity drain on every rank (needs "
                           "--ghost-enable-fault-injection; for drills)")
    drain.add_argument("action", choices=("pause", "resume"))
    kill = sub.add_parser("kill-rank", help="end one rank's scheduler process (needs "
                          "--ghost-enable-fault-injection; a drill of a process death and its replacement)")
    kill.add_argument("--rank", type=int, required=True)
    kill.add_argument("--signal", default="KILL", choices=HOWS,
                      help="the signal the process gets; ERROR: its next forward raises instead; "
                           "STOP (with --at hold): it stops, as a rank stuck in a collective would")
    kill.add_argument("--at", default="now", choices=MOMENTS,
                      help="now; output: just before its next output to the detokenizer (which is lost); "
                           "finish: just before its next output that finishes a request; pulled (rank 0): "
                           "right after it pulled requests, before any other rank has them; hold: when it "
                           "starts holding for the replacement of another rank that died; batch: in the "
                           "forward of its next batch and of every later batch holding one of its "
                           "requests, its replacements too (a request that crashes the model every time)")
    kill.add_argument("--fail-replacement", action="store_true",
                      help="the replacement started for it fails at start-up (drills the fail stop)")
    hang = sub.add_parser("hang-rank", help="make one rank's scheduler block for ever at a point (needs "
                          "--ghost-enable-fault-injection; a drill of a hung rank, found and replaced)")
    hang.add_argument("--rank", type=int, action="append", required=True, dest="ranks",
                      help="a rank to hang; repeat for several at once")
    hang.add_argument("--at", default="forward", choices=HANG_POINTS,
                      help="forward: in its next forward (a kernel that never returns); collective: at its "
                           "next all-reduce, before it hands its part over, so its peers wait in it (CPU); "
                           "idle: at the top of its loop, before the request broadcast")
    check = sub.add_parser("check-sglang", help="check the installed SGLang against the declared releases "
                           "and patch signatures (no server needed); exit 1 on any difference")
    check.add_argument("--declaration", action="store_true", help="print the installed SGLang's entry "
                       "for ghostserve_sglang/sglang/patching/releases.json instead")
    for command in sub.choices.values():  # also after the command: `ghostserve status --json`
        command.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                             help="print the reply as JSON")
    args = parser.parse_args(argv)
    if args.command == "check-sglang":
        return _check_sglang(args.declaration)
    request_args = {
        "scrub": lambda: {"wait": not args.no_wait},
        "inject-fault": lambda: {"ranks": args.ranks, **({"recover": False} if args.no_recover else {})},
        "corrupt-parity": lambda: {"rank": args.rank, "slots": args.slots},
        "recover": lambda: {"ranks": args.ranks or []},
        "drain": lambda: {"pause": args.action == "pause"},
        "kill-rank": lambda: {"rank": args.rank, "signal": args.signal, "at": args.at,
                              "fail_replacement": args.fail_replacement},
        "hang-rank": lambda: {"ranks": args.ranks, "at": args.at},
    }.get(args.command, dict)()
    try:
        reply = call(_instance(args), args.command, request_args, timeout_s=args.timeout,
                     directory=args.shm_dir)
    except ControlError as exc:
        print(f"ghostserve: error: {exc}", file=sys.stderr)
        return 2
    printers = {"status": _print_status, "scrub": _print_scrub}
    if args.json or args.command not in printers:
        print(json.dumps(reply, indent=2))
    else:
        printers[args.command](reply)
    return 1 if args.command == "scrub" and reply["mismatching"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
