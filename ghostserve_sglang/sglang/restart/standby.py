"""Starting a replacement scheduler process: from a warm standby, or cold (docs/rank-restart.md,
"Warm standby").

A replacement started from nothing spends most of its time in Python importing torch, SGLang and
GhostServe (8-17 s on a loaded 2-core machine). Once the server is ready, the supervisor keeps
``--ghost-standby`` processes that have done those imports and wait. A dead or hung rank's replacement is
then a standby told which rank it becomes (SGLang's scheduler arguments for that rank, the replacement's
environment, the rendezvous port), so only the scheduler's own start-up, the join and the state transfer
remain. A used standby is replaced in the background once the replacement has joined; with none left,
a replacement starts cold, as a fresh process.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import multiprocessing
import os
import resource
import time

import structlog

from . import handover

log = structlog.get_logger("ghostserve.standby")

# What a scheduler process imports before it can start: SGLang's scheduler and model runner (and with
# them torch), the diffusion-LM algorithms its worker imports at start-up, then SGLang's model registry,
# which imports every model module (about 1.4 s on one core).
PRELOAD = ("sglang.srt.managers.scheduler", "sglang.srt.model_executor.model_runner",
           "sglang.srt.dllm.algorithm")


WARM_UP_NICE = 19  # a standby's imports use only the CPU time the serving ranks leave


def _lower_priority() -> int | None:
    """Lower this process's CPU priority for its warm-up, if it may raise it again later (root, or
    RLIMIT_NICE allows it); returns the priority to restore, or None when it was left as it was. The
    warm-up is about 10 s of one core, and at the same priority as the ranks, on a host with few cores,
    the ranks' decode slows while it runs (decode at 0.65x of a server without standby here)."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    if os.geteuid() != 0 and 20 - before > soft:
        return None
    os.setpriority(os.PRIO_PROCESS, 0, WARM_UP_NICE)
    return before


def _restore_priority(priority: int | None) -> None:
    """Every thread of this process back at ``priority`` (Linux keeps a priority per thread, and the
    threads started during the warm-up inherited the low one)."""
    if priority is None:
        return
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(task), priority)


def run_replacement(environment: dict, target, args: tuple, questions=None) -> None:
    """A replacement scheduler process: SGLang's own entry point, told which generation it joins
    (rank 0's also gets a pipe for its questions to the main process).

    What the process has imported so far is moved out of the garbage collector's sight first: SGLang
    runs a full collection before it sizes the KV pool, and over the objects of every imported module
    that took 0.39 s of a 0.65 s join on one core (a standby collects once while it waits, so what it
    freezes is live)."""
    os.environ.update(environment)
    handover.CHANNEL = questions
    gc.freeze()
    target(*args)


def start_cold(environment: dict, target, args: tuple, rank: int) -> tuple:
    """A fresh process for ``rank``: (process, its ready pipe, rank 0's question pipe or None)."""
    reader, writer = multiprocessing.Pipe(duplex=False)
    questions, their_end = multiprocessing.Pipe() if rank == 0 else (None, None)
    process = multiprocessing.Process(target=run_replacement,
                                      args=(environment, target, (*args, writer), their_end))
    process.start()
    writer.close()
    if their_end is not None:
        their_end.close()
    return process, reader, questions


def _compile_vocab_mask() -> None:
    """SGLang compiles its vocab-shard masking (``get_masked_input_and_mask``, ``torch.compile`` with
    dynamic shapes) at a process's first forward: 1.2 s of a replacement's first step on one core, with
    every other rank waiting for it in the next all-reduce. A standby compiles it while it waits, for a
    shard that starts at 0 (rank 0) and one that does not, and for both id dtypes."""
    import torch
    from sglang.srt.layers.vocab_parallel_embedding import get_masked_input_and_mask

    for mode in (torch.no_grad, torch.inference_mode):  # dynamo's guards check the grad mode
        with mode():
            for dtype in (torch.int64, torch.int32):
                for start in (0, 512):
                    get_masked_input_and_mask(torch.arange(8, dtype=dtype), start, start + 512, 0, 1024, 1024)


