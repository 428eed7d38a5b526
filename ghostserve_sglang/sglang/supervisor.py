"""Supervision of the TP scheduler processes from SGLang's main process (see docs/rank-restart.md).

Stock SGLang learns of a scheduler's death twice: its ``SubprocessWatchdog`` polls the processes every
second, and a surviving rank whose collective failed sends SIGQUIT; either way the main process kills
the process tree about 5 s later, and every client sees its connection closed without a response.

Under GhostServe the supervisor owns that decision. It polls the scheduler processes every
``POLL_SECONDS``; when one has died it logs which rank, how (exit code or signal) and when. Replacing
the rank is the plan of docs/rank-restart.md; until a replacement can join, the outcome is a clean fail
stop: every request still pending gets an error response naming the cause, then the process tree is
stopped, and one log line says why. Deaths of other processes (the detokenizer) keep SGLang's handling.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import structlog

log = structlog.get_logger("ghostserve.supervisor")

POLL_SECONDS = 0.2
FAIL_STOP_GRACE_SECONDS = 1.0  # lets the error responses reach their clients


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with status {exitcode}"


class Supervisor:
    """Watches the scheduler processes SGLang launched; one instance per main process."""

    def __init__(self) -> None:
        self.processes: list = []  # index = tp rank
        self.tokenizer_manager = None
        self.clean_up = lambda: None  # what the launcher removes when the server stops
        self.standing_down = False  # the server is being stopped on purpose
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop_lock = threading.Lock()

    def configure(self, clean_up) -> None:
        """``clean_up`` removes what a stopped server leaves (host segments, control socket)."""
        self.clean_up = clean_up

    # -- wiring, from the main-process wrappers -----------------------------------------------------
    def adopt(self, processes: list) -> None:
        """The scheduler processes, in TP rank order, right after SGLang started them."""
        self.processes = list(processes)
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="ghostserve-supervisor", daemon=True)
            self._thread.start()

    def attach_tokenizer_manager(self, tokenizer_manager) -> None:
        self.tokenizer_manager = tokenizer_manager

    def supervises(self, process) -> bool:
        return any(process is p for p in self.processes)

    # -- the watch ----------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            dead = [(rank, p) for rank, p in enumerate(self.processes) if p.exitcode is not None]
            if dead:
                # A survivor whose collective failed exits too; the one a signal ended is the cause.
                rank, process = min(dead, key=lambda d: (d[1].exitcode >= 0, d[0]))
                if self._shutting_down(process):
                    self.standing_down = True
                    log.info("scheduler processes stopped with the server; not a fault", rank=rank)
                else:
                    self._on_death(rank, process)
                self.stopping.set()
                return

    def _shutting_down(self, process) -> bool:
        """Whether the server is being stopped: SGLang's SIGTERM handler ran in this process, or a TERM
        or INT reached every scheduler (Ctrl-C, ``kill -TERM -<pgid>``). The same signal to one
        scheduler is a fault. Waits briefly first, so a shutdown's own handler has run."""
        time.sleep(2 * POLL_SECONDS)
        if getattr(self.tokenizer_manager, "gracefully_exit", False):
            return True
        return all(p.exitcode in (-signal.SIGTERM, -signal.SIGINT) for p in self.processes)

    def _on_death(self, rank: int, process) -> None:
        log.error("rank process died", rank=rank, pid=process.pid, exitcode=process.exitcode,
                  how=describe_exit(process.exitcode))
        self.fail_stop(f"TP rank {rank}'s scheduler process (pid {process.pid}) "
                       f"{describe_exit(process.exitcode)}; the server cannot continue without it")

    def on_failure_report(self) -> None:
        """A scheduler reported a failure (SIGQUIT): give the watch a moment to name the dead rank,
        else stop with the report itself as the reason."""
        deadline = time.monotonic() + 20 * POLL_SECONDS
        while time.monotonic() < deadline and not self.stopping.is_set():
            time.sleep(POLL_SECONDS / 2)
        if self.standing_down:  # as SGLang would: stop the tree (the launcher's clean-up first)
            from sglang.srt.utils import kill_process_tree

            self.clean_up()
            kill_process_tree(os.getpid(), include_parent=True)
            return
        self.fail_stop("a scheduler process reported a failure (SIGQUIT); see the log above")

    # -- fail stop ------------------------------------------------------------------------------------
    def fail_stop(self, reason: str) -> None:
        """Answer every pending request with an error naming ``reason``, stop every process, remove
        what the server leaves, and exit with status 1. Runs once."""
        if not self._stop_lock.acquire(blocking=False):
            return
        self.stopping.set()
        log.error("fail stop", reason=reason)
        tokenizer_manager = self.tokenizer_manager
        loop = getattr(tokenizer_manager, "event_loop", None) if tokenizer_manager else None
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(self._abort_pending, reason)
            time.sleep(FAIL_STOP_GRACE_SECONDS)
        from sglang.srt.utils import kill_process_tree

        kill_process_tree(os.getpid(), include_parent=False)
        self.clean_up()
        print(f"ghostserve: fail stop: {reason}", file=sys.stderr, flush=True)
        os._exit(1)

    def _abort_pending(self, reason: str) -> None:
        from sglang.srt.managers.io_struct import AbortReq

        manager = self.tokenizer_manager
        for rid in list(manager.rid_to_state):
            manager._handle_abort_req(AbortReq(rid=rid, abort_message=f"ghostserve: {reason}",
                                               finished_reason={"type": "abort", "status_code": 503,
                                                                "message": f"ghostserve: {reason}"}))


SUPERVISOR = Supervisor()


# -- wrappers for the main-process patch targets (patches.MAIN_TARGETS) ---------------------------------
def launch_scheduler_processes(wrapped, instance, args, kwargs):
    """``Engine._launch_scheduler_processes``: adopt the TP scheduler processes it started."""
    result = wrapped(*args, **kwargs)
    _, processes = result
    if processes:
        SUPERVISOR.adopt(processes)
    return result


def signal_handler_init(wrapped, instance, args, kwargs):
    """``SignalHandler.__init__``: made once the tokenizer manager's event loop runs."""
    wrapped(*args, **kwargs)
    SUPERVISOR.attach_tokenizer_manager(instance.tokenizer_manager)


def watchdog_check_processes(wrapped, instance, args, kwargs):
    """``SubprocessWatchdog._check_processes``: leave the supervised scheduler processes to the
    supervisor; keep watching the others (the detokenizer)."""
    kept = [(p, n) for p, n in zip(instance._processes, instance._names) if not SUPERVISOR.supervises(p)]
    instance._processes, instance._names = [p for p, _ in kept], [n for _, n in kept]
    return wrapped(*args, **kwargs)


def running_phase_sigquit(wrapped, instance, args, kwargs):
    """``SignalHandler.running_phase_sigquit_handler``: a surviving rank whose collective failed
    reports it with SIGQUIT. With supervised processes, the supervisor decides (it names the dead
    rank); the event loop must keep running meanwhile so the error responses can be sent."""
    if not SUPERVISOR.processes or SUPERVISOR.standing_down:
        return wrapped(*args, **kwargs)
    threading.Thread(target=SUPERVISOR.on_failure_report, name="ghostserve-fail-stop", daemon=True).start()
