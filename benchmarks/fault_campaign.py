"""Fault campaign against a real GhostServe-protected SGLang server on CPU: N trials of {random rank(s),
random decode step, random request mix}, each compared token by token with the same mix run without a
fault on the same server. Prints every trial and a summary: lost requests, wrong tokens, recovery time
p50/p99."""

from __future__ import annotations

import argparse
import collections
import contextlib
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ghostserve_sglang import models  # noqa: E402
from ghostserve_sglang.testing.campaign import (  # noqa: E402
    LONG_PROMPT,
    await_warm_standbys,
    request_mix,
    run_kill_trial,
    run_trial,
)
from ghostserve_sglang.testing.local_server import launched  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--code", default="xor")
    parser.add_argument("--parity-shards", type=int, default=1)
    parser.add_argument("--lose", type=int, default=1, help="ranks lost per fault")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--model", default="tiny-llama", choices=models.NAMES, help="a bundled model")
    parser.add_argument("--process-kills", action="store_true", help="process deaths instead of KV faults: "
                        "random ranks (up to m at once, rank 0 included), signal and moment")
    parser.add_argument("--kv-fault-every", type=int, default=4,
                        help="with --process-kills: every N-th trial is an in-place KV fault (0: none)")
    parser.add_argument("--hangs", type=float, default=0.0, help="with --process-kills: the share of "
                        "trials whose ranks hang instead of dying (kill -STOP, or the hang-rank drill in "
                        "the forward, at an all-reduce, or idle)")
    parser.add_argument("--hang-timeout", type=float, default=5.0, help="--ghost-hang-timeout-seconds")
    parser.add_argument("--standby", type=int, nargs="+", default=[1], help="with --process-kills: "
                        "--ghost-standby of the server; several values run the same trials on one server "
                        "each and compare them (with a standby, each trial waits until one is warm)")
    args = parser.parse_args()
    if args.process_kills:
        campaigns = {standby: kill_campaign(args, standby) for standby in args.standby}
        if len(campaigns) > 1:
            compare_standby(campaigns)
        return
    trials = []
    with campaign_server(args) as server:
        for i in range(args.trials):
            trial = run_trial(server, args.seed + i, ranks=args.tp, lose=args.lose)
            trials.append(trial)
            rec = trial.recovery
            print(f"trial {i + 1:3d}/{args.trials}: lost {trial.lost_ranks} at step {trial.fault_step} "
                  f"({trial.running_at_fault} requests running), {rec.get('outcome')}, "
                  f"{rec.get('slots_rebuilt')} slots rebuilt / {rec.get('slots_recomputed')} recomputed "
                  f"in {rec.get('seconds', 0) * 1000:.1f} ms; lost requests {trial.lost_requests}, "
                  f"wrong tokens {trial.wrong_tokens}", flush=True)
    seconds = [t.recovery["seconds"] for t in trials]
    outcomes = collections.Counter(t.recovery["outcome"] for t in trials)
    print(f"\ncommand: python benchmarks/fault_campaign.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"{args.model} (float32), TP={args.tp} {args.code} m={args.parity_shards}, "
          f"{args.lose} rank(s) lost per fault, "
          f"{trials[0].requests} concurrent requests per trial (32-64 new tokens, mixed prompts)")
    print(f"trials {len(trials)}, faults mid-decode {sum(t.running_at_fault > 0 for t in trials)}, "
          f"requests {sum(t.requests for t in trials)}, "
          f"lost requests {sum(t.lost_requests for t in trials)}, "
          f"wrong tokens {sum(t.wrong_tokens for t in trials)}, scrub mismatches after recovery "
          f"{sum(t.scrub['mismatching'] for t in trials)}")
    print(f"outcomes {dict(outcomes)}; recovery time p50 {percentile(seconds, 50) * 1000:.1f} ms, "
          f"p99 {percentile(seconds, 99) * 1000:.1f} ms, max {max(seconds) * 1000:.1f} ms "
          f"(mean {statistics.mean(seconds) * 1000:.1f} ms)")


