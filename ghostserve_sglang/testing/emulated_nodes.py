"""A multi-node server (``--nnodes``) emulated on this host, for tests: one launcher per node, each with
its own ``--port`` and its own ``--ghost-shm-dir``, so the nodes share only what real nodes share: TCP
to node 0's ``--dist-init-addr`` and membership store."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import psutil

from ghostserve_sglang import models

from .local_server import CPU_FLAGS, Server, _stop, _wait_ready, eventually, free_port


@dataclasses.dataclass
class Nodes:
    server: Server  # node 0's: the API, the control socket
    launchers: list[subprocess.Popen]  # index: node rank
    logs: list[str]
    shm_dirs: list[str]

    def log(self, node: int) -> str:
        with open(self.logs[node]) as f:
            return f.read()

    def kill(self, node: int) -> None:
        """``kill -9`` every process of ``node``'s launcher at once, the launcher included."""
        launcher = psutil.Process(self.launchers[node].pid)
        for process in [launcher, *launcher.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


@contextlib.contextmanager
def launched_nodes(tp_size: int, nnodes: int, ghost_args: list[str], extra: list[str] = (),
                   log_dir: str = "/tmp", max_total_tokens: int = 8192, model: str = "tiny-llama",
                   start_timeout_s: float = 400) -> Iterator[Nodes]:
    """Start node 0 and the others at once; yield once node 0 answers ``/health`` and every other node
    printed that it is ready."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GHOSTSERVE_")}
    dist_init, coordinator = free_port(), free_port()
    shared = [*CPU_FLAGS, "--model-path", str(models.path(model)), "--tp-size", str(tp_size),
              "--nnodes", str(nnodes), "--dist-init-addr", f"127.0.0.1:{dist_init}",
              "--max-total-tokens", str(max_total_tokens), *extra, *ghost_args,
              "--ghost-coordinator-port", str(coordinator)]
    launchers, logs, shm_dirs = [], [], []
    try:
        for node in range(nnodes):
            port = free_port()
            shm_dirs.append(tempfile.mkdtemp(prefix=f"ghostserve-node{node}-", dir="/dev/shm"))
            logs.append(os.path.join(log_dir, f"ghostserve-node{node}-{port}.log"))
            command = [sys.executable, "-m", "ghostserve_sglang.launch", *shared, "--node-rank", str(node),
                       "--port", str(port), "--ghost-shm-dir", shm_dirs[-1]]
            with open(logs[-1], "w") as log:
                launchers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
            if node == 0:
                server = Server(port, launchers[0], logs[0], shm_dirs[0])
        nodes = Nodes(server, launchers, logs, shm_dirs)
        if not _wait_ready(server, start_timeout_s):
            raise RuntimeError("node 0's port was taken before it bound it")
        ready = [f"GhostServe node {node} of {nnodes} ready" for node in range(nnodes)]
        eventually(lambda: all(ready[n] in nodes.log(n) for n in range(1, nnodes)) or None, 60)
        yield nodes
    finally:
        for launcher in launchers:
            _stop(launcher)
        for directory in shm_dirs:
            shutil.rmtree(directory, ignore_errors=True)