def _wait_as_standby(control, writer, their_end) -> None:
    """A standby process: import (at a low CPU priority), say so, then wait for the rank it becomes (EOF:
    the server is gone); it serves at the priority it started with."""
    priority = _lower_priority()
    for name in PRELOAD:
        importlib.import_module(name)
    from sglang.srt.models.registry import ModelRegistry

    ModelRegistry.get_supported_archs()  # imported once per process, kept for the model load
    _compile_vocab_mask()
    gc.collect()
    with contextlib.suppress(OSError):  # taken before it was warm: the work is in the pipe already
        control.send("warm")
    try:
        environment, target, args, rank = control.recv()
    except EOFError:
        return
    control.close()
    _restore_priority(priority)
    run_replacement(environment, target, (*args, writer), their_end if rank == 0 else None)


class Standby:
    """One standby process and the main process's ends of its pipes."""

    def __init__(self) -> None:
        self.control, control = multiprocessing.Pipe()
        self.reader, writer = multiprocessing.Pipe(duplex=False)
        self.questions, their_end = multiprocessing.Pipe()
        self.process = multiprocessing.Process(target=_wait_as_standby, args=(control, writer, their_end),
                                               name="ghostserve-standby")
        self.process.start()
        for end in (control, writer, their_end):
            end.close()
        self.started = time.monotonic()
        self.warm = False

    def is_warm(self) -> bool:
        if not self.warm and self.control.poll():
            with contextlib.suppress(EOFError):
                self.warm = self.control.recv() == "warm"
        return self.warm

    def become(self, environment: dict, target, args: tuple, rank: int) -> tuple:
        """Make this standby the replacement of ``rank``: as ``start_cold`` returns it."""
        self.control.send((environment, target, args, rank))
        self.control.close()
        if rank != 0:
            self.questions.close()
        return self.process, self.reader, self.questions if rank == 0 else None

    def stop(self) -> None:
        if self.process.exitcode is None:
            self.process.kill()
        self.process.join(timeout=10)
        for end in (self.control, self.reader, self.questions):
            end.close()


def _rss_mib(standby: Standby) -> float:
    import psutil

    with contextlib.suppress(psutil.Error):
        return round(psutil.Process(standby.process.pid).memory_info().rss / 2**20, 1)
    return 0.0


class Standbys:
    """The standby processes the supervisor keeps (``count`` of them while the server serves)."""

    def __init__(self, count: int = 0) -> None:
        self.count = count
        self.processes: list[Standby] = []

    def keep(self) -> None:
        """Replace the standbys that ended and start the missing ones (the supervisor's watch, while
        the server serves and no replacement is under way)."""
        for standby in [s for s in self.processes if s.process.exitcode is not None]:
            log.warning("standby process ended; starting another", pid=standby.process.pid,
                        exitcode=standby.process.exitcode)
            standby.stop()
            self.processes.remove(standby)
        while len(self.processes) < self.count:
            self.processes.append(Standby())
            log.info("standby process started", pid=self.processes[-1].process.pid)
        for standby in self.processes:
            if not standby.warm and standby.is_warm():
                log.info("standby process warm", pid=standby.process.pid,
                         seconds=round(time.monotonic() - standby.started, 3), rss_mib=_rss_mib(standby))

    def start(self, environment: dict, target, args: tuple, rank: int) -> tuple:
        """The replacement of ``rank``, from a standby (a warm one first) or cold; and whether from a
        standby."""
        alive = [s for s in self.processes if s.process.exitcode is None]
        if not alive:
            return start_cold(environment, target, args, rank), False
        standby = next((s for s in alive if s.is_warm()), alive[0])
        self.processes.remove(standby)
        return standby.become(environment, target, args, rank), True

    def stop(self) -> None:
        for standby in self.processes:
            standby.stop()
        self.processes = []
