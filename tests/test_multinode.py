"""Multi-node tensor parallelism (``--nnodes 2``), the nodes emulated on this host: one launcher per node,
each with its own port and ``--ghost-shm-dir``, sharing only TCP. TP=2 with one rank per node, xor: a
rank killed on either node mid-decode is replaced by its own node and rebuilt, every token unchanged;
node 1 says what it is; ``ghostserve status`` shows every rank with its node; and when node 1 is lost
whole (every process of its launcher killed), the server fails stop with a 503 for every pending request
(docs/rank-restart.md, "Across nodes")."""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import re
import time
import urllib.error

import pytest

from ghostserve_sglang.testing.campaign import process_fault_mix, request_mix, run_kill_trial
from ghostserve_sglang.testing.emulated_nodes import launched_nodes
from ghostserve_sglang.testing.local_server import eventually

GHOST = ["--ghost-code", "xor", "--ghost-enable-fault-injection", "1", "--ghost-strict", "1",
         "--ghost-rejoin-timeout-seconds", "240", "--ghost-hang-timeout-seconds", "5",
         "--ghost-max-restarts", "0"]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    with launched_nodes(2, 2, GHOST, extra=["--chunked-prefill-size", "128"],
                        log_dir=str(tmp_path_factory.mktemp("nodes"))) as nodes:
        yield nodes


def test_node_1_says_what_it_is_and_status_shows_every_rank_with_its_node(nodes):
    node1 = nodes.log(1)
    assert re.search(r"GhostServe node 1 of 2 ready: TP ranks \[1\] of 2, joined node 0 at 127\.0\.0\.1:\d+",
                     node1)
    assert "GhostServe-protected SGLang server ready" not in node1  # it serves no API
    banner = eventually(lambda: "GhostServe-protected SGLang server ready" in nodes.log(0) or None)
    assert banner and f"--shm-dir {nodes.shm_dirs[0]} status" in nodes.log(0)  # the command as printed
    result = nodes.server.ghostserve("status", "--json")
    assert result.returncode == 0, result.stderr
    ranks = json.loads(result.stdout)["ranks"]
    assert [(r["rank"], r["node"]) for r in ranks] == [(0, 0), (1, 1)]
    assert {r["exchange"] for r in ranks} == {"gloo"}  # the nodes share no shared memory
    assert nodes.server.control("scrub")["mismatching"] == 0


def test_a_rank_killed_on_either_node_is_replaced_by_its_node_and_no_token_changes(nodes):
    trials = [run_kill_trial(nodes.server, seed=seed, ranks=(rank,), mix=process_fault_mix(),
                             after_steps=random.Random(seed).randrange(8, 24))  # mid-decode
              for seed, rank in ((31, 1), (32, 0))]
    for trial in trials:
        assert trial.ok and trial.running_at_kill > 0, trial
        assert trial.restart["outcome"] == "rebuilt" and trial.restart["slots_rebuilt"] > 0, trial
        assert trial.scrub["mismatching"] == 0 and trial.scrub["corrupt"] == 0, trial
    started = r"replacing rank .*generation=(\d+) .*rank=(\d+)"  # each node starts its own rank's
    assert re.findall(started, nodes.log(1)) == [("1", "1")]
    assert re.findall(started, nodes.log(0)) == [("2", "0")]
    ranks = nodes.server.control("status")["ranks"]
    assert [(r["node"], r["restarts"]) for r in ranks] == [(0, 1), (1, 1)]


def test_a_rank_hung_on_either_node_is_found_by_node_0_ended_by_its_node_and_replaced(nodes):
    """``kill -STOP`` mid-decode: node 0 judges every rank's stamps (node 1 publishes its own); rank 1's
    verdict is carried out by node 1's supervisor."""
    before = [r["restarts"] for r in nodes.server.control("status")["ranks"]]
    trials = [run_kill_trial(nodes.server, seed=seed, ranks=(rank,), how="STOP", mix=process_fault_mix(),
                             after_steps=random.Random(seed).randrange(8, 24))
              for seed, rank in ((33, 1), (34, 0))]
    for trial in trials:
        assert trial.ok and trial.running_at_kill > 0, trial
        assert trial.restart["phases"]["hang_detect_seconds"] >= 5, trial
        assert trial.scrub["mismatching"] == 0, trial
    assert re.search(r"rank hung; ending it so that it is replaced .*found_by='node 0'.*rank=1", nodes.log(1))
    assert re.search(r"rank hung; ending it so that it is replaced .*rank=0.*stopped", nodes.log(0))
    assert [r["restarts"] for r in nodes.server.control("status")["ranks"]] == [n + 1 for n in before]


def outcome(future) -> str:
    """How a request ended; a stream ends with its error in the last event."""
    try:
        reason = future.result(timeout=60)["meta_info"]["finish_reason"]
        if reason["type"] == "abort":
            return f"http {reason['status_code']}: {reason['message']}"
        return "completed"
    except urllib.error.HTTPError as exc:
        return f"http {exc.code}: {exc.read().decode()[:400]}"
    except Exception as exc:
        return f"no response: {exc!r}"


def test_node_1_lost_whole_fails_stop_with_a_503_for_every_pending_request(nodes):
    """Runs last: it ends the server. A whole node's KV (both of its ranks' shares, here its one rank's,
    with its host parity) cannot be rebuilt from the other node: the documented outcome is a fail stop."""
    server = nodes.server
    mix = request_mix(random.Random(8))
    with concurrent.futures.ThreadPoolExecutor(len(mix)) as pool:
        futures = [pool.submit(server.generate, ids, new + 200, stream=i % 2 == 1)
                   for i, (ids, new) in enumerate(mix)]
        start = server.control("status")["ranks"][0]["step"]
        while server.control("status")["ranks"][0]["step"] < start + random.randrange(3, 15):
            time.sleep(0.01)
        killed_at = time.monotonic()
        nodes.kill(1)
        outcomes = [outcome(f) for f in futures]
    server.process.wait(timeout=60)
    stopped_after = time.monotonic() - killed_at
    cause = "node 1 (TP ranks [1]) has not been heard from for"
    assert all(o.startswith("http 503") and cause in o for o in outcomes), outcomes
    assert server.process.returncode == 1 and stopped_after < 30
    lines = [line for line in nodes.log(0).splitlines() if line.startswith("ghostserve: fail stop:")]
    assert len(lines) == 1 and cause in lines[0] and "a whole node's KV cannot be rebuilt" in lines[0]
    assert os.listdir(nodes.shm_dirs[0]) == []  # node 0 removed its segments, stamps and socket
