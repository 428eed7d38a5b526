"""Multi-node tensor parallelism with two parity shards: TP=4 over 2 emulated nodes (ranks 0-1 on node 0,
2-3 on node 1), rs m=2. Two ranks on different nodes killed at the same moment are replaced together, in
one generation, each by its own node, and every token is unchanged (docs/rank-restart.md, "Across
nodes")."""

from __future__ import annotations

import random
import re

from ghostserve_sglang.testing.campaign import process_fault_mix, run_kill_trial
from ghostserve_sglang.testing.emulated_nodes import launched_nodes

GHOST = ["--ghost-code", "rs", "--ghost-parity-shards", "2", "--ghost-strict", "1",
         "--ghost-rejoin-timeout-seconds", "240", "--ghost-max-restarts", "0"]


def test_two_ranks_on_different_nodes_killed_at_once_are_replaced_together(tmp_path):
    with launched_nodes(4, 2, GHOST, extra=["--chunked-prefill-size", "128"], log_dir=str(tmp_path)) as nodes:
        trial = run_kill_trial(nodes.server, seed=41, ranks=(1, 2), mix=process_fault_mix(),
                               after_steps=random.Random(41).randrange(8, 24))  # mid-decode
        logs = [nodes.log(0), nodes.log(1)]
        ranks = nodes.server.control("status")["ranks"]
    assert trial.ok and trial.running_at_kill > 0, trial
    assert trial.restart["outcome"] == "rebuilt", trial
    assert trial.scrub["mismatching"] == 0 and trial.scrub["corrupt"] == 0, trial
    assert [(r["node"], r["restarts"]) for r in ranks] == [(0, 0), (0, 1), (1, 1), (1, 0)]
    assert re.findall(r"replacing rank .*generation=(\d+) .*rank=(\d+)", logs[0]) == [("1", "1")]
    assert re.findall(r"replacing rank .*generation=(\d+) .*rank=(\d+)", logs[1]) == [("1", "2")]
