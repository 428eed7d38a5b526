"""The same-host column exchange (shared-memory mailboxes, futex waits) between real processes: every
rank receives exactly what each peer sent it, or the XOR of it (xor parity's reduce-scatter), in rounds
smaller and larger than its buffers (rows of 5 bytes: not whole 8-byte words), posted early by one
rank and in the course of the call by the others, again after
a restart at a new epoch; a peer's death ends a waiting exchange with an error the protector counts as a
lost peer, and its mailbox files are removed."""

from __future__ import annotations

import multiprocessing
import os
import time
import uuid

import pytest
import torch

from ghostserve_sglang.sglang.protection import exchange
from ghostserve_sglang.sglang.protection.collectives import peer_lost

RANKS = 3


def sent(rank: int, to: int, n: int, seed: int) -> torch.Tensor:
    """What ``rank`` sends ``to`` in a call of ``n`` rows: a pattern no other pair or call repeats."""
    generator = torch.Generator().manual_seed(seed * 1000 + rank * 10 + to)
    return torch.randint(0, 256, (n, 5), dtype=torch.uint8, generator=generator)


def rank_main(instance: str, rank: int, results, barrier, dies: bool) -> None:
    ex = exchange.LocalExchange(instance, rank, RANKS, capacity=RANKS * 64, timeout_s=30)
    results.put(("created", rank))
    mailboxes = [exchange.mailbox_path(instance, r) for r in range(RANKS)]
    while not all(os.path.exists(path) for path in mailboxes):  # the protector's barrier, here
        time.sleep(0.01)
    ok = True
    for epoch in (0, 7):  # a start, then a restart (as after a rejoin, with no exchange in flight)
        barrier.wait()
        ex.start(epoch)
        for seed, n in enumerate((1, 0, 37, 100, 2)):  # windows of 64 bytes: 0, 1, 3 and 8 rounds
            send = torch.stack([sent(rank, to, n, seed + epoch) for to in range(RANKS)])
            posted = None
            if rank == seed % RANKS:  # one rank posts its round early (as its scheduler thread would)
                posted = ex.post_early(send)
                fits = 0 < send.nbytes <= ex.capacity  # one round, not empty
                ok &= (posted is not None) == fits and ex.post_early(send) is None  # one round in flight
            got = ex.all_to_all(send, posted)
            ok &= all(torch.equal(got[i], sent(i, rank, n, seed + epoch)) for i in range(RANKS))
            xored = sent(0, rank, n, seed + epoch)
            for i in range(1, RANKS):
                xored ^= sent(i, rank, n, seed + epoch)
            ok &= torch.equal(ex.reduce_scatter_xor(send), xored)  # xor parity of this rank's columns
    waited = ex.wait_seconds
    if rank == 2:
        time.sleep(0.3)  # late to one round: the others wait for it, and count the wait
    ex.all_to_all(torch.zeros((RANKS, 4), dtype=torch.uint8))
    results.put(("exchanged", rank, ok, ex.wait_seconds - waited))
    if dies:
        results.close()
        results.join_thread()  # its last message sent
        os._exit(0)  # without a word to its peers: they find out from its pid
    started = time.monotonic()
    try:
        ex.all_to_all(torch.zeros((RANKS, 4), dtype=torch.uint8))
        results.put(("after death", rank, "no error", 0.0))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(("after death", rank, f"{peer_lost(exc)} {exc}", time.monotonic() - started))
    ex.close()


def test_ranks_receive_what_each_peer_sent_and_a_dead_peer_ends_the_wait():
    instance = f"t{uuid.uuid4().hex[:10]}"
    context = multiprocessing.get_context("spawn")
    results, barrier = context.Queue(), context.Barrier(RANKS)
    processes = [context.Process(target=rank_main, args=(instance, r, results, barrier, r == 2))
                 for r in range(RANKS)]
    for process in processes:
        process.start()
    try:
        messages = [results.get(timeout=120) for _ in range(2 * RANKS + 2)]
    finally:
        for process in processes:
            process.join(timeout=30)
    assert sorted(m[1] for m in messages if m[0] == "exchanged") == [0, 1, 2]
    assert all(m[2] for m in messages if m[0] == "exchanged"), messages
    assert all(m[3] >= 0.25 for m in messages if m[0] == "exchanged" and m[1] != 2), messages
    after = [m for m in messages if m[0] == "after death"]
    assert len(after) == 2 and all(m[2].startswith("True Connection closed: rank 2") for m in after), after
    assert all(m[3] < 5 for m in after), after  # found out within seconds, not at the 30 s timeout
    exchange.remove(instance)
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(f"ghostserve-{instance}-")]


def test_an_exchange_used_before_its_start_is_refused(tmp_path):
    ex = exchange.LocalExchange(f"t{uuid.uuid4().hex[:10]}", 0, 2, capacity=128, timeout_s=1)
    try:
        with pytest.raises(RuntimeError, match="before it started"):
            ex.all_to_all(torch.zeros((2, 3), dtype=torch.uint8))
    finally:
        ex.close()
