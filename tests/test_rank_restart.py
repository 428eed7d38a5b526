"""A rank's scheduler process dies on a real TP=2 server (CPU, the KV-sensitive bundled model) and the
server carries on: a replacement process joins, its KV is rebuilt from the survivor and parity, and
every request finishes with the output ids of a run without the fault (docs/rank-restart.md)."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from ghostserve_sglang.testing.campaign import process_fault_mix, run_kill_trial
from ghostserve_sglang.testing.local_server import eventually

pytestmark = pytest.mark.shared_server("xor2")


@pytest.fixture
def server(shared_server):
    return shared_server


def status_json(server) -> dict:
    """Through the CLI, as an operator reads it."""
    result = server.ghostserve("status", "--json")
    assert result.returncode == 0, result.stderr
    import json

    return json.loads(result.stdout)


def nice_values(pid: int) -> set[int]:
    """The CPU priorities (nice) of every thread of ``pid``."""
    values = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as stat:
            values.add(int(stat.read().rsplit(")", 1)[1].split()[16]))
    return values


def current_standby(server, ranks: set[int]) -> int | None:
    """The pid of the standby process started last, once it is not one of ``ranks``."""
    started = [int(pid) for pid in re.findall(r"standby process started +pid=(\d+)", server.log())]
    return started[-1] if started and started[-1] not in ranks else None


def healthy_within(server, seconds: float) -> float:
    """Seconds until /health answers 200 (polled from the moment of the call)."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"/health did not answer within {seconds} s")


@pytest.mark.parametrize("how, seed, after_steps", [
    ("KILL", 1, 12),  # kill -9 mid-decode
    ("KILL", 2, 20),  # the same rank again, later in the same server
    ("SEGV", 3, 10),  # kill-rank --signal SEGV
    ("ERROR", 4, 10),  # the rank's forward raises; SGLang ends the process
])
def test_a_dead_rank_is_replaced_and_every_request_finishes_unchanged(server, how, seed, after_steps):
    """Each death is replaced from the standby, itself replaced after the previous replacement."""
    before = status_json(server)["ranks"]
    standby = eventually(lambda: current_standby(server, {rank["pid"] for rank in before}))
    # Its warm-up takes only what the ranks leave of the CPU (from its first step on).
    eventually(lambda: nice_values(standby) == {19} or None, timeout_s=10)
    mix = process_fault_mix()
    log_before = len(server.log())
    trial = run_kill_trial(server, seed, ranks=[1], how=how, after_steps=after_steps, mix=mix)
    log = server.log()[log_before:]
    assert "replacing rank" in log and "standby=True" in log and "standby=False" not in log
    assert trial.running_at_kill >= 4, trial  # the death landed while requests were decoding
    assert trial.lost_requests == 0 and trial.wrong_tokens == 0, trial
    healthy_within(server, 30)
    after = status_json(server)["ranks"]
    assert after[1]["pid"] != before[1]["pid"] and after[1]["restarts"] == before[1]["restarts"] + 1
    assert after[0]["pid"] == before[0]["pid"]
    assert after[1]["pid"] == standby and nice_values(standby) == nice_values(after[0]["pid"]) == {0}
    assert trial.restart["restart"] and trial.restart["lost_ranks"] == [1]
    assert trial.restart["slots_rebuilt"] > 0, trial.restart  # the survivor's parity was used
    assert {"detect_seconds", "spawn_seconds", "join_seconds", "state_transfer_seconds",
            "decode_seconds", "recompute_seconds"} <= set(trial.restart["phases"])
    assert trial.scrub["mismatching"] == 0 and trial.scrub["not_durable"] == 0, trial.scrub
    assert trial.scrub["matching"] == trial.scrub["live_slots"] > 0


@pytest.mark.parametrize("how, moment, seed, after_steps, late, handed_over", [
    ("KILL", "now", 21, 12, 2, None),  # kill -9 mid-decode, two requests sent while rank 0 is gone
    ("KILL", "output", 22, 12, 0, "rewound"),  # an output the survivor counted as sent is lost
    ("SEGV", "finish", 23, 3, 0, "finished_resent"),  # a request's final output is lost
    ("KILL", "pulled", 24, 12, 2, "request redelivered"),  # requests rank 0 pulled and never broadcast
    ("TERM", "now", 25, 20, 1, None),
])
def test_rank_0_dies_and_every_request_finishes_unchanged(server, how, moment, seed, after_steps, late,
                                                          handed_over):
    """Rank 0 also owns the request channel, the outputs and the control socket: its replacement takes
    the state from rank 1, sends what the clients did not get, and the main process redelivers what
    rank 0 never broadcast (every other request is streamed, and a stream shows a missing output)."""
    before = status_json(server)["ranks"]
    log_before = len(server.log())
    mix = process_fault_mix()
    trial = run_kill_trial(server, seed, ranks=[0], how=how, after_steps=after_steps, mix=mix, late=late,
                           moment=moment)
    assert trial.running_at_kill >= 4, trial
    assert trial.lost_requests == 0 and trial.wrong_tokens == 0, trial
    after = status_json(server)["ranks"]  # the control socket is bound again by the new rank 0
    assert after[0]["pid"] != before[0]["pid"] and after[0]["restarts"] == before[0]["restarts"] + 1
    assert after[1]["pid"] == before[1]["pid"]
    assert trial.scrub["mismatching"] == 0 and trial.scrub["not_durable"] == 0, trial.scrub
    log = server.log()[log_before:]
    assert "rank 0 taken over" in log and "pending requests sent again to the replacement rank 0" in log
    if handed_over == "request redelivered":
        assert "request redelivered" in log
    elif handed_over is not None:
        counts = re.search(r"rank 0 taken over .*", log).group(0)
        assert re.search(rf"{handed_over}=[1-9]", counts), counts


def test_random_kills_lose_no_request_and_change_no_token(server):
    rng = random.Random(12)
    trials = [run_kill_trial(server, 100 + i, ranks=[1], how="KILL", after_steps=rng.randrange(0, 28))
              for i in range(2)]
    assert [(t.lost_requests, t.wrong_tokens) for t in trials] == [(0, 0)] * 2, trials
    assert all(t.scrub["mismatching"] == 0 and t.scrub["not_durable"] == 0 for t in trials)


def test_the_cli_drill_needs_fault_injection_and_names_bad_values(server):
    bad = server.ghostserve("kill-rank", "--rank", "5")
    assert bad.returncode == 2 and "rank=5 is not allowed; give a rank in 0..1" in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "ghostserve_sglang.cli", "kill-rank", "--rank", "1",
                            "--signal", "HUP"], capture_output=True, text=True)
    assert usage.returncode == 2 and "invalid choice: 'HUP'" in usage.stderr
    pulled = server.ghostserve("kill-rank", "--rank", "1", "--at", "pulled")
    assert pulled.returncode == 2 and "at='pulled' is for rank 0 only" in pulled.stderr
    stop = server.ghostserve("kill-rank", "--rank", "1", "--signal", "STOP")
    assert stop.returncode == 2 and "signal='STOP' with at='now' is not allowed" in stop.stderr
    assert not [n for n in os.listdir("/dev/shm") if "drill-fail-replacement" in n]
