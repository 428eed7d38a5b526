"""Fault campaign: trials of {random rank(s), random decode step, random request mix} against a running
GhostServe server with fault injection enabled. Each trial runs its mix once without a fault (the
reference) and once with a fault injected mid-decode, and compares every output id."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import random
import signal
import time

from ..control import ControlError
from .local_server import Server, eventually

LONG_PROMPT = ([11] * 40 + [(7 * i) % 997 + 3 for i in range(560)], 16)  # 5 chunks at a chunk size of 128


def request_mix(rng: random.Random, requests: int = 8) -> list[tuple[list[int], int]]:
    """Prompts of mixed lengths, some sharing prefixes; 32-64 new tokens each."""
    shared = [rng.randrange(3, 1000) for _ in range(96)]
    mix = []
    for _ in range(requests):
        prefix = shared[: rng.choice((0, 32, 96))]
        suffix = [rng.randrange(3, 1000) for _ in range(rng.choice((4, 20, 60, 150, 300)))]
        mix.append((prefix + suffix, rng.randrange(32, 65)))
    return mix


def unshared_mix(rng: random.Random, requests: int = 8) -> list[tuple[list[int], int]]:
    """Prompts of mixed lengths that share no prefix (each starts with its own token), so no request
    can reuse another's KV from the prefix cache however they arrive; 32-64 new tokens each."""
    return [([3 + i] + [rng.randrange(3, 1000) for _ in range(rng.choice((20, 60, 150, 300)))],
             rng.randrange(32, 65)) for i in range(requests)]


def process_fault_mix() -> list[tuple[list[int], int]]:
    """The mix the process-fault tests share (seven mixed requests and one in chunked prefill): one
    fault-free reference per server serves them all."""
    return request_mix(random.Random(20), requests=7) + [LONG_PROMPT]


def await_warm_standbys(server: Server, count: int, timeout_s: float = 300) -> None:
    """Wait until ``count`` standby processes have finished their imports and are not yet used (the
    supervisor logs each as warm, and each replacement it served as ``standby=True``)."""
    log = server.log
    eventually(lambda: log().count("standby process warm") - log().count("standby=True") >= count or None,
               timeout_s=timeout_s, interval_s=0.2)


def submit_mix(server: Server, mix, pool, first: int = 0) -> list:
    """Every other request is streamed (a stream that misses an output shows it in its last event);
    ``first`` is the index of ``mix[0]`` in the whole mix."""
    return [pool.submit(server.generate, ids, new, stream=(first + i) % 2 == 1)
            for i, (ids, new) in enumerate(mix)]


def generate_mix(server: Server, mix) -> list[list[int]]:
    """Every request of ``mix`` at once; their output ids in order."""
    with concurrent.futures.ThreadPoolExecutor(len(mix)) as pool:
        return [f.result()["output_ids"] for f in submit_mix(server, mix, pool)]


