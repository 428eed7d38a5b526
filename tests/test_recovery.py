"""Recovery on a real SGLang server (TP=2, xor, CPU): a rank loses its KV mid-decode and every request
still finishes with the fault-free run's tokens."""

from __future__ import annotations

import pytest

from ghostserve_sglang.testing.campaign import run_trial

pytestmark = pytest.mark.shared_server("xor2")


@pytest.fixture
def server(shared_server):
    return shared_server


def test_random_faults_mid_decode_lose_no_request_and_no_token(server):
    trials = [run_trial(server, seed, ranks=2) for seed in range(10)]
    for trial in trials:
        assert trial.running_at_fault > 0, trial  # the fault hit while requests were decoding
        assert trial.ok, trial
        assert trial.recovery["outcome"] == "rebuilt" and trial.recovery["slots_rebuilt"] > 0, trial
        assert trial.scrub["mismatching"] == 0 and trial.scrub["not_durable"] == 0, trial
    assert {tuple(t.lost_ranks) for t in trials} == {(0,), (1,)}


def test_fault_before_the_drain_caught_up_recomputes_the_unprotected_suffix(server):
    def pause_drain(s):
        s.control("drain", pause=True)

    trial = run_trial(server, seed=101, ranks=2, drills=[(3, pause_drain)])
    recovery = trial.recovery
    assert trial.ok and trial.running_at_fault > 0, trial
    assert recovery["outcome"] == "rebuilt_and_recomputed", recovery
    assert recovery["slots_rebuilt"] > 0 and recovery["slots_recomputed"] > 0
    assert recovery["requests_retracted"] > 0
    assert trial.scrub["mismatching"] == 0 and trial.scrub["not_durable"] == 0


def test_corrupted_parity_is_caught_and_those_slots_recomputed(server):
    corrupted = []

    def corrupt(s):
        corrupted.extend(s.control("corrupt-parity", rank=0, slots=5)["slots"])

    trial = run_trial(server, seed=202, ranks=2, drills=[(4, corrupt)])
    recovery = trial.recovery
    assert len(corrupted) == 5
    assert trial.ok and trial.running_at_fault > 0, trial
    assert recovery["checksum_failures"] == 5 and recovery["slots_recomputed"] >= 5, recovery
    assert trial.scrub["mismatching"] == 0


def test_cli_injects_and_recovers(server):
    import json

    server.generate(list(range(3, 300)), 8)  # something cached to lose
    done = server.ghostserve("--json", "inject-fault", "--rank", "0")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["fault"]["lost_ranks"] == [0] and reply["recovery"]["outcome"] == "rebuilt"
    assert reply["recovery"]["slots_rebuilt"] >= 297
    bad = server.ghostserve("recover", "--rank", "7")
    assert bad.returncode == 2 and "ranks=[7] is not allowed" in bad.stderr


