"""A real SGLang server started through ``python -m ghostserve_sglang.launch`` on a bundled model, for
tests, benchmarks and trying GhostServe out. On CPU it serves in float32, where greedy outputs do not
depend on how concurrent requests are batched, so a run can be compared token by token with another."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from ghostserve_sglang import control, models

COMMON_FLAGS = ["--host", "127.0.0.1"]
CPU_FLAGS = ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
             "--dtype", "float32", *COMMON_FLAGS]


def eventually(check, timeout_s: float = 30, interval_s: float = 0.1):
    """``check()``'s result once it returns without an AssertionError (and not None); the last
    AssertionError if it never does within ``timeout_s``. For conditions that come true a little later
    (a metric refreshed every second, a process group that is still exiting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
            assert result is not None, f"{check} gave None"
            return result
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, port: int, process: subprocess.Popen, log_path: str,
                 shm_dir: str | None = None) -> None:
        self.port, self.process, self.log_path, self.shm_dir = port, process, log_path, shm_dir
        self.references: dict[str, list] = {}  # fault-free outputs of request mixes (campaign)
        self.url = f"http://127.0.0.1:{port}"

    def generate(self, input_ids: list[int], max_new_tokens: int, timeout_s: float = 600,
                 stream: bool = False, arrivals: list[float] | None = None) -> dict:
        """Greedy generation; with ``stream``, read as server-sent events and return the last one (its
        ``output_ids`` are all the tokens the stream delivered), appending each event's arrival
        (``time.perf_counter()``) to ``arrivals`` if given."""
        body = {"input_ids": input_ids, "stream": stream, "sampling_params": {
            "max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
        if not stream:
            return self.post("/generate", body, timeout_s)
        request = urllib.request.Request(self.url + "/generate", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        last: dict = {}
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            for line in response:
                data = line.decode().strip().removeprefix("data:").strip()
                if data and data != "[DONE]":
                    last = json.loads(data)
                    if arrivals is not None:
                        arrivals.append(time.perf_counter())
        if "output_ids" not in last:
            raise RuntimeError(f"the stream ended without output: {last}")
        return last

    def post(self, path: str, body: dict | None = None, timeout_s: float = 600) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body or {}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            text = response.read().decode()
        return json.loads(text) if text.strip().startswith(("{", "[")) else {"text": text}

    def flush_cache(self, timeout_s: float = 30) -> None:
        """SGLang's ``/flush_cache``, asked again while it answers 400: a request whose response has
        left may still sit in the scheduler's batch until its next iteration, and a flush with a request
        pending is refused."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.post("/flush_cache")
                return
            except urllib.error.HTTPError as exc:
                if exc.code != 400 or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def ghostserve(self, *args: str) -> subprocess.CompletedProcess:
        """Run the ``ghostserve`` CLI against this server."""
        where = ["--shm-dir", self.shm_dir] if self.shm_dir else []
        return subprocess.run([sys.executable, "-m", "ghostserve_sglang.cli", "--port", str(self.port),
                               *where, *args], capture_output=True, text=True, timeout=600)

    def control(self, op: str, **args) -> dict:
        """A control request straight over the control socket (what the CLI sends)."""
        return control.call(str(self.port), op, args, directory=self.shm_dir)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()


PORT_ATTEMPTS = 3


def _wait_ready(server: Server, timeout_s: float) -> bool:
    """Wait until ``server`` answers ``/health``: True. False when its HTTP port was taken by another
    process before it bound it (SGLang logs the error and does not exit); it is stopped then. Raises
    when it exits or does not answer within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if "address already in use" in server.log():
            _stop(server.process)
            return False
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready in {timeout_s} s:\n{server.log()[-4000:]}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def launched(tp_size: int, ghost_args: list[str], extra: list[str] = (), log_dir: str = "/tmp",
             max_total_tokens: int = 8192, start_timeout_s: float = 400,
             plain_sglang_env: dict[str, str] | None = None, flags: list[str] = CPU_FLAGS,
             model: str = "tiny-llama", python: str = sys.executable,
             cwd: str | None = None) -> Iterator[Server]:
    """A server from our launcher with ``ghost_args``; or, with ``plain_sglang_env``, from
    ``python -m sglang.launch_server`` with those GHOSTSERVE_* variables set. ``model`` names a bundled
    model (see :mod:`ghostserve_sglang.models`) or is a model folder; ``python`` and ``cwd`` choose the
    interpreter (an environment GhostServe is installed in) and the folder it starts in. A start that
    loses its free port to another process before it binds it is tried again on another port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GHOSTSERVE_")}
    module = "ghostserve_sglang.launch"
    if plain_sglang_env is not None:
        module = "sglang.launch_server"
        env.update(plain_sglang_env)
    model_path = str(models.path(model)) if model in models.NAMES else model
    for _ in range(PORT_ATTEMPTS):
        port = free_port()
        log_path = os.path.join(log_dir, f"ghostserve-server-{port}.log")
        command = [python, "-m", module, "--model-path", model_path,
                   *flags, "--tp-size", str(tp_size), "--port", str(port),
                   "--max-total-tokens", str(max_total_tokens), *extra, *ghost_args]
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        server = Server(port, process, log_path)
        try:
            if _wait_ready(server, start_timeout_s):
                break
        except BaseException:
            _stop(process)
            raise
    else:
        raise RuntimeError(f"every port tried was taken before the server bound it ({PORT_ATTEMPTS} tries)")
    try:
        yield server
    finally:
        _stop(process)
