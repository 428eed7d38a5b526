"""The control channel: ``ghostserve status`` and ``scrub`` reach every rank at the same step.

Rank 0's scheduler listens on a Unix socket named for the server instance. A request it receives is
appended to the requests rank 0 pulls in its next loop iteration, so SGLang's own broadcast carries it
to every rank and all ranks handle it at the same point between two steps. Rank 0 writes the reply.
Each connection carries one JSON line each way.

May import: threads, shm.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import queue
import socket
import threading

from . import threads
from .shm import shm_dir

OPS = ("status", "scrub", "recover", "inject-fault", "corrupt-parity", "drain", "kill-rank", "hang-rank")


class ControlError(RuntimeError):
    """The control request could not be delivered or answered; one line says why."""


def socket_path(instance_id: str, directory: str | None = None) -> str:
    return os.path.join(directory or shm_dir(), f"ghostserve-{instance_id}.sock")


@dataclasses.dataclass(frozen=True)
class ControlRequest:
    """One control operation as it travels in SGLang's request broadcast."""

    request_id: int
    op: str
    args: dict


class ControlServer:
    """Rank 0's end of the channel: accepts requests and answers them once every rank handled them."""

    def __init__(self, instance_id: str) -> None:
        self.path = socket_path(instance_id)
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self._sock.listen(16)
        self._ids = itertools.count(1)
        self._incoming: queue.Queue[ControlRequest] = queue.Queue()
        self._waiting: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        threads.daemon(self._accept, "ghostserve-control").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            try:
                conn.settimeout(10)
                message = json.loads(conn.makefile("r").readline())
                op, args = message["op"], message.get("args", {})
                if op not in OPS:
                    raise ValueError(f"op={op!r} is not allowed; allowed: {', '.join(OPS)}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                _send(conn, {"error": f"bad control request: {exc}"})
                continue
            request = ControlRequest(next(self._ids), op, dict(args))
            with self._lock:
                self._waiting[request.request_id] = conn
            self._incoming.put(request)

    def take(self) -> list[ControlRequest]:
        """Requests received since the last call (never blocks)."""
        taken = []
        while True:
            try:
                taken.append(self._incoming.get_nowait())
            except queue.Empty:
                return taken

    def reply(self, request_id: int, result: dict) -> None:
        with self._lock:
            conn = self._waiting.pop(request_id, None)
        if conn is not None:
            _send(conn, result)

    def close(self) -> None:
        self._sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def _send(conn: socket.socket, message: dict) -> None:
    try:
        conn.sendall((json.dumps(message) + "\n").encode())
    except OSError:
        pass  # the client went away; nothing to answer
    finally:
        conn.close()


def call(instance_id: str, op: str, args: dict | None = None, timeout_s: float = 120.0,
         directory: str | None = None) -> dict:
    """Send one control request to a running server and return its reply; ``directory``: the server's
    ``--ghost-shm-dir`` (default: this process's)."""
    path = socket_path(instance_id, directory)
    if not os.path.exists(path):
        raise ControlError(f"no GhostServe server with instance id {instance_id!r} here ({path} is missing)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
            sock.sendall((json.dumps({"op": op, "args": args or {}}) + "\n").encode())
            line = sock.makefile("r").readline()
        except OSError as exc:
            raise ControlError(f"control request {op!r} to {path} failed: {exc}") from None
    if not line:
        raise ControlError(f"control request {op!r} to {path} got no reply (server stopped?)")
    reply = json.loads(line)
    if "error" in reply:
        raise ControlError(reply["error"])
    return reply
