"""A rank's scheduler process dies on a real TP=2 server (CPU) and its replacement cannot join: it fails
at start-up (the ``--fail-replacement`` drill) or misses ``--ghost-rejoin-timeout-seconds``. The server
then fails stop cleanly (docs/rank-restart.md): every pending request gets an error response naming the
dead rank, every process exits, nothing is left in /dev/shm, and one log line says why. With more
deaths than parity covers (TP=3, xor), the lost KV is recomputed instead and no token changes."""

from __future__ import annotations

import concurrent.futures
import glob
import os
import random
import re
import signal
import time
import urllib.error

import psutil
import pytest

from ghostserve_sglang.control import ControlError
from ghostserve_sglang.testing.campaign import LONG_PROMPT, request_mix, run_kill_trial
from ghostserve_sglang.testing.local_server import eventually, launched

GHOST = ["--ghost-code", "xor", "--ghost-enable-fault-injection", "1"]


def outcome(future) -> str:
    try:
        future.result(timeout=60)
        return "completed"
    except urllib.error.HTTPError as exc:
        return f"http {exc.code}: {exc.read().decode()[:300]}"
    except Exception as exc:  # connection reset, no response
        return f"no response: {exc!r}"


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for an init that does not reap."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["replacement fails", "rejoin timeout"])
def test_a_replacement_that_cannot_join_fails_stop_cleanly(how, tmp_path):
    timeout = "60" if how == "replacement fails" else "2"
    ghost = [*GHOST, "--ghost-rejoin-timeout-seconds", timeout]
    with launched(2, ghost, ["--chunked-prefill-size", "128"], log_dir=str(tmp_path)) as server:
        pids = [r["pid"] for r in server.control("status")["ranks"]]
        mix = request_mix(random.Random(5)) + [([7] * 600, 16)]  # one long prompt in chunked prefill
        with concurrent.futures.ThreadPoolExecutor(len(mix)) as pool:
            futures = [pool.submit(server.generate, ids, new) for ids, new in mix]
            start = server.control("status")["ranks"][0]["step"]
            while server.control("status")["ranks"][0]["step"] < start + 5:
                time.sleep(0.01)
            killed_at = time.monotonic()
            with pytest.raises(ControlError, match="rank=7 is not allowed"):
                server.control("kill-rank", rank=7)
            if how == "rejoin timeout":
                os.kill(pids[1], signal.SIGKILL)
            else:
                reply = server.control("kill-rank", rank=1, signal="KILL", fail_replacement=True)
                assert reply == {"rank": 1, "pid": pids[1], "signal": "KILL", "at": "now",
                                 "fail_replacement": True}
            outcomes = [outcome(f) for f in futures]
        server.process.wait(timeout=90)
        stopped_after = time.monotonic() - killed_at
        log = server.log()
    pending = [o for o in outcomes if o != "completed"]
    assert pending, outcomes  # the kill landed while requests were running
    assert all(o.startswith("http 503") and "TP rank 1" in o for o in pending), pending
    assert server.process.returncode == 1 and stopped_after < float(timeout) + 20
    lines = [line for line in log.splitlines() if line.startswith("ghostserve: fail stop:")]
    cause = f"ghostserve: fail stop: TP rank 1's scheduler process (pid {pids[1]}) was killed by SIGKILL; "
    if how == "rejoin timeout":
        assert lines == [f"{cause}its replacement did not join within --ghost-rejoin-timeout-seconds=2"]
    else:
        expected = re.escape(cause) + r"its replacement \(pid \d+\) exited with status \d+ before it joined"
        assert len(lines) == 1 and re.fullmatch(expected, lines[0])
        assert "the replacement of TP rank 1 fails at start-up" in log
    replacement = int(re.search(r"replacing rank .*pid=(\d+)", log).group(1))
    assert not any(alive(pid) for pid in [*pids, replacement])
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"ghostserve-{server.port}")]


def _hold_a_semaphore(names) -> None:
    import multiprocessing

    lock = multiprocessing.get_context("spawn").Lock()
    names.put(lock._semlock.name)
    time.sleep(300)


def test_a_killed_process_semaphore_is_removed_and_a_live_one_kept():
    """A killed scheduler leaves its multiprocessing semaphores in /dev/shm (Python removes them only
    when the server stops); after a replacement the supervisor removes those no process has mapped."""
    import multiprocessing

    from ghostserve_sglang.sglang.restart.semaphores import remove_orphaned

    since = time.time() - 1
    context = multiprocessing.get_context("spawn")
    names = context.Queue()  # its own semaphores stay mapped here
    child = context.Process(target=_hold_a_semaphore, args=(names,))
    child.start()
    path = "/dev/shm/sem." + names.get(timeout=120).lstrip("/")
    assert remove_orphaned(since) == [] and os.path.exists(path)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert remove_orphaned(since) == [os.path.basename(path)] and not os.path.exists(path)


@pytest.fixture(scope="module")
def xor3(tmp_path_factory):
    """TP=3 xor; the semaphores in /dev/shm before it started (the last test stops it)."""
    semaphores = set(glob.glob("/dev/shm/sem.mp-*"))
    ghost = [*GHOST, "--ghost-rejoin-timeout-seconds", "240"]
    with launched(3, ghost, ["--chunked-prefill-size", "128"], log_dir=str(tmp_path_factory.mktemp("xor3")),
                  model="tiny-llama-gqa") as server:
        yield server, semaphores


def test_more_deaths_than_parity_covers_are_recomputed_never_wrong(xor3):
    """xor covers one lost rank: a second death during the replacement leaves the lost KV to be
    recomputed from the tokens, and the outputs are still those of a run without the fault."""
    server, _ = xor3
    mix = request_mix(random.Random(34), requests=7) + [LONG_PROMPT]
    trial = run_kill_trial(server, 34, ranks=[2], how="KILL", after_steps=10, mix=mix, second=(1, 3.0))
    assert trial.lost_requests == 0 and trial.wrong_tokens == 0, trial
    assert trial.restart["lost_ranks"] == [1, 2] and trial.restart["outcome"] == "recomputed", trial.restart
    assert trial.restart["slots_rebuilt"] == 0 and trial.restart["slots_recomputed"] > 0


def test_ctrl_c_after_replacements_leaves_no_file_semaphore_or_process(xor3):
    """SIGINT to the launcher alone (Ctrl-C in its terminal), after ranks 1 and 2 were replaced (the
    test above) and a standby started: every file the server made in /dev/shm, every semaphore, and
    every process are gone."""
    server, semaphores = xor3
    assert all(rank["restarts"] == 1 for rank in server.control("status")["ranks"][1:])
    processes = psutil.Process(server.process.pid).children(recursive=True)
    assert any("standby process started" in line for line in server.log().splitlines())
    server.process.send_signal(signal.SIGINT)
    server.process.wait(timeout=120)

    def nothing_left() -> bool:
        files = [n for n in os.listdir("/dev/shm") if n.startswith(f"ghostserve-{server.port}")]
        assert not files, files
        made = set(glob.glob("/dev/shm/sem.mp-*")) - semaphores
        assert not made, made
        running = [p.pid for p in processes if alive(p.pid)]
        assert not running, running
        return True

    eventually(nothing_left, timeout_s=30)
