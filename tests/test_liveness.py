"""Progress stamps and the judgement of a hung rank (``restart.liveness``), without a server: the
stamp table in shared memory as two processes see it, and the rule that names the culprit."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from ghostserve_sglang.sglang.restart import liveness
from ghostserve_sglang.sglang.restart.liveness import (
    COLLECTIVE,
    FORWARD,
    HOLDING,
    OUTPUT,
    RECEIVING,
    Stamp,
    judge,
)

TIMEOUT = 10.0


def stamp(rank: int, phase: int, age: float) -> Stamp:
    return Stamp(rank, 1, phase, age, 1000 + rank)


@pytest.fixture
def instance():
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    liveness.remove(name)


def test_a_rank_stamps_and_another_process_reads_it(instance):
    writer = liveness.Stamps(instance, rank=1)
    writer.next_iteration()
    writer.enter(FORWARD)
    code = (f"from ghostserve_sglang.sglang.restart import liveness; "
            f"s = liveness.read({instance!r}, [0, 1])[1]; "
            "print(s.iteration, s.phase, s.pid, round(s.age, 1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    iteration, phase, pid, age = out.split()
    assert (int(iteration), int(phase), int(pid)) == (1, FORWARD, writer.row[liveness.PID])
    assert 0 <= float(age) < 5
    assert liveness.read("no-such-instance", [0, 1]) is None


def test_progress_is_no_hang():
    # every rank busy in compute (a long prefill): nobody waits, whatever the age
    assert judge([stamp(0, FORWARD, 60), stamp(1, FORWARD, 60)], TIMEOUT).hung == []
    # a short wait in a collective is a step
    assert judge([stamp(0, RECEIVING, 2), stamp(1, OUTPUT, 2)], TIMEOUT).hung == []
    # holding for a replacement is the death path's business
    assert judge([stamp(0, HOLDING, 60), stamp(1, HOLDING, 60)], TIMEOUT).hung == []


def test_the_rank_that_is_not_waiting_is_the_culprit():
    verdict = judge([stamp(0, RECEIVING, 11), stamp(1, OUTPUT, 11.5), stamp(2, COLLECTIVE, 11)], TIMEOUT)
    assert verdict.hung == [1] and verdict.stalled_seconds == 11
    # the victims waiting in a collective are never ended, however old
    assert judge([stamp(0, COLLECTIVE, 30), stamp(1, FORWARD, 12)], TIMEOUT).hung == [1]


def test_a_stopped_process_is_the_culprit_even_inside_a_collective():
    stamps = [stamp(0, RECEIVING, 12), stamp(1, RECEIVING, 12.5)]
    assert judge(stamps, TIMEOUT, stopped={0}).hung == [0]


def test_when_the_culprit_cannot_be_told_the_oldest_stamp_is_ended():
    verdict = judge([stamp(0, RECEIVING, 12), stamp(1, RECEIVING, 14), stamp(2, COLLECTIVE, 11)], TIMEOUT)
    assert verdict.hung == [1] and "oldest" in verdict.reason
