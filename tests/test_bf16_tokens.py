"""bfloat16 on CPU, for what it is (README, "Same tokens as a fault-free run"): a KV cache rebuilt from
parity is bit-exact and every token stays the same; what changes tokens is how SGLang computed a token's
KV. A prompt whose first half comes from the prefix cache continues differently from the same prompt
computed at once, with no fault at all (PyTorch's CPU attention gives a prefill's rows other bits than
the same rows inside a longer prefill, and bfloat16 rounding makes the difference large enough to change
a greedy token); a rank's death re-runs the batch it interrupted from the prefix cache, so requests
finish, but not always with the tokens of a run without the fault."""

from __future__ import annotations

import random

import pytest

from ghostserve_sglang.testing.campaign import (
    one_at_a_time,
    request_mix,
    run_kill_trial,
    run_trial,
    unshared_mix,
)

pytestmark = pytest.mark.shared_server("bf16")


@pytest.fixture
def server(shared_server):
    return shared_server


def test_bf16_tokens_follow_how_the_prompt_was_split_with_no_fault(server):
    mix = request_mix(random.Random(11), requests=10)
    alone = one_at_a_time(server, mix, cached_half=False)
    assert one_at_a_time(server, mix, cached_half=False) == alone  # the same computation: the same tokens
    split = one_at_a_time(server, mix, cached_half=True)
    differ = [i for i, (a, b) in enumerate(zip(alone, split)) if a != b]
    print(f"with half of each prompt from the prefix cache, requests {differ} of {len(mix)} continue "
          "differently")
    assert differ, "bfloat16 tokens no longer depend on the prefix cache: update the README"


def test_bf16_kv_rebuilt_from_parity_keeps_every_token(server):
    for seed in (4, 5):
        trial = run_trial(server, seed, ranks=2, mix=unshared_mix(random.Random(seed)))
        assert trial.running_at_fault > 0
        assert trial.recovery["outcome"] == "rebuilt" and trial.recovery["slots_recomputed"] == 0
        assert trial.recovery["slots_rebuilt"] > 0 and trial.scrub["mismatching"] == 0
        assert trial.lost_requests == 0 and trial.wrong_tokens == 0, trial


def test_bf16_rank_death_loses_no_request(server):
    trial = run_kill_trial(server, seed=40, ranks=[1], after_steps=12, mix=unshared_mix(random.Random(40)))
    print(f"after a death in bfloat16, {trial.wrong_tokens} output tokens differ from the fault-free run")
    assert trial.running_at_kill > 0 and trial.restart["slots_rebuilt"] > 0
    assert trial.lost_requests == 0 and trial.scrub["mismatching"] == 0, trial
