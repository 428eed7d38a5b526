"""The wrappers installed in SGLang's main process when the launcher protects the server
(``patches.MAIN_TARGETS``): they hand the TP scheduler processes, the tokenizer manager and the
failure reports of the ranks to the supervisor (``restart.supervisor``; docs/rank-restart.md)."""

from __future__ import annotations

import signal

from ... import threads
from ..restart.supervisor import SUPERVISOR


def launch_scheduler_processes(wrapped, instance, args, kwargs):
    """``Engine._launch_scheduler_processes``: adopt the TP scheduler processes it started."""
    result = wrapped(*args, **kwargs)
    _, processes = result
    if processes:
        server_args, port_args, target = (kwargs[n] if n in kwargs else args[i] for i, n in enumerate(
            ("server_args", "port_args", "run_scheduler_process_func")))
        SUPERVISOR.launch = (target, server_args, port_args)
        host = "127.0.0.1"  # node 0's, where the rendezvous of a replacement is
        if server_args.nnodes > 1:
            host = server_args.dist_init_addr.rpartition(":")[0].strip("[]")
        SUPERVISOR.adopt(processes, server_args.tp_size, server_args.node_rank, server_args.nnodes, host)
        if server_args.node_rank > 0:
            # Node >= 1's launcher waits here for its original processes; replacements are the
            # supervisor's, which ends the wait when node 0 is gone or the server fails stop.
            result[0].block_until_scheduler_exits = SUPERVISOR.stopping.wait
            # A rank that raises reports it with SIGQUIT, whose handler there stops every process of the
            # node; the supervisor sees the rank end and has it replaced instead.
            signal.signal(signal.SIGQUIT, lambda *_: None)
    return result


def wait_for_scheduler_ready(wrapped, instance, args, kwargs):
    """``engine._wait_for_scheduler_ready``: from here on the server is up and a death is the
    supervisor's to handle; before it, SGLang's start-up sees the death and fails the start."""
    result = wrapped(*args, **kwargs)
    SUPERVISOR.serving = True
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
    rank); the event loop must keep running meanwhile so the error responses can be sent. When the
    server is being stopped, SGLang's handler kills the whole tree, the launcher included, so the
    launcher's clean-up runs first."""
    if SUPERVISOR.standing_down:
        SUPERVISOR.clean_up()
    if not SUPERVISOR.processes or SUPERVISOR.standing_down:
        return wrapped(*args, **kwargs)
    threads.daemon(SUPERVISOR.on_failure_report, "ghostserve-fail-stop").start()
