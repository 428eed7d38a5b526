"""Re-forming the process groups after a rank was replaced (docs/rank-restart.md, "Join").

A scheduler's start-up makes a fixed sequence of ``torch.distributed`` calls: ``init_process_group``,
every ``new_group`` of SGLang's group coordinators and of GhostServe, and a few collectives (a memory
minimum, a barrier after the weights are loaded, the seed broadcast). A replacement rank makes the same
sequence again, and its peers must answer every call in the same order. So each rank records its own
sequence while it starts (``Transcript.recording``) and, when a peer is replaced, replays it
(``Transcript.replay``) against a fresh rendezvous: the same groups are created in the same order, the
same collectives are joined with the values this rank gave at its start, and every object that held one
of the old groups is re-pointed at its new one, so SGLang's group coordinators keep working unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import socket
import sys
import threading
import time
import types

import structlog
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

log = structlog.get_logger("ghostserve.regroup")

RECORDED = ("init_process_group", "new_group", "all_reduce", "broadcast", "barrier", "monitored_barrier",
            "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast_object_list",
            "gather", "reduce", "reduce_scatter_tensor", "all_to_all_single")
DEFAULT_GROUP = -1  # the default (WORLD) group in a recorded call
MASTER_WAIT_SECONDS = 5.0


def await_master(init_method: str | None, rank: int | None) -> None:
    """Before a rank other than 0 calls ``init_process_group`` on a ``tcp://`` rendezvous: wait until
    the master's port accepts a connection (tried every 2 ms). torch's store client backs off about
    half a second after a refused connection, and in a join the peers reach the rendezvous within
    milliseconds of each other, so that back-off was 0.4-0.6 s of every replacement's join. Past
    ``MASTER_WAIT_SECONDS`` torch's own call goes ahead (and times out as it would have)."""
    if not rank or not isinstance(init_method, str) or not init_method.startswith("tcp://"):
        return
    host, _, port = init_method.removeprefix("tcp://").rpartition(":")
    deadline = time.monotonic() + MASTER_WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.002)


class Transcript:
    """The ``torch.distributed`` calls one rank made while it started, with the groups it created."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []  # groups stored as indices into ``groups``
        self.groups: list = []  # the current process group of each recorded new_group call
        self._depth = threading.local()

    # -- recording ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def recording(self):
        """Record the outermost ``torch.distributed`` calls made by this thread meanwhile."""
        originals = {name: getattr(dist, name) for name in RECORDED}
        wrappers = {name: self._recorder(name, fn) for name, fn in originals.items()}
        patched = _rebind(originals, wrappers)
        try:
            yield self
        finally:
            _rebind(wrappers, originals, patched)

    def _recorder(self, name: str, fn):
        owner = threading.current_thread()

        def record(*args, **kwargs):
            if threading.current_thread() is not owner or getattr(self._depth, "n", 0):
                return fn(*args, **kwargs)
            entry = (name, self._stored(args), self._stored(kwargs))
            if name == "init_process_group":
                await_master(kwargs.get("init_method"), kwargs.get("rank"))
            self._depth.n = 1
            try:
                result = fn(*args, **kwargs)
            finally:
                self._depth.n = 0
            self.calls.append(entry)
            if name == "new_group":
                self.groups.append(result)
            return result

        return record

    def _stored(self, value):
        """A copy of a call's argument: tensors cloned, groups as indices, objects deep-copied."""
        if isinstance(value, dist.ProcessGroup):
            return _GroupRef(self._index(value))
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, (list, tuple)):
            return type(value)(self._stored(v) for v in value)
        if isinstance(value, dict):
            return {k: self._stored(v) for k, v in value.items()}
        if isinstance(value, (datetime.timedelta, str, int, float, bool, type(None))):
            return value
        return copy.deepcopy(value)

    def _index(self, group) -> int:
        for i, known in enumerate(self.groups):
            if known is group:
                return i
        if group is c10d.GroupMember.WORLD:
            return DEFAULT_GROUP
        raise RuntimeError(f"a collective at start-up used a group not created at start-up: {group!r}")

    # -- replay ------------------------------------------------------------------------------------
    def replay(self, init_method: str, roots: list) -> int:
        """Tear down this process's groups and make the recorded calls again on a fresh rendezvous at
        ``init_method``; re-point every holder of an old group reachable from ``roots``. Returns the
        number of references changed."""
        old = list(self.groups)
        if torch.cuda.is_available() and hasattr(c10d, "_abort_process_group"):
            with contextlib.suppress(Exception):  # NCCL: destroying a group whose peer died can hang
                c10d._abort_process_group()
        with contextlib.suppress(Exception):  # groups with a dead peer may fail to shut down cleanly
            dist.destroy_process_group()
        fresh: list = []
        for name, args, kwargs in self.calls:
            args, kwargs = self._loaded(args, fresh), self._loaded(kwargs, fresh)
            if name == "init_process_group":
                kwargs["init_method"] = init_method
                kwargs.pop("store", None)
                await_master(init_method, kwargs.get("rank"))
            result = getattr(dist, name)(*args, **kwargs)
            if name == "new_group":
                fresh.append(result)
        self.groups = fresh
        return repoint(list(zip(old, fresh)), roots)

    def _loaded(self, value, fresh: list):
        if isinstance(value, _GroupRef):
            return None if value.index == DEFAULT_GROUP else fresh[value.index]
        if isinstance(value, torch.Tensor):
            return value.clone()  # collectives write into their arguments
        if isinstance(value, (list, tuple)):
            return type(value)(self._loaded(v, fresh) for v in value)
        if isinstance(value, dict):
            return {k: self._loaded(v, fresh) for k, v in value.items()}
        return copy.deepcopy(value)


