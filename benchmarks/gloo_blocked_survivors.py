"""How often a gloo collective leaves a survivor blocked after a peer dies (docs/rank-restart.md,
"Several ranks"). Three plain ``torch.distributed`` gloo processes run broadcast, all-reduce and
all_gather_object in a loop, as SGLang's ranks do; one, chosen at random, gets SIGKILL at a random
moment. A survivor whose collective fails records it and then waits, keeping its connections open, as a
GhostServe rank holding for a replacement does. A survivor still inside a collective 5 s after the kill
is blocked: only a closed connection or the group timeout would release it.

    python benchmarks/gloo_blocked_survivors.py --trials 15
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import random
import signal
import sys
import time

import torch
import torch.distributed as dist

OPS = ("broadcast", "all_reduce", "all_gather_object")


def member(rank: int, port: int, where) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3,
                            timeout=datetime.timedelta(seconds=60))
    tensor = torch.zeros(64)
    for i in range(1, sys.maxsize):
        for op in OPS:
            where[rank] = f"{op} #{i}"
            try:
                if op == "broadcast":
                    dist.broadcast(tensor, src=0)
                elif op == "all_reduce":
                    dist.all_reduce(tensor)
                else:
                    dist.all_gather_object([None] * 3, (rank, i))
            except Exception:
                where[rank] = f"failed in {op} #{i}"
                time.sleep(60)  # holds, connections open
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    mp.set_start_method("spawn")
    rng = random.Random(args.seed)
    blocked_trials = 0
    with mp.Manager() as manager:
        for trial in range(1, args.trials + 1):
            where = manager.dict()
            port = 20000 + rng.randrange(20000)
            members = [mp.Process(target=member, args=(r, port, where)) for r in range(3)]
            for process in members:
                process.start()
            while len(where) < 3:
                time.sleep(0.1)
            time.sleep(0.5 + rng.random())
            victim = rng.randrange(3)
            os.kill(members[victim].pid, signal.SIGKILL)
            time.sleep(5)
            seen = dict(where)
            blocked = [r for r in range(3) if r != victim and not seen[r].startswith("failed")]
            blocked_trials += bool(blocked)
            states = ", ".join(f"rank {r}: {'killed in ' if r == victim else ''}{seen[r]}" for r in range(3))
            print(f"trial {trial:2d}: {states}{'  <- blocked: rank ' + str(blocked) if blocked else ''}",
                  flush=True)
            for process in members:
                process.kill()
                process.join()
    print(f"\ncommand: python benchmarks/gloo_blocked_survivors.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"torch {torch.__version__}: a survivor stayed blocked in {blocked_trials} of {args.trials} trials")


if __name__ == "__main__":
    main()