@contextlib.contextmanager
def campaign_server(args, standby: int = 1):
    """The protected server every trial of a campaign runs against."""
    ghost = ["--ghost-code", args.code, "--ghost-parity-shards", str(args.parity_shards),
             "--ghost-enable-fault-injection", "1", "--ghost-max-restarts", "0",
             "--ghost-hang-timeout-seconds", str(getattr(args, "hang_timeout", 10.0)),
             "--ghost-standby", str(standby)]
    with tempfile.TemporaryDirectory() as logs, \
            launched(args.tp, ghost, ["--chunked-prefill-size", "128"], log_dir=logs,
                     model=args.model) as server:
        yield server


MOMENTS = ("prefill", "chunked prefill", "decode", "output", "recovery")
SIGNALS = ("KILL", "SEGV", "TERM")
HANGS = ("STOP", "forward", "collective", "idle")  # kill -STOP, or where the hang-rank drill blocks


def kill_trial(server, rng: random.Random, args, seed: int):
    """A death: random ranks (up to m), signal and moment."""
    moments = MOMENTS if args.tp > 2 else MOMENTS[:-1]  # with two ranks a second death leaves no survivor
    moment, how = rng.choice(moments), rng.choice(SIGNALS)
    # One rank for "output": a drill arms one rank through rank 0, which a first death can stop.
    ranks = sorted(rng.sample(range(args.tp), 1 if moment in ("recovery", "output") else
                              rng.randint(1, args.parity_shards)))
    second = None
    if moment == "recovery":
        second = (rng.choice([r for r in range(args.tp) if r not in ranks]), rng.uniform(1.0, 12.0))
    after = {"prefill": rng.randrange(0, 3), "chunked prefill": rng.randrange(1, 5)}.get(
        moment, rng.randrange(6, 28))
    mix = request_mix(random.Random(seed), requests=7) + [LONG_PROMPT]
    trial = run_kill_trial(server, seed, ranks=ranks, how=how, after_steps=after, mix=mix,
                           late=rng.choice((0, 1)), moment="output" if moment == "output" else "now",
                           second=second)
    trial.moment = moment
    return trial


def hang_trial(server, rng: random.Random, args, seed: int):
    """A hang: random ranks (up to m) stopped with SIGSTOP, or blocked by the drill in the forward, at an
    all-reduce or at the top of their loop while idle (then every request is sent after the hang)."""
    kind = rng.choice(HANGS)
    ranks = sorted(rng.sample(range(args.tp), rng.randint(1, args.parity_shards)))
    mix = request_mix(random.Random(seed), requests=7) + [LONG_PROMPT]
    idle = kind == "idle"
    trial = run_kill_trial(server, seed, ranks=ranks, how="STOP" if kind == "STOP" else "HANG",
                           after_steps=0 if idle else rng.randrange(1, 28), mix=mix,
                           late=len(mix) if idle else rng.choice((0, 1)),
                           moment="now" if kind == "STOP" else kind)
    trial.moment = "hang"
    return trial


