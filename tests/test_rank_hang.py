"""A rank's scheduler process hangs on a real TP=2 server (CPU): ``kill -STOP`` of its pid at a random
moment mid-decode, with requests in chunked prefill and decode. The supervisor sees its progress stamp
stand still while the other rank waits for it in a collective, ends it within
``--ghost-hang-timeout-seconds`` (5 s here) plus a second, and the death path replaces it: every
request finishes with the output ids of a run without the fault, the scrub is clean, and ``/health``
answers 503 from the detection until the replacement joined, 200 after."""

from __future__ import annotations

import random
import threading
import urllib.error
import urllib.request

import pytest

from ghostserve_sglang.testing.campaign import process_fault_mix, run_kill_trial

HANG_TIMEOUT = 5.0  # --ghost-hang-timeout-seconds of the shared server

pytestmark = pytest.mark.shared_server("xor2")


@pytest.fixture
def server(shared_server):
    return shared_server


class HealthWatch:
    """``/health`` asked every 0.25 s in the background, whether or not earlier asks have answered (one
    stalled with the server does not hide a 503 meanwhile): the status codes seen, in order."""

    def __init__(self, url: str) -> None:
        self.url, self.codes, self.stop = url, [], threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.probes: list[threading.Thread] = []

    def _poll(self) -> None:
        while not self.stop.wait(0.25):
            self.probes.append(threading.Thread(target=self._probe, daemon=True))
            self.probes[-1].start()

    def _probe(self) -> None:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                self.codes.append(response.status)
        except urllib.error.HTTPError as exc:
            self.codes.append(exc.code)
        except OSError:
            self.codes.append(None)  # no answer within 2 s

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        for probe in self.probes:
            probe.join()


@pytest.mark.parametrize("rank, seed", [(1, 41), (0, 42)])
def test_a_stopped_rank_is_found_hung_ended_and_replaced(server, rank, seed):
    before = server.control("status")["ranks"]
    log_before = len(server.log())
    with HealthWatch(server.url) as health:
        trial = run_kill_trial(server, seed, ranks=[rank], how="STOP",
                               after_steps=random.Random(seed).randrange(8, 20), mix=process_fault_mix())
    assert trial.running_at_kill >= 4, trial
    assert trial.lost_requests == 0 and trial.wrong_tokens == 0, trial
    assert trial.restart["restart"] and trial.restart["lost_ranks"] == [rank], trial.restart
    assert trial.restart["phases"]["hang_detect_seconds"] <= HANG_TIMEOUT + 1, trial.restart["phases"]
    assert trial.scrub["mismatching"] == 0 and trial.scrub["not_durable"] == 0, trial.scrub
    after = server.control("status")["ranks"]
    assert after[rank]["pid"] != before[rank]["pid"] and after[1 - rank]["pid"] == before[1 - rank]["pid"]
    assert after[rank]["phase"] in ("scheduling", "receiving") and after[rank]["stamp_age_seconds"] < 5
    log = server.log()[log_before:]
    assert "rank hung; ending it so that it is replaced" in log
    assert f"pid={before[rank]['pid']}" in log and "was ended" in log
    assert 503 in health.codes and health.codes[-1] == 200, health.codes
    # the server was started with --watchdog-timeout 5: SGLang's watchdog would have stopped it
    assert "ghostserve: --watchdog-timeout raised from 5 to 245 s" in server.log()
