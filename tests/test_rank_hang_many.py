"""Hung ranks on a real TP=3 server (CPU, rs m=2), made with the ``hang-rank`` drill: a rank blocks for
ever in its forward (a kernel that never returns), at an all-reduce inside the forward before it hands
its part over (its peers wait in the collective), or at the top of its loop while the server is idle;
and two ranks at once. Each is found from its progress stamp, ended and replaced, and every request
finishes with the output ids of a run without the fault. (Ranks that have all called into a collective
that never completes look alike; that case is decided by policy, tested in test_liveness.py.)"""

from __future__ import annotations

import pytest

from ghostserve_sglang.testing.campaign import process_fault_mix, run_kill_trial

pytestmark = pytest.mark.shared_server("rs3")


@pytest.fixture
def server(shared_server):
    return shared_server


@pytest.mark.parametrize("ranks, at, after_steps", [
    ([1], "forward", 10),
    ([1, 2], "forward", 12),  # two at once: m=2 covers both
    ([2], "collective", 8),  # mid-forward: its peers wait in the all-reduce it never joins
])
def test_a_rank_hung_mid_decode_is_ended_and_replaced(server, ranks, at, after_steps):
    before = server.control("status")["ranks"]
    log_before = len(server.log())
    trial = run_kill_trial(server, 50, ranks=ranks, how="HANG", moment=at, after_steps=after_steps,
                           mix=process_fault_mix())
    assert trial.running_at_kill >= 4, trial
    assert trial.lost_requests == 0 and trial.wrong_tokens == 0, trial
    assert set(ranks) <= set(trial.restart["lost_ranks"]), trial.restart
    assert trial.scrub["mismatching"] == 0 and trial.scrub["not_durable"] == 0, trial.scrub
    after = server.control("status")["ranks"]
    assert all(after[r]["pid"] != before[r]["pid"] for r in ranks)
    log = server.log()[log_before:]
    assert all(f"pid={before[r]['pid']}" in log for r in ranks) and "rank hung" in log


def test_rank_0_hung_while_idle_is_replaced_and_the_next_requests_served(server):
    """Rank 0 stops at the top of its loop with nothing to do; the requests sent after it reach its
    replacement (the main process sends them again), and are answered with the fault-free tokens."""
    before = server.control("status")["ranks"]
    mix = process_fault_mix()
    trial = run_kill_trial(server, 51, ranks=[0], how="HANG", moment="idle", after_steps=0, mix=mix,
                           late=len(mix))  # every request is sent after the rank hung
    assert trial.running_at_kill == 0 and trial.lost_requests == 0 and trial.wrong_tokens == 0, trial
    assert trial.restart["lost_ranks"] == [0] and trial.restart["restart"], trial.restart
    assert server.control("status")["ranks"][0]["pid"] != before[0]["pid"]
