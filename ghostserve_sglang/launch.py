"""``python -m ghostserve_sglang.launch [sglang.launch_server flags] [--ghost-* flags]``

Starts a stock SGLang server with GhostServe's protection. SGLang's flags pass through unchanged; the
``--ghost-*`` flags are split off, validated against the server's parallel layout and exported as
``GHOSTSERVE_*`` variables for SGLang's spawned processes, where the plugin entry point installs the
patches. Bad settings are refused with one line before SGLang starts.

May import: anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
import threading
import time
import urllib.request

from . import logs, settings, threads
from .control import socket_path
from .drills import process as process_drills
from .settings import SettingsError
from .sglang.patching import compatibility, cpu_compat, refusal
from .sglang.patching.patches import MAIN_PATCHER, PatchError, check_supported, load_spec
from .sglang.protection import exchange
from .sglang.restart import coordination, liveness, membership, nodes, semaphores
from .sglang.restart.policy import RestartPolicy
from .sglang.restart.supervisor import SUPERVISOR
from .shm import shm_dir
from .store import remove_orphans

# What a dead rank's replacement needs from every scheduler process (docs/rank-restart.md): the launcher
# supervises them; the prefix tree is SGLang's Python core, whose state can be copied to a replacement; the
# request broadcast uses plain gloo groups, which the ranks re-form.
RESTART_ENVIRONMENT = {
    membership.SUPERVISED_ENV: "1",
    "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND": "python",
    "SGLANG_USE_MESSAGE_QUEUE_BROADCASTER": "0",
}


def _fail(message: object) -> None:
    print(f"ghostserve: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _print_help() -> None:
    from sglang.srt.server_args import ServerArgs

    refused = ", ".join(option.flag for option in compatibility.REFUSED_OPTIONS)
    parser = argparse.ArgumentParser(
        prog="python -m ghostserve_sglang.launch", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="An SGLang server whose KV cache is protected by erasure-code parity in host "
                    "memory. Takes every sglang.launch_server flag, plus the --ghost-* flags below.",
        epilog="\n".join(textwrap.wrap(
            f"Protected: one tensor-parallel group of a model with MHA or GQA attention, on one node or "
            f"several (--nnodes: run this launcher on every node), --page-size 1 or 16, radix cache on or "
            f"off, chunked prefill on or off, --kv-cache-dtype auto or fp8. "
            f"Refused at start, in one line, unless --ghost-code off: {refused}; models with MLA, hybrid "
            f"sliding-window or hybrid linear attention. SGLang releases: "
            f"{', '.join(load_spec()['releases'])} (ghostserve check-sglang checks the installed one).",
            width=100, break_on_hyphens=False)))
    ServerArgs.add_cli_args(parser)
    settings.add_arguments(parser)
    parser.print_help()


def _banner(server_args, instance_id: str) -> str:
    """Where the server is, a request to try (text when it has a tokenizer), where its metrics are, and
    the two commands that check its protection."""
    url = f"http://{server_args.host}:{server_args.port}"
    json_header = "-H 'Content-Type: application/json'"
    sampling = {"max_new_tokens": 16, "temperature": 0}
    lines = [f"GhostServe-protected SGLang server ready at {url}"]
    if server_args.skip_tokenizer_init:
        body = json.dumps({"input_ids": [1, 2, 3, 4], "sampling_params": sampling})
        lines.append(f"  try:     curl -s {url}/generate {json_header} -d '{body}'")
    else:
        body = json.dumps({"text": "The server keeps every request", "sampling_params": sampling})
        model = server_args.served_model_name or server_args.model_path
        chat = json.dumps({"model": model, "max_tokens": 16, "temperature": 0,
                           "messages": [{"role": "user", "content": "Where is the parity kept?"}]})
        lines.append(f"  try:     curl -s {url}/generate {json_header} -d '{body}'")
        lines.append(f"  chat:    curl -s {url}/v1/chat/completions {json_header} -d '{chat}'")
    if server_args.enable_metrics:
        lines.append(f"  metrics: curl -s {url}/metrics | grep ^ghostserve_")
    else:
        lines.append("  metrics: off (add --enable-metrics to export the ghostserve_* series at /metrics)")
    cli = os.path.join(sys.prefix, "bin", "ghostserve")
    cli = cli if os.path.exists(cli) else "ghostserve"
    cli += f" --instance-id {instance_id}" + (f" --shm-dir {shm_dir()}" if shm_dir() != "/dev/shm" else "")
    lines.append(f"  status:  {cli} status")
    lines.append(f"  check:   {cli} scrub")
    return "\n".join(lines)


def _node_banner(server_args, instance_id: str) -> str:
    """What node >= 1 is: it serves no API; its ranks joined node 0's."""
    ranks = nodes.layout(server_args.tp_size, server_args.nnodes, server_args.node_rank)
    return "\n".join([
        f"GhostServe node {server_args.node_rank} of {server_args.nnodes} ready: TP ranks {ranks} of "
        f"{server_args.tp_size}, joined node 0 at {server_args.dist_init_addr}",
        "  the API, metrics and `ghostserve status` (every rank, with its node) are on node 0; this node "
        f"replaces its own ranks (instance {instance_id})"])