def kill_campaign(args, standby: int) -> list:
    """Process deaths: each trial kills one or more scheduler processes (at most m at once; rank 0
    included) with a random signal at a random moment; every ``--kv-fault-every``-th trial is an in-place
    KV fault instead, on the same server. Returns the process-fault trials."""
    rng = random.Random(args.seed)
    kills, kv = [], []
    print(f"--ghost-standby {standby}", flush=True)
    with campaign_server(args, standby) as server:
        for i in range(args.trials):
            seed = args.seed + i
            if args.kv_fault_every and i % args.kv_fault_every == args.kv_fault_every - 1:
                trial = run_trial(server, seed, ranks=args.tp, lose=args.lose)
                kv.append(trial)
                print(f"trial {i + 1:3d}/{args.trials}: KV of {trial.lost_ranks} lost in place, "
                      f"{trial.recovery.get('outcome')}; lost requests {trial.lost_requests}, wrong tokens "
                      f"{trial.wrong_tokens}", flush=True)
                continue
            make = hang_trial if rng.random() < args.hangs else kill_trial
            await_warm_standbys(server, standby)
            trial = make(server, rng, args, seed)
            kills.append(trial)
            restart, phases = trial.restart, trial.restart["phases"]
            print(f"trial {i + 1:3d}/{args.trials}: {trial.how} of rank(s) {trial.ranks} at {trial.moment} "
                  f"(step {trial.after_steps}, {trial.running_at_kill} requests running), "
                  f"{restart['outcome']}, "
                  f"{restart['slots_rebuilt']} slots rebuilt / {restart['slots_recomputed']} recomputed, "
                  f"restart {restart['seconds']:.2f} s (spawn {phases.get('spawn_seconds', 0):.2f}, "
                  f"join {phases.get('join_seconds', 0):.2f}); lost requests {trial.lost_requests}, "
                  f"wrong tokens {trial.wrong_tokens}, scrub mismatching {trial.scrub['mismatching']} "
                  f"not durable {trial.scrub['not_durable']} {'; '.join(trial.errors)}".rstrip(), flush=True)
    print(f"\ncommand: python benchmarks/fault_campaign.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"{args.model} (float32), TP={args.tp} {args.code} m={args.parity_shards}, "
          f"{kills[0].requests} concurrent requests per trial (one still in chunked prefill at 128)")
    count = collections.Counter
    print(f"process-kill trials {len(kills)}: by moment {dict(count(t.moment for t in kills))}, by signal "
          f"{dict(count(t.how.split('@')[0] for t in kills))}, by ranks killed "
          f"{dict(count(len(t.ranks) for t in kills))}, with rank 0 {sum(0 in t.ranks for t in kills)}")
    print(f"requests {sum(t.requests for t in kills)}, lost requests {sum(t.lost_requests for t in kills)}, "
          f"wrong tokens {sum(t.wrong_tokens for t in kills)}, scrub mismatches "
          f"{sum(t.scrub['mismatching'] for t in kills)}; outcomes "
          f"{dict(count(t.restart['outcome'] for t in kills))}")
    if kv:
        print(f"in-place KV fault trials {len(kv)}: lost requests {sum(t.lost_requests for t in kv)}, "
              f"wrong tokens {sum(t.wrong_tokens for t in kv)}")
    names = list(dict.fromkeys(n for t in kills for n in t.restart["phases"]))
    print("restart phases p50 / p99 (s): " + ", ".join(
        f"{n.removesuffix('_seconds')} {percentile([t.restart['phases'].get(n, 0) for t in kills], 50):.3f}"
        f" / {percentile([t.restart['phases'].get(n, 0) for t in kills], 99):.3f}" for n in names))
    seconds = [t.restart["seconds"] for t in kills]
    print(f"restart total p50 {percentile(seconds, 50):.2f} s, p99 {percentile(seconds, 99):.2f} s")
    hangs = [t for t in kills if t.moment == "hang"]
    if hangs:
        detect = [t.restart["phases"].get("hang_detect_seconds", 0.0) for t in hangs]
        total = [t.restart["seconds"] for t in hangs]  # the restart's phases include the detection
        restart = [t - d for t, d in zip(total, detect)]

        def p50_p99(values: list[float]) -> str:
            return f"p50 {percentile(values, 50):.2f} s, p99 {percentile(values, 99):.2f} s"

        print(f"hang trials {len(hangs)} (--ghost-hang-timeout-seconds {args.hang_timeout:g}): by kind "
              f"{dict(count(t.how for t in hangs))}, lost requests {sum(t.lost_requests for t in hangs)}, "
              f"wrong tokens {sum(t.wrong_tokens for t in hangs)}")
        print(f"hang detected (stamp age when found) {p50_p99(detect)}; replaced after it "
              f"{p50_p99(restart)}; hang to serving again {p50_p99(total)}")
    return kills


def compare_standby(campaigns: dict) -> None:
    """The same trials with and without standby processes: restart time and phases, p50 and p99."""
    shown = ("spawn_seconds", "join_seconds", "state_transfer_seconds")
    print("\n| --ghost-standby | trials | lost requests | wrong tokens | restart p50 | p99 | "
          + " | ".join(f"{n.removesuffix('_seconds')} p50 / p99" for n in shown) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(shown))
    for standby, kills in campaigns.items():
        seconds = [t.restart["seconds"] for t in kills]
        phases = []
        for name in shown:
            values = [t.restart["phases"].get(name, 0) for t in kills]
            phases.append(f"{percentile(values, 50):.2f} / {percentile(values, 99):.2f} s")
        print(f"| {standby} | {len(kills)} | {sum(t.lost_requests for t in kills)} | "
              f"{sum(t.wrong_tokens for t in kills)} | {percentile(seconds, 50):.2f} s | "
              f"{percentile(seconds, 99):.2f} s | " + " | ".join(phases) + " |")


if __name__ == "__main__":
    main()
