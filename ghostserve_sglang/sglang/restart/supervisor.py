"""Supervision of the TP scheduler processes from SGLang's main process (see docs/rank-restart.md).

Stock SGLang learns of a scheduler's death twice: its ``SubprocessWatchdog`` polls the processes every
second, and a surviving rank whose collective failed sends SIGQUIT; either way the main process kills
the process tree about 5 s later, and every client sees its connection closed without a response.

Under GhostServe the supervisor owns that decision. It polls the scheduler processes every
``POLL_SECONDS``; when one has died it logs which rank and how (exit code or signal), announces a fresh
rendezvous in the membership file, and starts a replacement process for that rank with the same
arguments. The survivors hold meanwhile; the replacement joins them, receives their state and has its
KV rebuilt (``rejoin``), then reports ready through its pipe as at start-up. If another rank dies
meanwhile, the replacement starts again with that rank included. A survivor that has not reached the
rendezvous ``STRAGGLER_SECONDS`` after the announcement, while another survivor has, is stuck in a
collective its peers have left: the supervisor ends it (SIGKILL) and it is replaced with the others. A
rank that hangs while serving (its progress stamp stays in one phase longer than
``--ghost-hang-timeout-seconds`` while a peer waits for it in a collective; ``liveness``) is ended the
same way and replaced as a dead one; ``/health`` answers 503 from then until the replacement joined. If
no rank survives, a replacement dies, or the replacements have not joined by
``--ghost-rejoin-timeout-seconds``, the outcome is a clean fail stop: every request still pending gets an
error response naming the cause, the process tree is stopped, and one log line says why. Deaths of other
processes (the detokenizer) keep SGLang's handling.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time

import structlog

from ... import threads
from . import journal, liveness, membership
from .policy import RestartPolicy
from .standby import Standbys

log = structlog.get_logger("ghostserve.supervisor")

POLL_SECONDS = 0.2
FAIL_STOP_GRACE_SECONDS = 1.0  # lets the error responses reach their clients
REPORT_WAIT_SECONDS = 60.0
STRAGGLER_SECONDS = 10.0  # a survivor reaches the rendezvous within a second or two of the announcement
EVENT_LOOP_TIMEOUT_SECONDS = 30.0  # how long a scheduler that reported a failure (SIGQUIT) may take to exit
FENCE_SECONDS = 10.0  # how long a hung rank ended with SIGKILL may take to exit (uninterruptible sleep)


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
        self.hang_timeout_s = 0.0  # 0: hangs are not looked for
        # pid -> (what it was doing, when it was ended, how long its stamp had stood still then)
        self.hung: dict[int, tuple[str, float, float]] = {}
        self.generation = 0
        self.started_at = 0.0  # when the scheduler processes were adopted (wall clock)
        self.restarts: dict[int, int] = {}
        self.policy = RestartPolicy()
        self.replaced_at: dict[int, list[float]] = {}  # tp rank -> when its replacements started
        self.standbys = Standbys()
        self.stuck: set[int] = set()  # pids ended for not reaching a rendezvous
        self.deaths = 0
        self.serving = False  # every scheduler reported ready at start
        self.replacing = False  # a replacement has been started and has not joined yet
        self.standing_down = False  # the server is being stopped on purpose
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop_lock = threading.Lock()

    def configure(self, clean_up, instance_id: str = "", rejoin_timeout_s: float = 0.0,
                  hang_timeout_s: float = 0.0, policy: RestartPolicy | None = None,
                  standbys: int = 0) -> None:
        """``clean_up`` removes what a stopped server leaves (host segments, control socket); with a
        ``rejoin_timeout_s``, a dead rank is replaced (it must rejoin within that time) as often as
        ``policy`` allows, from one of ``standbys`` warm processes while there is one, and with a
        ``hang_timeout_s`` a hung one too."""
        self.clean_up, self.instance_id, self.rejoin_timeout_s = clean_up, instance_id, rejoin_timeout_s
        self.hang_timeout_s, self.policy = hang_timeout_s, policy or RestartPolicy()
        self.standbys = Standbys(standbys if rejoin_timeout_s else 0)

    # -- wiring, from the main-process wrappers -----------------------------------------------------
    def adopt(self, processes: list) -> None:
        """The scheduler processes, in TP rank order, right after SGLang started them."""
        self.processes = list(processes)
        self.started_at = time.time()
        if self._thread is None:
            self._thread = threads.daemon(self._watch, "ghostserve-supervisor")
            self._thread.start()

    def attach_tokenizer_manager(self, tokenizer_manager) -> None:
        self.tokenizer_manager = tokenizer_manager

    def supervises(self, process) -> bool:
        return any(process is p for p in self.processes)

    # -- the watch ----------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._tick():
            dead = self._dead() if self.serving else []  # a start that fails is SGLang's to report
            if dead:
                # A survivor whose collective failed exits too; the one a signal ended is the cause.
                rank, process = min(dead, key=lambda d: (d[1].exitcode >= 0, d[0]))
                if self._shutting_down(process):
                    self.standing_down = True
                    log.info("scheduler processes stopped with the server; not a fault", rank=rank)
                    self.stopping.set()
                    return
                self._on_death(self._dead())  # deaths within the shutdown check's wait count as one
            elif self.serving and self.hang_timeout_s and self.rejoin_timeout_s:
                self._check_hangs()
            if self.serving and not self.replacing and not self.stopping.is_set() and self._up():
                self.standbys.keep()  # from the end of SGLang's warm-up on: not beside the first forwards

    def _check_hangs(self) -> None:
        """End the ranks ``liveness.judge`` finds hung (SIGKILL: a stopped or stuck process runs no
        handler); the next poll finds them dead and replaces them. One that does not exit within
        ``FENCE_SECONDS`` (uninterruptible sleep) ends in a fail stop."""
        now = time.monotonic()
        for pid, (_, ended_at, _) in self.hung.items():
            alive = any(p.pid == pid and p.exitcode is None for p in self.processes)
            if alive and now - ended_at > FENCE_SECONDS:
                self.fail_stop(f"TP rank process pid {pid} hung and did not exit within {FENCE_SECONDS:g} s "
                               "of SIGKILL (uninterruptible sleep?)")
        stamps = liveness.read(self.instance_id, len(self.processes), now)
        if stamps is None or any(s.pid != p.pid for s, p in zip(stamps, self.processes)):
            return  # a rank has not stamped yet
        stopped = {r for r, p in enumerate(self.processes) if liveness.stopped(p.pid)}
        verdict = liveness.judge(stamps, self.hang_timeout_s, stopped)
        for rank in verdict.hung:
            process, stamp = self.processes[rank], stamps[rank]
            if process.pid in self.hung or process.exitcode is not None:
                continue
            what = f"hung in {liveness.PHASES[stamp.phase]} for {stamp.age:.1f} s and was ended"
            log.error("rank hung; ending it so that it is replaced", rank=rank, pid=process.pid,
                      reason=verdict.reason, detect_seconds=round(stamp.age, 3),
                      waited_seconds=round(verdict.stalled_seconds, 3), **liveness.describe(stamp))
            self.hung[process.pid] = (what, now, stamp.age)
            self._set_health(False)
            process.kill()

    def _up(self) -> bool:
        """Whether SGLang reports the server up (its warm-up done; no replacement under way)."""
        from sglang.srt.managers.tokenizer_manager import ServerStatus

        return getattr(self.tokenizer_manager, "server_status", None) == ServerStatus.Up

    def _set_health(self, up: bool) -> None:
        """``/health`` and ``/ready`` answer 503 while ``up`` is False (SGLang's own start-up state)."""
        from sglang.srt.managers.tokenizer_manager import ServerStatus

        status = ServerStatus.Up if up else ServerStatus.Starting
        with contextlib.suppress(Exception):  # the server may be stopping
            self._in_event_loop(lambda tm: setattr(tm, "server_status", status))

    def _tick(self) -> bool:
        """Wait ``POLL_SECONDS``, or less when a scheduler process ends meanwhile (its death is handled
        at once, not at the next poll). Returns whether the supervisor is stopping."""
        running = [p.sentinel for p in self.processes if p.exitcode is None] if self.serving else []
        if running and not self.stopping.is_set():
            multiprocessing.connection.wait(running, timeout=POLL_SECONDS)
            return self.stopping.is_set()
        return self.stopping.wait(POLL_SECONDS)

    def _dead(self, excluding=()) -> list[tuple[int, object]]:
        return [(r, p) for r, p in enumerate(self.processes)
                if p.exitcode is not None and r not in excluding]

    def _shutting_down(self, process) -> bool:
        """Whether the server is being stopped: SGLang's SIGTERM handler ran in this process, or a TERM
        or INT reached every scheduler (Ctrl-C, ``kill -TERM -<pgid>``). The same signal to one
        scheduler is a fault. Waits briefly first, so that a shutdown's own handler has run and deaths
        close together (several ranks killed at once end up to half a second apart while the kernel
        tears them down) are replaced together."""
        time.sleep(2 * POLL_SECONDS)
        if getattr(self.tokenizer_manager, "gracefully_exit", False):
            return True
        return all(p.exitcode in (-signal.SIGTERM, -signal.SIGINT) for p in self.processes)

    def _describe(self, dead: list) -> str:
        self.deaths += len(dead)
        for rank, process in dead:
            log.error("rank process died", rank=rank, pid=process.pid, exitcode=process.exitcode,
                      how=self._how(process))
        return ", and ".join(f"TP rank {r}'s scheduler process (pid {p.pid}) {self._how(p)}" for r, p in dead)

    def _how(self, process) -> str:
        if process.pid in self.stuck:
            return "did not reach the rendezvous and was ended"
        if process.pid in self.hung:
            return self.hung[process.pid][0]
        return describe_exit(process.exitcode)

    def _on_death(self, dead: list) -> None:
        cause = self._describe(dead)
        if not self.rejoin_timeout_s:
            self.fail_stop(f"{cause}; the server cannot continue without it")
        self._refuse_crash_loop([r for r, _ in dead], cause)
        self._replace(sorted(r for r, _ in dead), cause)

    def _refuse_crash_loop(self, ranks: list[int], cause: str) -> None:
        """Fail stop instead of replacing a rank the restart policy says has died too often."""
        now = time.monotonic()
        for rank in ranks:
            refused = self.policy.refusal(rank, self.replaced_at.get(rank, []), now)
            if refused:
                self.fail_stop(f"{cause}; {refused}")
            self.replaced_at.setdefault(rank, []).append(now)

    def _replace(self, ranks: list[int], cause: str) -> None:
        """Start a replacement for each of ``ranks`` and wait until they have joined. If another rank
        dies meanwhile, start again with it included (a new generation); fail stop if no rank is left
        to take the state from, if a replacement fails by itself, or at the deadline."""
        started = time.monotonic()
        deadline = started + self.rejoin_timeout_s
        self.replacing = True
        self._set_health(False)
        while True:
            if len(ranks) == len(self.processes):
                self.fail_stop(f"{cause}; no rank survives to take the scheduler state from")
            self.generation += 1
            port = _free_port()
            pids = {r: self.processes[r].pid for r in ranks}
            hung = {r: self.hung[pid][2] for r, pid in pids.items() if pid in self.hung}
            membership.announce(self.instance_id, self.generation, port, ranks, hung)
            announced = time.monotonic()
            spawned = {rank: self._spawn(rank, port) for rank in ranks}
            more = self._await_join(spawned, deadline, cause, announced)
            if not more:
                break
            for process, *pipes in spawned.values():  # this attempt is void: start again with them
                if process.exitcode is None:
                    process.kill()
                process.join(timeout=30)
                for pipe in filter(None, pipes):
                    pipe.close()
            time.sleep(2 * POLL_SECONDS)  # deaths close together are replaced together
            more = self._dead(excluding=set(ranks))
            cause = f"{cause}; then {self._describe(more)} while it was being replaced"
            ranks = sorted({*ranks, *(r for r, _ in more)})
        if 0 in ranks:
            self._in_event_loop(journal.redeliver)
        membership.remove(self.instance_id)  # every rank has read it; the next death writes a new one
        removed = remove_orphaned_semaphores(self.started_at)
        self.replacing = False
        self._set_health(True)
        for rank in ranks:
            self.restarts[rank] = self.restarts.get(rank, 0) + 1
            log.warning("rank replaced", rank=rank, pid=self.processes[rank].pid,
                        restarts=self.restarts[rank], generation=self.generation,
                        seconds=round(time.monotonic() - started, 3), semaphores_removed=len(removed))

    def _spawn(self, rank: int, port: int) -> tuple:
        """A replacement process for ``rank``, started; with its ready pipe (and rank 0's question
        pipe: its replacement asks the main process what the clients have received, see handover)."""
        target, server_args, port_args = self.launch
        gpu_id = server_args.base_gpu_id + rank * server_args.gpu_id_step  # as SGLang placed it (pp = 1)
        args = (server_args, port_args, gpu_id, rank, 0, None)  # and the ready pipe's writing end
        environment = {membership.REPLACEMENT_ENV: str(self.generation),
                       membership.REPLACEMENT_RANK_ENV: str(rank),
                       "SGLANG_DISTRIBUTED_INIT_METHOD_OVERRIDE": f"tcp://127.0.0.1:{port}"}
        (replacement, reader, questions), warm = self.standbys.start(environment, target, args, rank)
        dead, self.processes[rank] = self.processes[rank], replacement
        dead.join(timeout=10)
        with contextlib.suppress(ValueError):  # still running: left to the garbage collector
            dead.close()  # its sentinel descriptor
        log.warning("replacing rank", rank=rank, pid=replacement.pid, generation=self.generation, port=port,
                    standby=warm)
        return replacement, reader, questions

    def _await_join(self, spawned: dict, deadline: float, cause: str, announced: float) -> list:
        """Wait until every replacement in ``spawned`` reported ready. Returns the other ranks that
        died (or were ended as stuck) meanwhile, then the caller starts again; ``[]`` once all have
        joined."""
        joined: set[int] = set()
        while len(joined) < len(spawned):
            time.sleep(POLL_SECONDS)
            more = self._dead(excluding=set(spawned))
            if more:
                return more
            if time.monotonic() - announced > STRAGGLER_SECONDS:
                self._end_stragglers(set(spawned))
            for rank, (process, reader, questions) in spawned.items():
                if questions is not None and not questions.closed and questions.poll():
                    self._answer(questions)
                if rank in joined or not reader.poll():
                    if rank not in joined and process.exitcode is not None and not reader.poll():
                        self.fail_stop(f"{cause}; its replacement (pid {process.pid}) "
                                       f"{describe_exit(process.exitcode)} before it joined")
                    continue
                try:
                    reader.recv()
                except EOFError:  # it closed the pipe: it is exiting without having joined
                    process.join(timeout=30)
                    self.fail_stop(f"{cause}; its replacement (pid {process.pid}) "
                                   f"{describe_exit(process.exitcode)} before it joined")
                joined.add(rank)
            if time.monotonic() > deadline:
                self.fail_stop(f"{cause}; its replacement did not join within --ghost-rejoin-timeout-"
                               f"seconds={self.rejoin_timeout_s:g}")
        for _, reader, questions in spawned.values():
            reader.close()
            if questions is not None:
                questions.close()
        return []

    def _end_stragglers(self, replaced: set[int]) -> None:
        """End the survivors that have not reached this generation's rendezvous while another survivor
        has. Such a rank is blocked in a collective whose other members have left it (gloo fails a
        wait only on a closed connection, and a peer that moved on keeps its connections open), so it
        would never arrive. Ended, it is found dead by the next poll and replaced with the others."""
        survivors = [r for r in range(len(self.processes)) if r not in replaced]
        arrived = membership.arrived(self.instance_id, self.generation, survivors)
        if not arrived:
            return
        for rank in survivors:
            process = self.processes[rank]
            if rank not in arrived and process.exitcode is None and process.pid not in self.stuck:
                log.error("rank did not reach the rendezvous; ending it so that it is replaced too",
                          rank=rank, pid=process.pid, generation=self.generation,
                          waited_seconds=STRAGGLER_SECONDS, arrived=arrived)
                self.stuck.add(process.pid)
                process.kill()

    def _answer(self, questions) -> None:
        """A question from rank 0's replacement (handover); a closed pipe is left to the wait loop."""
        try:
            question = questions.recv()
        except EOFError:
            questions.close()
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


def remove_orphaned_semaphores(since: float, directory: str = "/dev/shm") -> list[str]:
    """Remove the named semaphores Python's multiprocessing made (``sem.mp-*``) since ``since`` that no
    process has mapped any more: a killed scheduler leaves its own, and Python's resource tracker removes
    them only when the server stops. Every process that can use a semaphore has it mapped (glibc maps
    it under the name of the temporary file it was created as, so it is matched by inode)."""
    device = os.stat(directory).st_dev
    mapped: set[int] = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        with contextlib.suppress(OSError), open(maps) as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith(directory + "/"):
                    mapped.add(int(fields[4]))
    removed = []
    for path in glob.glob(os.path.join(directory, "sem.mp-*")):
        with contextlib.suppress(FileNotFoundError):
            stat = os.stat(path)
            if stat.st_dev == device and stat.st_ino not in mapped and stat.st_mtime >= since:
                os.unlink(path)
                removed.append(os.path.basename(path))
    return removed