def _announce_when_ready(server_args, instance_id: str) -> None:
    """Print the banner once the server answers (node >= 1: once its ranks are ready)."""
    if server_args.node_rank > 0:
        while not SUPERVISOR.serving:
            time.sleep(1)
        print(f"\n{_node_banner(server_args, instance_id)}\n", file=sys.stderr, flush=True)
        return
    while True:
        try:
            with urllib.request.urlopen(f"http://{server_args.host}:{server_args.port}/health",
                                        timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        time.sleep(1)
    print(f"\n{_banner(server_args, instance_id)}\n", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        _print_help()
        return
    ghost_parser = argparse.ArgumentParser(add_help=False)
    settings.add_arguments(ghost_parser)
    namespace, sglang_argv = ghost_parser.parse_known_args(argv)
    try:
        chosen = settings.from_arguments(namespace)
    except SettingsError as exc:
        _fail(exc)

    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    server_args = prepare_server_args(sglang_argv)
    if chosen.enabled and server_args.tp_size > 1 and not server_args.disable_overlap_schedule:
        # A replacement rank resumes SGLang's plain loop; one rank alone has no survivor to rejoin.
        server_args = prepare_server_args([*sglang_argv, "--disable-overlap-schedule"])
    if chosen.enabled and not chosen.allow_unsupported_sglang:
        try:
            check_supported()
        except PatchError as exc:
            _fail(exc)
    refused = compatibility.refusal(server_args, chosen) if chosen.enabled else None
    if refused is not None:
        _fail(refused)
    coordinator = _coordinator(server_args, chosen) if chosen.enabled and server_args.tp_size > 1 else None
    if chosen.enabled and server_args.tp_size > 1 and chosen.hang_timeout_seconds:
        _watchdog_after_replacement(server_args, chosen)
    environment = chosen.to_env()
    instance_id = chosen.instance_id or str(server_args.port)
    environment["GHOSTSERVE_INSTANCE_ID"] = instance_id
    if chosen.enabled:
        environment.update(RESTART_ENVIRONMENT)
        if coordinator is not None:
            environment[coordination.ENV] = coordinator
    os.environ.update(environment)
    if server_args.device == "cpu":
        for name, value in cpu_compat.tp_environment(server_args.tp_size).items():
            os.environ.setdefault(name, value)
    logs.configure(chosen.log_format)
    load_plugins()
    if chosen.enabled:
        SUPERVISOR.configure(lambda: _clean_up(instance_id), instance_id, chosen.rejoin_timeout_seconds,
                             chosen.hang_timeout_seconds,
                             RestartPolicy(chosen.max_restarts, chosen.restart_period_seconds),
                             chosen.standby if server_args.tp_size > 1 else 0)
        try:
            MAIN_PATCHER.install(allow_unsupported=chosen.allow_unsupported_sglang)
        except PatchError as exc:
            _fail(exc)
        threads.daemon(_announce_when_ready, "ghostserve-announce", (server_args, instance_id)).start()
    if chosen.enabled:
        refusal.take(instance_id)  # a stale record, from a start that was killed
    refused = None
    try:
        run_server(server_args)
    except Exception:
        refused = refusal.take(instance_id) if chosen.enabled else None
        if refused is None:
            raise
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
        if chosen.enabled:
            _clean_up(instance_id)
    if refused is not None:
        _fail(refused)


def _coordinator(server_args, chosen) -> str:
    """Where the membership store is (``host:port``); node 0's launcher serves it (``coordination``)."""
    if server_args.nnodes == 1:
        host, port = "127.0.0.1", chosen.coordinator_port
    elif not server_args.dist_init_addr:
        _fail(f"--nnodes={server_args.nnodes} needs --dist-init-addr HOST:PORT (node 0's address)")
    else:
        host, _, dist_port = server_args.dist_init_addr.rpartition(":")
        host = host.strip("[]")
        port = chosen.coordinator_port or int(dist_port) + 1
        if server_args.node_rank > 0:
            return f"{host}:{port}"
    try:
        return coordination.serve(host, port)
    except Exception as exc:
        _fail(f"--ghost-coordinator-port={port}: cannot listen there ({str(exc).splitlines()[0]}); choose a "
              "free port (every node's launcher must be given the same one)")


def _watchdog_after_replacement(server_args, chosen) -> None:
    """SGLang's scheduler watchdog ends the whole server when a batch makes no progress for
    ``--watchdog-timeout``; GhostServe ends and replaces a hung rank instead, which takes up to
    ``--ghost-hang-timeout-seconds`` plus ``--ghost-rejoin-timeout-seconds``. A shorter watchdog is
    raised to that, so that SGLang never stops the server first for a stall GhostServe handles."""
    floor = chosen.hang_timeout_seconds + chosen.rejoin_timeout_seconds
    if server_args.watchdog_timeout < floor:
        print(f"ghostserve: --watchdog-timeout raised from {server_args.watchdog_timeout:g} to {floor:g} s "
              "(--ghost-hang-timeout-seconds + --ghost-rejoin-timeout-seconds): a hung rank is replaced, "
              "not the server stopped", file=sys.stderr, flush=True)
        server_args.watchdog_timeout = floor


_CLEAN_UP_LOCK = threading.Lock()


def _clean_up(instance_id: str) -> None:
    """Remove what a stopped server leaves: its host segments, stamps, membership and control socket.
    Runs from the launcher's exit and from the supervisor's stop (whichever comes first; SGLang's
    SIGQUIT handler may kill the launcher before its exit), one at a time."""
    with _CLEAN_UP_LOCK:
        for path in [*remove_orphans(instance_id), *exchange.remove(instance_id)]:
            print(f"ghostserve: removed {path}", file=sys.stderr)
        if SUPERVISOR.started_at:  # the semaphores of scheduler processes that were killed
            semaphores.remove_orphaned(SUPERVISOR.started_at)
        liveness.remove(instance_id)
        refusal.take(instance_id)
        process_drills.remove_markers(instance_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path(instance_id))


if __name__ == "__main__":
    main()
