"""Recovery with Reed-Solomon m=2 on TP=3 (CPU, one core per rank, shared): two ranks lost at once, on
the bundled grouped-query-attention model (24 attention heads over 12 KV heads)."""

from __future__ import annotations

import random

import pytest

from ghostserve_sglang.testing.campaign import generate_mix, request_mix, run_trial

pytestmark = pytest.mark.shared_server("rs3")


@pytest.fixture
def server(shared_server):
    return shared_server


def test_fault_free_reruns_on_three_ranks_are_identical(server):
    """Needs the rank-ordered all-reduce on CPU (cpu_compat): with gloo's, reruns of this mix differed."""
    mix = request_mix(random.Random(2))
    runs = []
    for _ in range(3):
        server.flush_cache()
        runs.append(generate_mix(server, mix))
    assert runs[0] == runs[1] == runs[2]


def test_two_ranks_lost_at_once_are_rebuilt(server):
    for seed in (1, 2, 3):
        trial = run_trial(server, seed, ranks=3, lose=2)
        assert trial.running_at_fault > 0 and trial.ok, trial
        assert trial.recovery["outcome"] == "rebuilt", trial.recovery
        assert trial.scrub["mismatching"] == 0


def test_more_losses_than_parity_are_recomputed_never_wrong(server):
    trial = run_trial(server, seed=9, ranks=3, lose=3)
    assert trial.ok, trial
    assert trial.recovery["outcome"] == "recomputed" and trial.recovery["slots_rebuilt"] == 0
    assert trial.scrub["mismatching"] == 0


def test_injected_fault_destroys_kv_until_recover_rebuilds_it(server):
    mix = request_mix(random.Random(7))
    server.flush_cache()
    first = generate_mix(server, mix)
    server.control("inject-fault", ranks=[0, 2], recover=False)
    broken = server.control("scrub")
    assert broken["mismatching"] > 0.9 * broken["live_slots"]  # the cached prefixes' KV is garbage
    recovery = server.control("recover")
    assert recovery["outcome"] == "rebuilt" and recovery["lost_ranks"] == [0, 2]
    assert server.control("scrub")["mismatching"] == 0
    again = generate_mix(server, mix)  # reuses the rebuilt cache
    assert again == first
