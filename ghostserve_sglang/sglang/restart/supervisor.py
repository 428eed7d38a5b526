"""Supervision of the TP scheduler processes from SGLang's main process (see docs/rank-restart.md).

Stock SGLang learns of a scheduler's death twice: its ``SubprocessWatchdog`` polls the processes every
second, and a surviving rank whose collective failed sends SIGQUIT; either way the main process kills
the process tree about 5 s later, and every client sees its connection closed without a response.

Under GhostServe the supervisor owns that decision. It polls the scheduler processes every
``POLL_SECONDS``; when one has died it logs which rank and how (exit code or signal), announces a fresh
rendezvous (``membership``), and starts a replacement process for that rank with the same
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

With several nodes (``--nnodes``), each node's launcher supervises the ranks it runs; node 0's decides
every replacement (``nodes``): another node reports its ranks' deaths, starts the replacements announced
for them and reports when they joined. A node whose launcher stops beating is lost with its ranks and
their host parity: a fail stop. A fail stop anywhere stops every node.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time

import structlog

from ... import threads
from . import coordination, hangs, journal, membership, nodes, semaphores
from .follower import Follower
from .frontend import Frontend
from .policy import RestartPolicy
from .standby import Standbys

log = structlog.get_logger("ghostserve.supervisor")

POLL_SECONDS = 0.2
FAIL_STOP_GRACE_SECONDS = 1.0  # lets the error responses reach their clients
REPORT_WAIT_SECONDS = 60.0


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with status {exitcode}"


class Supervisor:
    """Watches the scheduler processes SGLang launched; one instance per main process."""

    def __init__(self) -> None:
        self.processes: dict = {}  # this node's TP ranks -> their scheduler processes
        self.world = 0  # TP ranks on every node
        self.node = 0  # this node's rank; node 0 decides every replacement
        self.nnodes = 1
        self.host = "127.0.0.1"  # node 0's address: where the rendezvous of a replacement is
        self.deaths_reported = nodes.Deaths()  # node 0: the deaths other nodes report
        self.dead_pids: dict[int, int] = {}  # tp rank -> the pid of its last process that ended
        self.heartbeats, self.remote_stamps = nodes.Heartbeats(1), nodes.RemoteStamps(1)  # node 0
        self.follower = Follower(self)  # node >= 1's part
        self.launch: tuple = ()  # run_scheduler_process, server_args, port_args: to start a replacement
        self.frontend = Frontend()  # SGLang's tokenizer manager (node 0)
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
    def adopt(self, processes: list, world: int, node: int, nnodes: int, host: str) -> None:
        """This node's scheduler processes, in TP rank order, right after SGLang started them; ``world``
        TP ranks over ``nnodes`` nodes, ``host`` node 0's address."""
        self.processes = dict(zip(nodes.layout(world, nnodes, node), processes))
        self.world, self.node, self.nnodes, self.host = world, node, nnodes, host
        self.heartbeats, self.remote_stamps = nodes.Heartbeats(nnodes), nodes.RemoteStamps(nnodes)
        self.started_at = time.time()
        if self._thread is None:
            self._thread = threads.daemon(self._watch, "ghostserve-supervisor")
            self._thread.start()

    def attach_tokenizer_manager(self, tokenizer_manager) -> None:
        self.frontend.tokenizer_manager = tokenizer_manager

    def supervises(self, process) -> bool:
        return any(process is p for p in self.processes.values())

    @property
    def decides(self) -> bool:
        """Whether this node's supervisor decides the replacements (node 0)."""
        return self.node == 0

    # -- the watch ----------------------------------------------------------------------------------
    def _watch(self) -> None:
        try:
            if self.rejoin_timeout_s and coordination.configured():
                self._register()
            while not self._tick():
                self._watch_once()
        except coordination.CoordinatorLost as exc:
            if not self.decides:
                self.follower.stand_down(f"node 0 is gone: {exc}")
            else:
                self.fail_stop(f"the membership store failed: {exc}")
        except Exception as exc:
            if self.decides:
                raise
            # Node >= 1's launcher waits for this supervisor to stop (``stopping``): never for ever.
            log.exception("the supervisor failed", node=self.node)
            self.follower.stand_down(f"its supervisor failed: {exc!r}")

    def _register(self) -> None:
        """Make this node known in the membership store (node >= 1: and start beating). Node 0's store
        may not be up yet while the ranks wait for SGLang's rendezvous: tried until they are ready."""
        while True:
            try:
                nodes.register(self.node, sorted(self.processes), os.getpid())
                break
            except coordination.CoordinatorLost:
                if self.serving or self.stopping.wait(1.0):
                    raise
        if not self.decides:
            threads.daemon(self.follower.beat, "ghostserve-heartbeat").start()

    def _watch_once(self) -> None:
        if not self.serving:
            return  # a start that fails is SGLang's to report
        dead = self._dead(excluding=self.follower.following)
        if self.rejoin_timeout_s and self.nnodes > 1:
            self._check_nodes()
        remote = self._reported()
        if remote and not dead and self.frontend.stopping():
            dead = remote = []  # other nodes' ranks stop with the server; this node's are next
        if dead:
            # A survivor whose collective failed exits too; the one a signal ended is the cause.
            rank, process = min(dead, key=lambda d: (d[1].exitcode >= 0, d[0]))
            if self._shutting_down(process):
                self.standing_down = True
                log.info("scheduler processes stopped with the server; not a fault", rank=rank)
                self.stopping.set()
                return
            dead = self._dead(excluding=self.follower.following)  # with those in the check's wait
        if self.decides and self.nnodes > 1 and (dead or remote):  # other nodes report theirs later
            time.sleep(nodes.REPORT_SECONDS)
            dead, remote = self._dead(excluding=self.follower.following), remote + self._reported()
        if self.decides and (dead or remote):
            self._on_death([*self._local(dead), *remote])
        elif dead:
            self.follower.report(dead)
        elif self.hang_timeout_s and self.rejoin_timeout_s:
            hangs.check(self)
        if not self.decides and self.rejoin_timeout_s:
            self.follower.follow()
        if not (self.replacing or self.follower.following or self.stopping.is_set()) and (
                self.node > 0 or self.frontend.up()):
            self.standbys.keep()  # from the end of SGLang's warm-up on: not beside the first forwards

    def _tick(self) -> bool:
        """Wait ``POLL_SECONDS``, or less when a scheduler process ends meanwhile (its death is handled
        at once, not at the next poll). Returns whether the supervisor is stopping."""
        running = [p.sentinel for p in self.processes.values() if p.exitcode is None] if self.serving else []
        if running and not self.stopping.is_set():
            multiprocessing.connection.wait(running, timeout=POLL_SECONDS)
            return self.stopping.is_set()
        return self.stopping.wait(POLL_SECONDS)

    def _dead(self, excluding=()) -> list[tuple[int, object]]:
        return [(r, p) for r, p in self.processes.items()
                if p.exitcode is not None and r not in excluding and p.pid not in self.follower.reported]

    def _local(self, dead: list) -> list[tuple[int, int, str]]:
        return [(r, p.pid, self._how(p)) for r, p in dead]

    def _reported(self) -> list[tuple[int, int, str]]:
        """Node 0 of several: the deaths other nodes reported since the last call (none to ask else)."""
        return self.deaths_reported.new() if self.decides and self.nnodes > 1 else []

    def _shutting_down(self, process) -> bool:
        """Whether the server is being stopped: SGLang's SIGTERM handler ran in this process, or a TERM
        or INT reached every scheduler (Ctrl-C, ``kill -TERM -<pgid>``). The same signal to one
        scheduler is a fault. Waits briefly first, so that a shutdown's own handler has run and deaths
        close together (several ranks killed at once end up to half a second apart while the kernel
        tears them down) are replaced together."""
        time.sleep(2 * POLL_SECONDS)
        if self.frontend.stopping():
            return True
        # Node >= 1's ranks exit with status 0 when node 0 stops the server.
        return all(p.exitcode in (0, -signal.SIGTERM, -signal.SIGINT) for p in self.processes.values())

    def _describe(self, dead: list[tuple[int, int, str]]) -> str:
        """``dead``: (rank, pid, how) of each death, on this node or reported by another."""
        self.deaths += len(dead)
        for rank, pid, how in dead:
            self.dead_pids[rank] = pid
            log.error("rank process died", rank=rank, pid=pid, how=how,
                      node=self.node if rank in self.processes else "another")
        return ", and ".join(f"TP rank {r}'s scheduler process (pid {pid}) {how}" for r, pid, how in dead)

    def _how(self, process) -> str:
        if process.pid in self.stuck:
            return "did not reach the rendezvous and was ended"
        if process.pid in self.hung:
            return self.hung[process.pid][0]
        return describe_exit(process.exitcode)

    def _on_death(self, dead: list[tuple[int, int, str]]) -> None:
        cause = self._describe(dead)
        if not self.rejoin_timeout_s:
            self.fail_stop(f"{cause}; the server cannot continue without it")
        self._refuse_crash_loop(sorted({r for r, _, _ in dead}), cause)
        self._replace(sorted({r for r, _, _ in dead}), cause)

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
        self.frontend.set_health(False)
        while True:
            if len(ranks) == self.world:
                self.fail_stop(f"{cause}; no rank survives to take the scheduler state from")
            self.generation += 1
            port = _free_port()
            pids = {r: self.dead_pids[r] for r in ranks}
            hung = {r: self.hung[pid][2] for r, pid in pids.items() if pid in self.hung}
            membership.announce(self.generation, self.host, port, ranks, hung)
            announced = time.monotonic()
            spawned = {rank: self._spawn(rank, port) for rank in ranks if rank in self.processes}
            more = self._await_join(spawned, [r for r in ranks if r not in spawned], deadline, cause,
                                    announced)
            if not more:
                break
            self._void(spawned)  # this attempt is void: start again with them
            time.sleep(2 * POLL_SECONDS)  # deaths close together are replaced together
            more = [*more, *self._local(self._dead(excluding=set(ranks))), *self._reported()]
            more = list({rank: d for d in more if (rank := d[0]) not in ranks}.values())
            cause = f"{cause}; then {self._describe(more)} while it was being replaced"
            ranks = sorted({*ranks, *(r for r, _, _ in more)})
        if 0 in ranks:
            self.frontend.call(journal.redeliver)
        membership.finish(self.generation)  # every rank has read it; the next death makes a new one
        removed = semaphores.remove_orphaned(self.started_at)
        self.replacing = False
        self.frontend.set_health(True)
        for rank in ranks:
            self.restarts[rank] = self.restarts.get(rank, 0) + 1
            process = self.processes.get(rank)  # None: on another node
            log.warning("rank replaced", rank=rank, pid=process.pid if process else None,
                        restarts=self.restarts[rank], generation=self.generation,
                        seconds=round(time.monotonic() - started, 3), semaphores_removed=len(removed))

    def _void(self, spawned: dict) -> None:
        """End the replacements of an attempt that a later death made void."""
        for process, *pipes in spawned.values():
            if process.exitcode is None:
                process.kill()
            process.join(timeout=30)
            for pipe in filter(None, pipes):
                pipe.close()

    def _spawn(self, rank: int, port: int) -> tuple:
        """A replacement process for ``rank``, started; with its ready pipe (and rank 0's question
        pipe: its replacement asks the main process what the clients have received, see handover)."""
        target, server_args, port_args = self.launch
        local = rank % (self.world // self.nnodes)  # as SGLang placed it on this node (pp = 1)
        gpu_id = server_args.base_gpu_id + local * server_args.gpu_id_step
        args = (server_args, port_args, gpu_id, rank, 0, None)  # and the ready pipe's writing end
        environment = {membership.REPLACEMENT_ENV: str(self.generation),
                       membership.REPLACEMENT_RANK_ENV: str(rank),
                       "SGLANG_DISTRIBUTED_INIT_METHOD_OVERRIDE": f"tcp://{self.host}:{port}"}
        (replacement, reader, questions), warm = self.standbys.start(environment, target, args, rank)
        dead, self.processes[rank] = self.processes[rank], replacement
        dead.join(timeout=10)
        with contextlib.suppress(ValueError):  # still running: left to the garbage collector
            dead.close()  # its sentinel descriptor
        log.warning("replacing rank", rank=rank, pid=replacement.pid, generation=self.generation, port=port,
                    standby=warm)
        return replacement, reader, questions

    def _await_join(self, spawned: dict, elsewhere: list[int], deadline: float, cause: str,
                    announced: float) -> list:
        """Wait until every replacement in ``spawned`` reported ready, and every one of ``elsewhere``
        (started by another node) was reported joined. Returns the deaths (rank, pid, how) of other
        ranks meanwhile, then the caller starts again; ``[]`` once all have joined."""
        joined: set[int] = set()
        while len(joined) < len(spawned) or len(nodes.joined(self.generation, elsewhere)) < len(elsewhere):
            time.sleep(POLL_SECONDS)
            more = [*self._local(self._dead(excluding=set(spawned))), *self._reported()]
            if more:
                return more
            if self.nnodes > 1:
                self._check_nodes()
            if time.monotonic() - announced > membership.STRAGGLER_SECONDS:
                self._end_stragglers(set(spawned) | set(elsewhere))
            for rank, (process, reader, questions) in spawned.items():
                if questions is not None and not questions.closed and questions.poll():
                    self.frontend.answer(questions)
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
        survivors = [r for r in range(self.world) if r not in replaced]
        arrived = membership.arrived(self.generation, survivors)
        if not arrived:
            return
        for rank in [r for r in survivors if r in self.processes]:
            process = self.processes[rank]
            if rank not in arrived and process.exitcode is None and process.pid not in self.stuck:
                log.error("rank did not reach the rendezvous; ending it so that it is replaced too",
                          rank=rank, pid=process.pid, generation=self.generation,
                          waited_seconds=membership.STRAGGLER_SECONDS, arrived=arrived)
                self.stuck.add(process.pid)
                process.kill()

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
        if self.nnodes > 1:
            with contextlib.suppress(Exception):  # every other node stops too
                nodes.request_stop(reason)
        if self.frontend.abort_pending(reason):
            time.sleep(FAIL_STOP_GRACE_SECONDS)
        from sglang.srt.utils import kill_process_tree

        kill_process_tree(os.getpid(), include_parent=False)
        for process in self.processes.values():  # their segments are removed once their owners are gone
            process.join(timeout=10)
        self.clean_up()
        print(f"ghostserve: fail stop: {reason}", file=sys.stderr, flush=True)
        os._exit(1)

    # -- across nodes -----------------------------------------------------------------------------------
    def _check_nodes(self) -> None:
        """Every node: stop when another node's supervisor failed stop. Node 0: fail stop when a node
        stopped beating (its launcher, its ranks and their host parity are gone)."""
        stop = nodes.stop_reason()
        if stop is not None:
            self.fail_stop(stop)
        for node, silent in self.heartbeats.lost() if self.decides else ():
            ranks = nodes.layout(self.world, self.nnodes, node)
            self.fail_stop(f"node {node} (TP ranks {ranks}) has not been heard from for {silent:.1f} s: "
                           "every rank it ran is gone with its host parity, and a whole node's KV cannot "
                           "be rebuilt")

SUPERVISOR = Supervisor()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
