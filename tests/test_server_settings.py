"""Servers started with settings of their own: a staging ring and a capture queue far smaller than the
load (1 MiB) while the drain is paused; and protection by plain ``python -m sglang.launch_server`` with
GHOSTSERVE_* variables set (replicate: a full host copy of the rank's KV)."""

from __future__ import annotations

import concurrent.futures
import random
import signal
import time

import pytest

from ghostserve_sglang import control
from ghostserve_sglang.testing.campaign import generate_mix, request_mix, run_trial
from ghostserve_sglang.testing.local_server import eventually, launched

PLAIN_REPLICATE = {"GHOSTSERVE_CODE": "replicate", "GHOSTSERVE_STRICT": "1",
                   "GHOSTSERVE_ENABLE_FAULT_INJECTION": "1"}


def all_dropped(ranks: list[dict]) -> list[dict]:
    assert all(rank["drops"] > 0 for rank in ranks), ranks
    return ranks


def test_a_paused_drain_under_load_never_blocks_serving_control_or_a_stop(tmp_path):
    # A 1 MiB staging ring fills within the first steps of this load while the drain is paused; with
    # the default --ghost-on-full=block the steps must still go on (dropping protection, counted), and
    # status, drain resume and SIGTERM must get through. A 1 MiB capture queue also makes the long
    # prefills be captured in parts.
    ghost = ["--ghost-code", "xor", "--ghost-staging-mib", "1", "--ghost-capture-queue-mib", "1",
             "--ghost-enable-fault-injection", "1"]
    with launched(2, ghost, log_dir=str(tmp_path)) as server:
        call = lambda op, **args: control.call(str(server.port), op, args, timeout_s=30)  # noqa: E731
        assert call("drain", pause=True)["paused"] is True
        rng = random.Random(4)
        load = [([rng.randrange(3, 1000) for _ in range(300)], 120) for _ in range(8)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(server.generate, *request, 300) for request in load]
            # the ring filled and protection was dropped, on every rank, while requests still run
            status = eventually(lambda: all_dropped(call("status")["ranks"]), timeout_s=120, interval_s=0.5)
            assert not all(future.done() for future in futures)
            paused_scrub = call("scrub")  # waits for no paused drain
            assert call("drain", pause=False)["paused"] is False
            outputs = [future.result(timeout=300) for future in futures]
        assert all(len(output["output_ids"]) == 120 for output in outputs)
        assert all(rank["drops"] > 0 for rank in status)
        assert paused_scrub["not_durable"] > 0  # what the paused drain held or dropped
        assert "capture_part_slots=170" in server.log()  # 1 MiB / (4 x 1536 bytes a slot)
        server.flush_cache()
        generate_mix(server, load[:4])  # a running drain protects every write again
        scrub = call("scrub")
        assert (scrub["mismatching"], scrub["not_durable"]) == (0, 0) and scrub["matching"] > 0
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=60)
        assert time.monotonic() - started < 30


@pytest.fixture(scope="module")
def plain_replicate(tmp_path_factory):
    with launched(1, [], plain_sglang_env=PLAIN_REPLICATE,
                  log_dir=str(tmp_path_factory.mktemp("plain-replicate"))) as server:
        yield server


def test_plain_sglang_launch_server_with_environment_replicates(plain_replicate):
    generate_mix(plain_replicate, request_mix(random.Random(2))[:5])
    scrub = plain_replicate.control("scrub")
    assert scrub["mismatching"] == 0 and scrub["not_durable"] == 0
    assert scrub["matching"] == scrub["live_slots"] > 0
    assert scrub["parity_to_kv"] == 1.0  # a full copy


def test_replicate_restores_a_lost_rank_from_its_host_copy(plain_replicate):
    trial = run_trial(plain_replicate, seed=5, ranks=1)
    assert trial.ok and trial.running_at_fault > 0, trial
    assert trial.recovery["outcome"] == "rebuilt" and trial.recovery["slots_rebuilt"] > 0
    assert trial.scrub["mismatching"] == 0


def test_a_long_forward_below_the_hang_timeout_is_work_not_a_hang(tmp_path):
    """A hang timeout below one long legitimate forward (a 7,000-token prompt prefilled in one forward,
    chunked prefill off; about 0.5 s on a 2-core machine): every rank computes, nobody waits long in a
    collective, no rank is ended."""
    timeout = 0.2
    # No standby: on 2 cores its imports would compete with the ranks, and one rank descheduled for
    # longer than 0.2 s while the other waits in an all-reduce is a stall by this rule.
    ghost = ["--ghost-code", "xor", "--ghost-hang-timeout-seconds", str(timeout), "--ghost-standby", "0"]
    with launched(2, ghost, ["--chunked-prefill-size", "-1"], log_dir=str(tmp_path)) as server:
        pids = [r["pid"] for r in server.control("status")["ranks"]]
        prompt = [(13 * i) % 997 + 3 for i in range(7000)]
        started = time.monotonic()
        reply = server.generate(prompt, 1)
        forward_seconds = time.monotonic() - started
        assert len(reply["output_ids"]) == 1
        assert forward_seconds > 2 * timeout, forward_seconds  # the forward outlasted the timeout
        assert [r["pid"] for r in server.control("status")["ranks"]] == pids
        assert "rank hung" not in server.log()
