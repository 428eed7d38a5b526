"""A protected server that GhostServe refuses at start: one line for the operator, no traceback, nothing
left behind.

A scheduler process that finds, while it starts, something GhostServe cannot protect (an unsupported KV
pool, a parity store that does not fit its directory, a server option or model the launcher did not see
because SGLang was started without it) prints the reason and exits at once with status 2, so SGLang's
start-up fails the ordinary way. Under the launcher it also records the reason in the instance's refusal
file; the launcher then stops the server, removes what it left, and prints the recorded line as its
error.
"""

from __future__ import annotations

import contextlib
import os
import sys

from ...shm import shm_dir

EXIT_STATUS = 2


def path(instance_id: str) -> str:
    return os.path.join(shm_dir(), f"ghostserve-{instance_id}-refused.txt")


def refuse(instance_id: str, message: str, rank: int | None = None) -> None:
    """In a scheduler process: print ``message`` as one line and exit. Under the launcher's supervision
    it is also recorded (the first rank to refuse wins) for the launcher to print as its error."""
    from ..restart import membership

    line = " ".join(message.split())
    if membership.supervised():
        try:
            fd = os.open(path(instance_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            os.write(fd, line.encode())
            os.close(fd)
    who = "a scheduler process" if rank is None else f"TP rank {rank}"
    print(f"ghostserve: {who} refused to start: {line}", file=sys.stderr, flush=True)
    os._exit(EXIT_STATUS)


def take(instance_id: str) -> str | None:
    """In the launcher: the recorded refusal, removed; None when no rank refused."""
    try:
        with open(path(instance_id)) as f:
            message = f.read().strip()
    except FileNotFoundError:
        return None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path(instance_id))
    return message or None
