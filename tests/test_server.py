"""GhostServe on a real SGLang server (bundled tiny Llama, CPU, TP=2): every KV write is covered by
parity, the scrub proves it, and SGLang's output is unchanged."""

from __future__ import annotations

import concurrent.futures
import random
import signal
import time

import pytest

from ghostserve_sglang import control
from ghostserve_sglang.testing.local_server import launched

CHUNK = 128  # --chunked-prefill-size: the long prompts below are prefilled in several chunks
PROMPTS = [[(7 * i + 3 * j) % 1000 + 3 for j in range(n)] for i, n in enumerate((5, 40, 17, 90))]


def mixed_requests(seed: int) -> list[tuple[list[int], int]]:
    """Prompts of mixed lengths sharing prefixes (radix hits), two longer than a prefill chunk."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, 1000) for _ in range(96)]
    requests = []
    for _ in range(10):
        suffix = [rng.randrange(3, 1000) for _ in range(rng.choice((3, 30, 150, 400)))]
        prefix = shared[: rng.choice((0, 48, 96))]
        requests.append((prefix + suffix, rng.randrange(4, 24)))
    requests.append(([rng.randrange(3, 1000) for _ in range(3 * CHUNK + 5)], 8))
    return requests


def run_concurrently(server, requests) -> list[dict]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda r: server.generate(*r), requests))


@pytest.fixture(scope="module")
def xor_server(tmp_path_factory):
    with launched(2, ["--ghost-code", "xor", "--ghost-strict", "1"], ["--chunked-prefill-size", str(CHUNK)],
                  log_dir=str(tmp_path_factory.mktemp("xor"))) as server:
        yield server


@pytest.fixture(scope="module")
def unprotected_outputs(tmp_path_factory):
    with launched(2, ["--ghost-code", "off"], ["--chunked-prefill-size", str(CHUNK)],
                  log_dir=str(tmp_path_factory.mktemp("off"))) as server:
        return [server.generate(p, 16)["output_ids"] for p in PROMPTS]


def test_every_live_slot_is_protected_after_concurrent_mixed_requests(xor_server):
    first = run_concurrently(xor_server, mixed_requests(1))
    again = run_concurrently(xor_server, mixed_requests(1)[:6])  # the same prompts: radix hits
    assert all(len(r["output_ids"]) == r["meta_info"]["completion_tokens"] for r in first + again)
    assert sum(r["meta_info"]["cached_tokens"] for r in again) > 0
    scrub = xor_server.control("scrub")
    assert scrub["live_slots"] > 3 * CHUNK
    assert scrub["mismatching"] == 0 and scrub["not_durable"] == 0 and scrub["corrupt"] == 0
    assert scrub["matching"] == scrub["live_slots"]
    assert scrub["parity_to_kv"] == 0.5  # xor over 2 ranks: m/N of the KV bytes


def test_status_shows_each_rank_caught_up(xor_server):
    xor_server.generate(PROMPTS[1], 8)
    xor_server.control("scrub")  # waits for the drain
    status = xor_server.control("status")
    ranks = status["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["code"] == "xor" and r["step"] > 0
        assert r["durable_watermark"] == r["step"] and r["lag_steps"] == 0
        assert r["protected_slots"] == r["live_slots"] > 0
        assert r["parity_bytes_in_use"] >= r["protected_slots"] * r["record_bytes"]
        assert r["errors"] == 0 and r["drops"] == 0
    assert ranks[0]["step"] == ranks[1]["step"]
    assert "protection started" in xor_server.log()


def test_human_readable_cli_output(xor_server):
    status = xor_server.ghostserve("status")
    assert status.returncode == 0, status.stderr
    assert "durable_watermark" in status.stdout and len(status.stdout.splitlines()) == 4
    scrub = xor_server.ghostserve("scrub")
    assert scrub.returncode == 0 and " 0 mismatching" in scrub.stdout


def test_same_output_ids_with_ghostserve_on_and_off(xor_server, unprotected_outputs):
    protected = [xor_server.generate(p, 16)["output_ids"] for p in PROMPTS]
    assert protected == unprotected_outputs


def test_freed_slots_lose_their_parity(xor_server):
    xor_server.generate(PROMPTS[3], 8)
    xor_server.control("scrub")
    before = xor_server.control("status")["ranks"][0]
    assert before["protected_slots"] > 0
    xor_server.post("/flush_cache")  # frees every cached slot
    after = xor_server.control("status")["ranks"]
    assert all(r["live_slots"] == 0 and r["parity_bytes_in_use"] == 0 for r in after)


def test_plain_sglang_launch_server_with_environment_replicates(tmp_path):
    env = {"GHOSTSERVE_CODE": "replicate", "GHOSTSERVE_STRICT": "1"}
    with launched(1, [], plain_sglang_env=env, log_dir=str(tmp_path)) as server:
        run_concurrently(server, mixed_requests(2)[:5])
        scrub = server.control("scrub")
        assert scrub["mismatching"] == 0 and scrub["not_durable"] == 0
        assert scrub["matching"] == scrub["live_slots"] > 0
        assert scrub["parity_to_kv"] == 1.0  # a full copy


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
            time.sleep(10)
            status = call("status")["ranks"]
            paused_scrub = call("scrub")  # waits for no paused drain
            assert call("drain", pause=False)["paused"] is False
            outputs = [future.result(timeout=300) for future in futures]
        assert all(len(output["output_ids"]) == 120 for output in outputs)
        assert all(rank["drops"] > 0 for rank in status)  # the ring filled and protection was dropped
        assert paused_scrub["not_durable"] > 0  # what the paused drain held or dropped
        assert "capture_part_slots=170" in server.log()  # 1 MiB / (4 x 1536 bytes a slot)
        server.post("/flush_cache")
        run_concurrently(server, load[:4])  # a running drain protects every write again
        scrub = call("scrub")
        assert (scrub["mismatching"], scrub["not_durable"]) == (0, 0) and scrub["matching"] > 0
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=60)
        assert time.monotonic() - started < 30
