"""The restart policy as data (``restart/policy.py``): the intensity limit and the batch that kills."""

from __future__ import annotations

import pytest

from ghostserve_sglang.settings import Settings, SettingsError
from ghostserve_sglang.sglang.restart.policy import RestartPolicy, Suspects, implicated


def test_a_rank_is_replaced_up_to_the_limit_within_the_period():
    policy = RestartPolicy(max_restarts=2, period_seconds=60)
    assert policy.refusal(1, [], now=100) is None
    assert policy.refusal(1, [50.0], now=100) is None
    refused = policy.refusal(1, [50.0, 90.0], now=100)
    assert "TP rank 1 was already replaced 2 time(s) within 60 s" in refused
    assert "--ghost-max-restarts=2" in refused
    assert policy.refusal(1, [30.0, 90.0], now=100) is None  # the first is older than the period
    assert RestartPolicy(max_restarts=0).refusal(1, [99.0] * 50, now=100) is None  # 0: no limit


def test_a_batch_is_the_cause_only_when_it_kills_the_same_rank_again():
    first = Suspects((1,), frozenset({"a", "b", "c"}))
    assert implicated(None, [1], {"a", "b"}) == []
    assert implicated(first, [1], {"b", "c", "d"}) == ["b", "c"]  # d joined the batch after the first death
    assert implicated(first, [0], {"a", "b"}) == []  # another rank: not the same fault
    assert implicated(first, [1], {"x"}) == []


@pytest.mark.parametrize("values, message", [
    ({"max_restarts": "-1"}, "--ghost-max-restarts=-1 is not allowed; it must be >= 0"),
    ({"restart_period_seconds": "0"}, "--ghost-restart-period-seconds=0.0 is not allowed; it must be > 0"),
])
def test_bad_policy_values_are_refused_in_one_line(values, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        Settings.from_values(values)
