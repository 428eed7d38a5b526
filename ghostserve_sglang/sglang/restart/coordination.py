"""The key-value store through which a server's processes, on every node, agree on a replacement
(docs/rank-restart.md, "Across nodes").

Node 0's launcher serves it: a ``torch.distributed`` TCPStore, the kind SGLang's own rendezvous at
``--dist-init-addr`` runs on, but one of GhostServe's, because SGLang's dies with TP rank 0's process.
Every other launcher and every scheduler rank is a client; the launcher exports where it is as
``GHOSTSERVE_COORDINATOR`` (``host:port``). With one node it listens on a free local port, so a
single-node server goes through the same code. The store holds little, each under its own key:

- ``members``: the announcement of the current generation (``membership``);
- ``arrived/g<generation>/rank<r>``: the ranks that reached that generation's rendezvous;
- ``deaths`` and ``death/<n>``: the deaths node >= 1's supervisors report to node 0's;
- ``joined/g<generation>/rank<r>``: the replacements that node >= 1 started and saw join;
- ``node/<i>`` and ``beat/<i>``: each node's ranks, and a counter its launcher raises twice a second;
- ``stop``: why the server fails stop, for every node's supervisor to stop too.
"""

from __future__ import annotations

import datetime
import json
import os

ENV = "GHOSTSERVE_COORDINATOR"
CONNECT_TIMEOUT = datetime.timedelta(seconds=30)

_STORE = None  # this process's connection (or, in node 0's launcher, the server itself)
_OWNER = 0  # the pid it was made in (a forked child makes its own)


class CoordinatorLost(RuntimeError):
    """Node 0's store cannot be reached: node 0's launcher is gone."""


def serve(host: str, port: int) -> str:
    """Node 0's launcher: start the store on ``port`` (0: a free one); returns ``host:port`` to export."""
    global _STORE, _OWNER
    import torch.distributed as dist

    _STORE = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=CONNECT_TIMEOUT)
    _OWNER = os.getpid()
    return f"{host}:{_STORE.port}"


def _store():
    global _STORE, _OWNER
    if _STORE is None or _OWNER != os.getpid():
        import torch.distributed as dist

        host, _, port = os.environ[ENV].rpartition(":")
        try:
            _STORE = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                                   timeout=CONNECT_TIMEOUT)
            _OWNER = os.getpid()
        except Exception as exc:
            raise CoordinatorLost(f"node 0's membership store at {host}:{port} cannot be reached: "
                                  f"{str(exc).splitlines()[0]}") from None
    return _STORE


def _call(method: str, *args):
    try:
        return getattr(_store(), method)(*args)
    except CoordinatorLost:
        raise
    except Exception as exc:
        raise CoordinatorLost(f"node 0's membership store failed ({method}): "
                              f"{str(exc).splitlines()[0]}") from None


def put(key: str, value) -> None:
    _call("set", key, json.dumps(value))


def get(key: str):
    """The value under ``key``, or None when there is none."""
    if not _call("check", [key]):
        return None
    return json.loads(_call("get", key))


def has(key: str) -> bool:
    return bool(_call("check", [key]))


def count(key: str, by: int = 1) -> int:
    """Raise the counter under ``key`` by ``by``; returns its new value (``by=0``: reads it)."""
    return int(_call("add", key, by))


def configured() -> bool:
    return ENV in os.environ
