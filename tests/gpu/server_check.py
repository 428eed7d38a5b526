"""Device check: GhostServe-protected SGLang servers on one GPU (TP=1, replicate: the only code one
GPU allows), with CUDA graphs and the overlapped scheduler on, a small KV pool (about 2k tokens, so
slots are freed and reused) and many concurrent requests:

1. page size 1, and page size 16 with fp8 KV: after the load, a scrub (which waits for the drain) finds
   every live slot's host copy equal to its KV, none missing, and status shows 0 errors;
2. on the page-size-1 server, a fault injected mid-decode is rebuilt and the greedy output is the
   fault-free run's, token for token;
3. peak device memory and decode tokens/s with GhostServe off and with replicate, in the same run.

One PASS/FAIL line per check; exits 1 when any fails, 3 when sglang is not installed.

    python tests/gpu/server_check.py
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import random
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ghostserve_sglang.testing.local_server import COMMON_FLAGS, launched  # noqa: E402

FLAGS = [*COMMON_FLAGS, "--mem-fraction-static", "0.3", "--cuda-graph-max-bs-decode", "32"]
GHOST = ["--ghost-code", "replicate", "--ghost-strict", "1", "--ghost-enable-fault-injection", "1"]
rng = random.Random(0)
LOAD = [([rng.randrange(3, 1000) for _ in range(rng.randrange(60, 400))], 64) for _ in range(32)]
LONG = ([rng.randrange(3, 1000) for _ in range(300)], 400)


class PeakMemory:
    """The device's used memory, sampled by nvidia-smi every 0.2 s; ``peak`` in MiB."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split()
            if out:
                self.peak = max(self.peak, int(out[0]))
            time.sleep(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def decode_rate(server) -> float:
    """Output tokens per second over the concurrent load."""
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(LOAD)) as pool:
        replies = list(pool.map(lambda r: server.generate(*r), LOAD))
    assert all(len(reply["output_ids"]) == request[1] for reply, request in zip(replies, LOAD))
    return sum(len(reply["output_ids"]) for reply in replies) / (time.monotonic() - started)


def clean(server, name: str) -> bool:
    log = server.log()
    # SGLang logs its server_args as a dict at start.
    graphs_and_overlap = "'disable_cuda_graph': False" in log and "'disable_overlap_schedule': False" in log
    scrub, status = server.control("scrub"), server.control("status")
    errors = sum(rank["errors"] for rank in status["ranks"])
    ok = (graphs_and_overlap and scrub["mismatching"] == 0 and scrub["not_durable"] == 0
          and scrub["matching"] == scrub["live_slots"] > 0 and errors == 0)
    print(json.dumps({"check": name, "scrub": scrub, "errors": errors,
                      "graphs_and_overlap": graphs_and_overlap}))
    print(f"{name}: {'PASS' if ok else 'FAIL'}", flush=True)
    return ok


def fault_mid_decode(server, after_tokens: int = 100) -> bool:
    """The long request streamed; once ``after_tokens`` have arrived, rank 0's KV is destroyed and
    rebuilt while the request goes on."""
    reference = server.generate(*LONG)["output_ids"]
    body = {"input_ids": LONG[0], "stream": True,
            "sampling_params": {"max_new_tokens": LONG[1], "temperature": 0, "ignore_eos": True}}
    request = urllib.request.Request(server.url + "/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    fault, last = None, {}
    with urllib.request.urlopen(request, timeout=300) as response:
        for line in response:
            data = line.decode().strip().removeprefix("data:").strip()
            if not data or data == "[DONE]":
                continue
            last = json.loads(data)
            if fault is None and len(last["output_ids"]) >= after_tokens:
                fault = threading.Thread(target=lambda: print(json.dumps(
                    server.control("inject-fault", ranks=[0]))))
                fault.start()
                at = len(last["output_ids"])
    fault.join()
    recoveries = server.control("status")["ranks"][0]["recoveries"]
    ok = last["output_ids"] == reference and recoveries >= 1 and at < LONG[1]
    print(f"fault_mid_decode_same_tokens: {'PASS' if ok else 'FAIL'} (fault after {at} of {len(reference)} "
          f"tokens, {recoveries} recoveries)", flush=True)
    return ok


def main() -> int:
    if importlib.util.find_spec("sglang") is None:
        print("server check NOT RUN: sglang is not installed on this machine")
        return 3
    results, failed = {}, 0
    for name, ghost, extra in (("off", ["--ghost-code", "off"], []), ("replicate", GHOST, []),
                               ("replicate_page16_fp8", GHOST, ["--page-size", "16",
                                                                "--kv-cache-dtype", "fp8_e4m3"])):
        with launched(1, ghost, flags=[*FLAGS, *extra], max_total_tokens=2048, log_dir=".") as server:
            with PeakMemory() as memory:
                rate = decode_rate(server)
            results[name] = {"tokens_per_s": rate, "peak_mib": memory.peak}
            if name != "off":
                failed += not clean(server, f"scrub_clean_{name}")
            if name == "replicate":
                failed += not fault_mid_decode(server)
    off, on = results["off"], results["replicate"]
    print(json.dumps(results, indent=2))
    print(f"decode tokens/s: off {off['tokens_per_s']:.0f}, replicate {on['tokens_per_s']:.0f} "
          f"(ratio {on['tokens_per_s'] / off['tokens_per_s']:.3f}); peak device memory MiB: off "
          f"{off['peak_mib']}, replicate {on['peak_mib']} (+{on['peak_mib'] - off['peak_mib']})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
