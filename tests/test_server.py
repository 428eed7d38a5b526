"""GhostServe on a real SGLang server (bundled tiny Llama, CPU, TP=2): every KV write is covered by
parity, the scrub proves it, and SGLang's output is unchanged."""

from __future__ import annotations

import concurrent.futures
import os
import random

import pytest

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


pytestmark = pytest.mark.shared_server("xor2")


@pytest.fixture
def xor_server(shared_server):
    return shared_server


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


def test_ranks_on_one_host_exchange_columns_through_shared_memory(xor_server):
    """Not over gloo: each rank's mailbox is in /dev/shm while the server runs."""
    instance = xor_server.control("status")["instance_id"]
    assert [r["exchange"] for r in xor_server.control("status")["ranks"]] == ["shared memory"] * 2
    for rank in (0, 1):
        assert os.path.exists(f"/dev/shm/ghostserve-{instance}-exchange{rank}")


def test_human_readable_cli_output(xor_server):
    status = xor_server.ghostserve("status")
    assert status.returncode == 0, status.stderr
    assert "durable_watermark" in status.stdout and len(status.stdout.splitlines()) == 4
    scrub = xor_server.ghostserve("scrub")
    assert scrub.returncode == 0 and " 0 mismatching" in scrub.stdout


def test_freed_slots_lose_their_parity(xor_server):
    xor_server.generate(PROMPTS[3], 8)
    xor_server.control("scrub")
    before = xor_server.control("status")["ranks"][0]
    assert before["protected_slots"] > 0
    xor_server.flush_cache()  # frees every cached slot
    after = xor_server.control("status")["ranks"]
    assert all(r["live_slots"] == 0 and r["parity_bytes_in_use"] == 0 for r in after)


@pytest.mark.shared_server_last
def test_same_output_ids_with_ghostserve_on_and_off(xor_server, shared_servers):
    protected = [xor_server.generate(p, 16)["output_ids"] for p in PROMPTS]
    unprotected = shared_servers.get("off2")  # the same server with --ghost-code off
    assert protected == [unprotected.generate(p, 16)["output_ids"] for p in PROMPTS]