def one_at_a_time(server: Server, mix, cached_half: bool = False) -> list[list[int]]:
    """The output ids of ``mix``, each request alone on an empty prefix cache; with ``cached_half``,
    the first half of its prompt is computed by a request of its own first and then comes from the
    prefix cache."""
    outputs = []
    for ids, new in mix:
        server.flush_cache()
        if cached_half:
            server.generate(ids[: len(ids) // 2], 1)
        outputs.append(server.generate(ids, new)["output_ids"])
    return outputs


def fault_free(server: Server, mix) -> list[list[int]]:
    """The output ids of ``mix`` without a fault, from an empty prefix cache; computed once per server
    and mix (outputs do not depend on batching, so trials that reuse a mix share its reference)."""
    key = repr(mix)
    if key not in server.references:
        server.flush_cache()
        server.references[key] = generate_mix(server, mix)
    return server.references[key]


@dataclasses.dataclass
class Trial:
    seed: int
    lost_ranks: list[int]
    fault_step: int
    running_at_fault: int
    requests: int
    lost_requests: int
    wrong_tokens: int
    recovery: dict
    scrub: dict
    mix: list = dataclasses.field(repr=False, default_factory=list)
    reference: list = dataclasses.field(repr=False, default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost_requests == 0 and self.wrong_tokens == 0


@dataclasses.dataclass
class KillTrial:
    seed: int
    ranks: list[int]
    how: str
    after_steps: int
    running_at_kill: int
    requests: int
    lost_requests: int
    wrong_tokens: int
    restart: dict
    scrub: dict
    errors: list = dataclasses.field(default_factory=list)
    moment: str = ""

    @property
    def ok(self) -> bool:
        return self.lost_requests == 0 and self.wrong_tokens == 0


def run_kill_trial(server: Server, seed: int, ranks=(1,), how: str = "KILL", after_steps: int | None = None,
                   mix=None, late: int = 0, moment: str = "now",
                   second: tuple[int, float] | None = None) -> KillTrial:
    """One process-death trial: the mix once without a fault (the reference), then again while the
    scheduler processes of ``ranks`` end ``after_steps`` steps into it (0: during the first prefill):
    a signal (``KILL``, ``SEGV``, ``TERM``, ``STOP``) sent to their pids from ``status``; or, for ``ERROR``
    or a ``moment`` other than ``now``, the ``kill-rank`` drill; or, for ``HANG``, the ``hang-rank`` drill
    at ``moment`` (``forward``, ``collective``, ``idle``). The last ``late`` requests of the mix are
    sent only after the deaths. ``second`` = (rank, seconds): that rank gets ``kill -9`` so long after
    the first deaths, while they are being replaced."""
    rng = random.Random(seed)
    mix = request_mix(rng) if mix is None else mix
    after_steps = rng.randrange(0, 28) if after_steps is None else after_steps
    reference = fault_free(server, mix)
    server.flush_cache()
    before = server.control("status")["ranks"]
    with concurrent.futures.ThreadPoolExecutor(len(mix)) as pool:
        futures = submit_mix(server, mix[:len(mix) - late], pool)
        while server.control("status")["ranks"][0]["step"] < before[0]["step"] + after_steps:
            time.sleep(0.005)
        running = sum(not f.done() for f in futures)
        if how == "HANG":  # one request for all: a hung rank takes no later one
            server.control("hang-rank", ranks=list(ranks), at=moment)
        for rank in ranks if how != "HANG" else ():
            if how == "ERROR" or moment != "now":
                try:
                    server.control("kill-rank", rank=rank, signal=how, at=moment)
                except ControlError as exc:  # rank 0 may end before its reply is out; checked below
                    if "got no reply" not in str(exc):
                        raise
            else:
                os.kill(before[rank]["pid"], getattr(signal, f"SIG{how}"))
        futures += submit_mix(server, mix[len(mix) - late:], pool, first=len(mix) - late)
        if second is not None:
            time.sleep(second[1])
            os.kill(before[second[0]]["pid"], signal.SIGKILL)
            ranks = [*ranks, second[0]]
        outputs, errors = [], []
        for future in futures:
            try:
                outputs.append(future.result()["output_ids"])
            except Exception as exc:  # a lost request
                outputs.append(None)
                errors.append(repr(exc))
    lost_requests = sum(o is None or len(o) != len(r) for o, r in zip(outputs, reference))
    wrong = sum(a != b for o, r in zip(outputs, reference) if o is not None for a, b in zip(o, r))
    for i, (o, r) in enumerate(zip(outputs, reference)):
        if o is not None and o != r:
            first = next((j for j, (a, b) in enumerate(zip(o, r)) if a != b), min(len(o), len(r)))
            errors.append(f"request {i} ({len(mix[i][0])} prompt tokens, {len(r)} new, {len(o)} received): "
                          f"differs from output token {first} on")
    after = server.control("status")["ranks"]
    for rank in ranks:
        if after[rank]["restarts"] != before[rank]["restarts"] + 1:
            raise RuntimeError(f"rank {rank} was not replaced once: {before[rank]} -> {after[rank]}")
    restart = after[ranks[0]]["last_recovery"]
    label = f"{how}@{moment}" if moment != "now" else how
    return KillTrial(seed, list(ranks), label, after_steps, running, len(mix), lost_requests, wrong, restart,
                     server.control("scrub"), errors)


def run_trial(server: Server, seed: int, ranks: int, lose: int = 1, drills=(),
              recover: bool | None = None, mix=None) -> Trial:
    """One trial. ``drills`` are ``(steps, fn)``: ``fn(server)`` runs once the fault run has taken
    ``steps`` steps, before the fault (e.g. pausing the drain, corrupting parity). ``recover``: whether
    the fault is recovered at once (None: as the server's --ghost-auto-recover says)."""
    rng = random.Random(seed)
    mix = request_mix(rng) if mix is None else mix
    lost = sorted(rng.sample(range(ranks), lose))
    after_steps = rng.randrange(8, 28)
    reference = fault_free(server, mix)
    server.flush_cache()
    with concurrent.futures.ThreadPoolExecutor(len(mix)) as pool:
        start = server.control("status")["ranks"][0]["step"]
        futures = submit_mix(server, mix, pool)
        pending = sorted([*drills, (after_steps, None)], key=lambda d: d[0])
        for steps, drill in pending:
            while server.control("status")["ranks"][0]["step"] < start + steps:
                time.sleep(0.005)
            if drill is not None:
                drill(server)
        running = sum(not f.done() for f in futures)
        reply = server.control("inject-fault", ranks=lost,
                               **({} if recover is None else {"recover": recover}))
        outputs = []
        for future in futures:
            try:
                outputs.append(future.result()["output_ids"])
            except Exception:  # a lost request
                outputs.append(None)
    lost_requests = sum(o is None or len(o) != len(r) for o, r in zip(outputs, reference))
    wrong = sum(a != b for o, r in zip(outputs, reference) if o is not None for a, b in zip(o, r))
    scrub = server.control("scrub")
    return Trial(seed, lost, reply["fault"]["step"], running, len(mix), lost_requests, wrong,
                 reply.get("recovery", {}), scrub, mix, reference)
