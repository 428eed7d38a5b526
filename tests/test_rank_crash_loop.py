"""A rank that keeps dying on a real TP=2 server (CPU, xor): the restart policy (``restart/policy.py``).
A batch whose forward ends rank 1, and ends its replacement again when it runs after the replacement
(``kill-rank --at batch``: a request that crashes the model every time), has its requests answered with
an error naming the cause; the server serves on and every other request gets the tokens of a run
without the fault. Past ``--ghost-max-restarts`` replacements within the period, the next death is a
clean fail stop instead of another replacement."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
import urllib.error

import pytest

from ghostserve_sglang.testing.campaign import fault_free, process_fault_mix, submit_mix
from ghostserve_sglang.testing.local_server import eventually

CAUSE = "died in the forward of a batch holding this request"

pytestmark = pytest.mark.shared_server("metrics2")  # xor, --ghost-max-restarts 2


@pytest.fixture
def server(shared_server):
    return shared_server


def outcome(future):
    """The output ids, or the error the client got (an HTTP error; a stream's last event, aborted)."""
    try:
        reply = future.result(timeout=600)
    except urllib.error.HTTPError as exc:
        return f"http {exc.code}: {exc.read().decode()[:500]}"
    finish = reply["meta_info"].get("finish_reason") or {}
    if finish.get("type") == "abort":
        return f"stream aborted, status {finish.get('status_code')}: {finish.get('message')}"
    return reply["output_ids"]


def restarts(server) -> list[int]:
    return [r["restarts"] for r in server.control("status")["ranks"]]


def assert_restarts(server, rank: int, count: int) -> bool:
    assert restarts(server)[rank] == count
    return True


def test_a_batch_that_kills_a_rank_twice_is_ended_and_the_server_serves_on(server):
    mix = process_fault_mix()
    reference = fault_free(server, mix)
    server.flush_cache()
    first, late = mix[:5], mix[5:]
    before = restarts(server)
    start = server.control("status")["ranks"][0]["step"]
    with concurrent.futures.ThreadPoolExecutor(len(mix)) as pool:
        futures = submit_mix(server, first, pool)
        while server.control("status")["ranks"][0]["step"] < start + 6:
            time.sleep(0.005)
        server.control("kill-rank", rank=1, signal="KILL", at="batch")
        eventually(lambda: assert_restarts(server, 1, before[1] + 2), timeout_s=300, interval_s=0.5)
        futures += submit_mix(server, late, pool, first=len(first))  # after the second death
        outputs = [outcome(f) for f in futures]
    ended = [i for i, o in enumerate(outputs) if isinstance(o, str)]
    assert ended, outputs
    assert all(i < len(first) and CAUSE in outputs[i] for i in ended), [outputs[i] for i in ended]
    assert all(outputs[i] == reference[i] for i in range(len(mix)) if i not in ended)
    assert server.process.poll() is None and restarts(server)[1] == before[1] + 2
    log = server.log()
    assert "requests ended: their batch killed a rank twice" in log and "fail stop" not in log
    again = server.generate(*mix[0])  # a request of the batch, sent again, is served: the rank died no more
    assert again["output_ids"] == reference[0]


@pytest.mark.shared_server_last
def test_a_death_past_the_restart_limit_fails_stop(server):
    """Rank 1 was replaced twice (the limit) within the period: its next death stops the server, and the
    request in flight gets an error naming the limit."""
    assert restarts(server)[1] == 2
    pid = server.control("status")["ranks"][1]["pid"]
    ids, new = process_fault_mix()[1]
    start = server.control("status")["ranks"][0]["step"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(server.generate, ids, 400)
        while server.control("status")["ranks"][0]["step"] < start + 3:
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
        error = outcome(future)
    assert "503" in error and "--ghost-max-restarts=2" in error, error
    assert server.process.wait(timeout=60) == 1
    assert "it is not replaced again" in server.log()
