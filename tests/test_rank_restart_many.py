"""Several rank processes die on a real TP=3 server (CPU, the KV-sensitive GQA model): with
``--ghost-code rs --ghost-parity-shards 2`` up to two at once, or one while another is being replaced,
are replaced and their KV rebuilt from parity; every request finishes with the output ids of a run
without the fault. With no survivor left the server fails stop (docs/rank-restart.md, "Several
ranks"); more deaths than parity covers: test_rank_death.py."""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import time
import urllib.error

import pytest

from ghostserve_sglang.testing.campaign import LONG_PROMPT, process_fault_mix, request_mix, run_kill_trial

pytestmark = pytest.mark.shared_server("rs3")


@pytest.fixture
def server(shared_server):
    return shared_server


@pytest.mark.parametrize("ranks, how, seed, after_steps, second", [
    ([0, 2], "KILL", 31, 12, None),  # two at once mid-decode, rank 0 among them
    ([1, 2], "SEGV", 32, 2, None),  # two at once during prefill
    ([1], "KILL", 33, 10, (0, 3.0)),  # rank 0 dies while rank 1 is being replaced
])
def test_up_to_m_dead_ranks_are_replaced_and_rebuilt(server, ranks, how, seed, after_steps, second):
    before = server.control("status")["ranks"]
    log_before = len(server.log())
    mix = process_fault_mix()
    trial = run_kill_trial(server, seed, ranks=ranks, how=how, after_steps=after_steps, mix=mix, late=1,
                           second=second)
    assert trial.running_at_kill >= 4, trial
    assert trial.lost_requests == 0 and trial.wrong_tokens == 0, trial
    dead = sorted(trial.ranks)
    assert trial.restart["lost_ranks"] == dead and trial.restart["slots_rebuilt"] > 0, trial.restart
    assert trial.scrub["mismatching"] == 0 and trial.scrub["not_durable"] == 0, trial.scrub
    after = server.control("status")["ranks"]
    for rank in range(3):
        replaced = rank in dead
        assert (after[rank]["pid"] != before[rank]["pid"]) == replaced
        assert after[rank]["restarts"] == before[rank]["restarts"] + replaced
    log = server.log()[log_before:]
    if second is not None:
        assert "another rank lost during the replacement" in log
    else:  # two at once and one standby: one replacement is the standby, the other starts cold
        assert log.count("standby=True") == 1 and log.count("standby=False") == 1, log[-3000:]


def test_a_survivor_that_never_reaches_the_rendezvous_is_ended_and_replaced_too(server):
    """Rank 1 stops as it starts holding for rank 2's replacement, as a rank blocked in a collective its
    peers have left would (gloo fails no wait on a live connection). The supervisor ends it once rank 0
    has waited ``STRAGGLER_SECONDS`` at the rendezvous and replaces both; parity (m=2) covers both."""
    armed = server.control("kill-rank", rank=1, signal="STOP", at="hold")
    assert armed["at"] == "hold", armed
    before = server.control("status")["ranks"]
    log_before = len(server.log())
    mix = request_mix(random.Random(35), requests=7) + [LONG_PROMPT]
    trial = run_kill_trial(server, 35, ranks=[2], how="KILL", after_steps=10, mix=mix)
    assert trial.lost_requests == 0 and trial.wrong_tokens == 0, trial
    assert trial.restart["lost_ranks"] == [1, 2] and trial.restart["slots_rebuilt"] > 0, trial.restart
    assert trial.scrub["mismatching"] == 0 and trial.scrub["not_durable"] == 0, trial.scrub
    after = server.control("status")["ranks"]
    assert after[1]["pid"] != before[1]["pid"] and after[1]["restarts"] == before[1]["restarts"] + 1
    assert after[0]["pid"] == before[0]["pid"]
    log = server.log()[log_before:]
    assert "rank did not reach the rendezvous; ending it so that it is replaced too" in log
    pid = f"pid={before[1]['pid']}"
    assert [line for line in log.splitlines() if "rank process died" in line and pid in line
            and "did not reach the rendezvous and was ended" in line]


@pytest.mark.shared_server_last
def test_with_no_survivor_the_server_fails_stop_with_an_error_for_every_request(server):
    pids = [r["pid"] for r in server.control("status")["ranks"]]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(server.generate, [5] * 50, 1500) for _ in range(4)]
        start = server.control("status")["ranks"][0]["step"]
        while server.control("status")["ranks"][0]["step"] < start + 5:
            time.sleep(0.01)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        errors = []
        for future in futures:
            with pytest.raises(urllib.error.HTTPError) as failed:
                future.result(timeout=120)
            errors.append((failed.value.code, failed.value.read().decode()))
    assert server.process.wait(timeout=120) == 1
    assert all(code == 503 and "no rank survives to take the scheduler state from" in body
               for code, body in errors), errors
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"ghostserve-{server.port}")]