class _GroupRef:
    def __init__(self, index: int) -> None:
        self.index = index


def _rebind(current: dict, replacement: dict, where: list | None = None) -> list:
    """Point ``torch.distributed`` and every SGLang module that imported one of these functions by
    name at ``replacement``. Returns the (module, name) pairs changed."""
    if where is None:
        where = [(dist, name) for name in current]
        where += [(c10d, name) for name in current if getattr(c10d, name, None) is current[name]]
        for module_name, module in list(sys.modules.items()):
            if module is None or not module_name.startswith("sglang."):
                continue
            for attr, value in list(vars(module).items()):
                if any(value is fn for fn in current.values()):
                    where.append((module, attr))
    for module, attr in where:
        name = attr if attr in replacement else next(n for n, fn in current.items()
                                                      if getattr(module, attr) is fn)
        setattr(module, attr, replacement[name])
    return where


def repoint(pairs: list[tuple[object, object]], roots: list, max_depth: int = 6) -> int:
    """Replace every reference to ``old`` by ``new`` for each pair, in the objects reachable from
    ``roots`` through attributes, dict values and list items (tensors and modules not among the roots
    are not entered). Returns how many references were changed."""
    mapping = {id(old): (old, new) for old, new in pairs}
    changed = 0
    seen: set[int] = set()
    frontier = list(roots)
    for _ in range(max_depth):
        following = []
        for holder in frontier:
            if id(holder) in seen or isinstance(holder, (torch.Tensor, torch.nn.Parameter, type)):
                continue
            seen.add(id(holder))
            if isinstance(holder, dict):
                items = list(holder.items())
            elif isinstance(holder, list):
                items = list(enumerate(holder))
            elif isinstance(holder, tuple):
                following.extend(holder)
                continue
            elif isinstance(holder, types.ModuleType):
                items = list(vars(holder).items()) if any(holder is r for r in roots) else []
            elif hasattr(holder, "__dict__"):
                items = list(vars(holder).items())
            else:
                continue
            for key, value in items:
                if id(value) in mapping and mapping[id(value)][0] is value:
                    if isinstance(holder, (dict, list)):
                        holder[key] = mapping[id(value)][1]
                    else:
                        setattr(holder, key, mapping[id(value)][1])
                    changed += 1
                elif isinstance(value, (dict, list, tuple)) or hasattr(value, "__dict__"):
                    following.append(value)
        frontier = following
    return changed
