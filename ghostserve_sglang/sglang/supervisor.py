"""Supervision of the TP scheduler processes from SGLang's main process (see docs/rank-restart.md).

Stock SGLang learns of a scheduler's death twice: its ``SubprocessWatchdog`` polls the processes every
second, and a surviving rank whose collective failed sends SIGQUIT; either way the main process kills
the process tree about 5 s later, and every client sees its connection closed without a response.

Under GhostServe the supervisor owns that decision. It polls the scheduler processes every
``POLL_SECONDS``; when one has died it logs which rank and how (exit code or signal), announces a fresh
rendezvous in the membership file, and starts a replacement process for that rank with the same
arguments. The survivors hold meanwhile; the replacement joins them, receives their state and has its
KV rebuilt (``rejoin``), then reports ready through its pipe as at start-up. If it has not done so by
``--ghost-rejoin-timeout-seconds``, or it dies, or another rank dies meanwhile, the outcome is a clean
fail stop: every request still pending gets an error response naming the cause, the process tree is
stopped, and one log line says why. Deaths of other processes (the detokenizer) keep SGLang's handling.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time

import structlog

from . import handover, journal, membership

log = structlog.get_logger("ghostserve.supervisor")

POLL_SECONDS = 0.2
FAIL_STOP_GRACE_SECONDS = 1.0  # lets the error responses reach their clients
REPORT_WAIT_SECONDS = 60.0
EVENT_LOOP_TIMEOUT_SECONDS = 30.0  # how long a scheduler that reported a failure (SIGQUIT) may take to exit


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
        self.launch: tuple = ()  # run_scheduler_process, server_args, port_args: to start a replacement
        self.tokenizer_manager = None
        self.clean_up = lambda: None  # what the launcher removes when the server stops
        self.instance_id = ""
        self.rejoin_timeout_s = 0.0  # 0: no replacement, a death fails stop
        self.generation = 0
        self.restarts: dict[int, int] = {}
        self.deaths = 0
        self.replacing = False  # a replacement has been started and has not joined yet
        self.standing_down = False  # the server is being stopped on purpose
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop_lock = threading.Lock()

    def configure(self, clean_up, instance_id: str = "", rejoin_timeout_s: float = 0.0) -> None:
        """``clean_up`` removes what a stopped server leaves (host segments, control socket); with a
        ``rejoin_timeout_s``, a dead rank is replaced (it must rejoin within that time)."""
        self.clean_up, self.instance_id, self.rejoin_timeout_s = clean_up, instance_id, rejoin_timeout_s

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
                    self.stopping.set()
                    return
                self._on_death(rank, process, len(dead))

    def _shutting_down(self, process) -> bool:
        """Whether the server is being stopped: SGLang's SIGTERM handler ran in this process, or a TERM
        or INT reached every scheduler (Ctrl-C, ``kill -TERM -<pgid>``). The same signal to one
        scheduler is a fault. Waits briefly first, so a shutdown's own handler has run."""
        time.sleep(2 * POLL_SECONDS)
        if getattr(self.tokenizer_manager, "gracefully_exit", False):
            return True
        return all(p.exitcode in (-signal.SIGTERM, -signal.SIGINT) for p in self.processes)

    def _on_death(self, rank: int, process, deaths: int) -> None:
        self.deaths += 1
        log.error("rank process died", rank=rank, pid=process.pid, exitcode=process.exitcode,
                  how=describe_exit(process.exitcode))
        cause = f"TP rank {rank}'s scheduler process (pid {process.pid}) {describe_exit(process.exitcode)}"
        if not self.rejoin_timeout_s:
            self.fail_stop(f"{cause}; the server cannot continue without it")
        if deaths > 1:
            self.fail_stop(f"{cause}, and {deaths - 1} other rank(s) died with it; only one at a time is "
                           "replaced")
        if len(self.processes) < 2:
            self.fail_stop(f"{cause}; with one rank there is no survivor to rebuild it from")
        self._replace(rank, process, cause)

    def _replace(self, rank: int, process, cause: str) -> None:
        """Start a replacement for ``rank`` and wait until it has joined; else fail stop."""
        started = time.monotonic()
        self.generation += 1
        port = _free_port()
        membership.announce(self.instance_id, self.generation, port, [rank])
        reader, writer = multiprocessing.Pipe(duplex=False)
        # Rank 0's replacement asks the main process what the clients have received (handover).
        questions, their_end = multiprocessing.Pipe() if rank == 0 else (None, None)
        target, server_args, port_args = self.launch
        gpu_id = server_args.base_gpu_id + rank * server_args.gpu_id_step  # as SGLang placed it (pp = 1)
        args = (server_args, port_args, gpu_id, rank, 0, None, writer)
        environment = {membership.REPLACEMENT_ENV: str(self.generation),
                       membership.REPLACEMENT_RANK_ENV: str(rank),
                       "SGLANG_DISTRIBUTED_INIT_METHOD_OVERRIDE": f"tcp://127.0.0.1:{port}"}
        replacement = multiprocessing.Process(target=run_replacement,
                                              args=(environment, target, args, their_end))
        self.replacing = True
        replacement.start()
        writer.close()
        if their_end is not None:
            their_end.close()
        self.processes[rank] = replacement
        log.warning("replacing rank", rank=rank, pid=replacement.pid, generation=self.generation, port=port)
        deadline = started + self.rejoin_timeout_s
        while not reader.poll(POLL_SECONDS):
            if questions is not None and questions.poll():
                self._answer(questions)
            others = [(r, p) for r, p in enumerate(self.processes) if r != rank and p.exitcode is not None]
            if replacement.exitcode is not None:
                self.fail_stop(f"{cause}; its replacement (pid {replacement.pid}) "
                               f"{describe_exit(replacement.exitcode)} before it joined")
            if others:
                r, p = others[0]
                self.fail_stop(f"{cause}; TP rank {r} (pid {p.pid}) {describe_exit(p.exitcode)} while "
                               "it was being replaced")
            if time.monotonic() > deadline:
                self.fail_stop(f"{cause}; its replacement did not join within --ghost-rejoin-timeout-"
                               f"seconds={self.rejoin_timeout_s:g}")
        try:
            reader.recv()
        except EOFError:  # it closed the pipe: it is exiting without having joined
            replacement.join(timeout=30)
            self.fail_stop(f"{cause}; its replacement (pid {replacement.pid}) "
                           f"{describe_exit(replacement.exitcode)} before it joined")
        reader.close()
        if questions is not None:
            questions.close()
            self._in_event_loop(journal.redeliver)
        self.replacing = False
        self.restarts[rank] = self.restarts.get(rank, 0) + 1
        log.warning("rank replaced", rank=rank, pid=replacement.pid, restarts=self.restarts[rank],
                    seconds=round(time.monotonic() - started, 3))

    def _answer(self, questions) -> None:
        """A question from rank 0's replacement (handover); a closed pipe is left to the wait loop."""
        try:
            question = questions.recv()
        except EOFError:
            return
        if question == "delivered":
            questions.send(self._in_event_loop(journal.delivered))

    def _in_event_loop(self, fn):
        """``fn(tokenizer_manager)``, run on the tokenizer manager's event loop (which owns its state)."""
        done: concurrent.futures.Future = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn(self.tokenizer_manager))
            except Exception as exc:
                done.set_exception(exc)

        self.tokenizer_manager.event_loop.call_soon_threadsafe(call)
        return done.result(timeout=EVENT_LOOP_TIMEOUT_SECONDS)

    def on_failure_report(self) -> None:
        """A scheduler reported a failure (SIGQUIT): give the watch a moment to name the dead rank (and
        replace it), else stop with the report itself as the reason."""
        deaths = self.deaths
        # A rank that raised exits after SGLang's clean-up (seconds); with replacement on, wait for it.
        deadline = time.monotonic() + (REPORT_WAIT_SECONDS if self.rejoin_timeout_s else 20 * POLL_SECONDS)
        while time.monotonic() < deadline and not self.stopping.is_set() and self.deaths == deaths:
            time.sleep(POLL_SECONDS / 2)
        if self.standing_down:  # as SGLang would: stop the tree (the launcher's clean-up first)
            from sglang.srt.utils import kill_process_tree

            self.clean_up()
            kill_process_tree(os.getpid(), include_parent=True)
            return
        if (self.deaths != deaths or self.replacing) and self.rejoin_timeout_s:
            return  # the reporting rank died, or a replacement is starting: the watch decides
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
        for process in self.processes:  # their segments are removed once their owners are gone
            process.join(timeout=10)
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_replacement(environment: dict, target, args: tuple, questions=None) -> None:
    """A replacement scheduler process: SGLang's own entry point, told which generation it joins
    (rank 0's also gets a pipe for its questions to the main process)."""
    os.environ.update(environment)
    handover.CHANNEL = questions
    target(*args)


# -- wrappers for the main-process patch targets (patches.MAIN_TARGETS) ---------------------------------
def launch_scheduler_processes(wrapped, instance, args, kwargs):
    """``Engine._launch_scheduler_processes``: adopt the TP scheduler processes it started."""
    result = wrapped(*args, **kwargs)
    _, processes = result
    if processes:
        server_args, port_args, target = (kwargs[n] if n in kwargs else args[i] for i, n in enumerate(
            ("server_args", "port_args", "run_scheduler_process_func")))
        SUPERVISOR.launch = (target, server_args, port_args)
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
