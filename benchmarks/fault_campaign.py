"""Fault campaign against a real GhostServe-protected SGLang server on CPU: N trials of {random rank(s),
random decode step, random request mix}, each compared token by token with the same mix run without a
fault on the same server. Prints every trial and a summary: lost requests, wrong tokens, recovery time
p50/p99."""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ghostserve_sglang import models  # noqa: E402
from ghostserve_sglang.campaign import run_kill_trial, run_trial  # noqa: E402
from ghostserve_sglang.local_server import launched  # noqa: E402


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
    parser.add_argument("--kill-rank", type=int, default=None, help="process deaths instead of KV faults: "
                        "this rank's scheduler process is killed (kill -9 or SIGSEGV) at a random step")
    args = parser.parse_args()
    if args.kill_rank is not None:
        return kill_campaign(args)
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
def campaign_server(args):
    """The protected server every trial of a campaign runs against."""
    ghost = ["--ghost-code", args.code, "--ghost-parity-shards", str(args.parity_shards),
             "--ghost-enable-fault-injection", "1"]
    with tempfile.TemporaryDirectory() as logs, \
            launched(args.tp, ghost, log_dir=logs, model=args.model) as server:
        yield server


def kill_campaign(args) -> None:
    trials = []
    with campaign_server(args) as server:
        for i in range(args.trials):
            how = ("KILL", "SEGV")[i % 2]
            trial = run_kill_trial(server, args.seed + i, ranks=[args.kill_rank], how=how)
            trials.append(trial)
            restart = trial.restart
            print(f"trial {i + 1:3d}/{args.trials}: {how} of rank {trial.ranks} after {trial.after_steps} "
                  "steps "
                  f"({trial.running_at_kill} requests running), {restart['outcome']}, "
                  f"{restart['slots_rebuilt']} slots rebuilt / {restart['slots_recomputed']} recomputed, "
                  f"restart {restart['seconds']:.2f} s; lost requests {trial.lost_requests}, "
                  f"wrong tokens {trial.wrong_tokens}, scrub mismatching {trial.scrub['mismatching']} "
                  f"not durable {trial.scrub['not_durable']}", flush=True)
    print(f"\ncommand: python benchmarks/fault_campaign.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"{args.model} (float32), TP={args.tp} {args.code} m={args.parity_shards}, process deaths of rank "
          f"{args.kill_rank} (kill -9 and SIGSEGV alternating), {trials[0].requests} concurrent requests")
    print(f"trials {len(trials)}, in prefill (step 0-2) {sum(t.after_steps < 3 for t in trials)}, "
          f"requests {sum(t.requests for t in trials)}, "
          f"lost requests {sum(t.lost_requests for t in trials)}, "
          f"wrong tokens {sum(t.wrong_tokens for t in trials)}, scrub mismatches "
          f"{sum(t.scrub['mismatching'] for t in trials)}")
    names = list(dict.fromkeys(n for t in trials for n in t.restart["phases"]))
    print("restart phases p50 / p99 (s): " + ", ".join(
        f"{n.removesuffix('_seconds')} {percentile([t.restart['phases'].get(n, 0) for t in trials], 50):.3f}"
        f" / {percentile([t.restart['phases'].get(n, 0) for t in trials], 99):.3f}" for n in names))
    seconds = [t.restart["seconds"] for t in trials]
    print(f"restart total p50 {percentile(seconds, 50):.2f} s, p99 {percentile(seconds, 99):.2f} s")


if __name__ == "__main__":
    main()
