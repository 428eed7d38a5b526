"""``python -m ghostserve_sglang.launch [sglang.launch_server flags] [--ghost-* flags]``

Starts a stock SGLang server with GhostServe's protection. SGLang's flags pass through unchanged; the
``--ghost-*`` flags are split off, validated against the server's parallel layout and exported as
``GHOSTSERVE_*`` variables for SGLang's spawned processes, where the plugin entry point installs the
patches. Bad settings are refused with one line before SGLang starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.request

from . import logs, settings
from .control import socket_path
from .settings import SettingsError
from .sglang import cpu_compat
from .sglang.patches import PatchError, check_supported
from .store import remove_orphans


def _fail(message: object) -> None:
    print(f"ghostserve: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _print_help() -> None:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(
        prog="python -m ghostserve_sglang.launch",
        description="An SGLang server whose KV cache is protected by erasure-code parity in host "
                    "memory. Takes every sglang.launch_server flag, plus the --ghost-* flags below.")
    ServerArgs.add_cli_args(parser)
    settings.add_arguments(parser)
    parser.print_help()


def _announce_when_ready(host: str, port: int, instance_id: str) -> None:
    """Tell the operator where the server is and how to check its protection, once it answers."""
    url = f"http://{host}:{port}"
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        time.sleep(1)
    cli = os.path.join(sys.prefix, "bin", "ghostserve")
    cli = cli if os.path.exists(cli) else "ghostserve"
    body = json.dumps({"input_ids": [1, 2, 3, 4], "sampling_params": {"max_new_tokens": 8,
                                                                       "temperature": 0}})
    print(f"\nGhostServe-protected SGLang server ready at {url}\n"
          f"  try:    curl -s {url}/generate -H 'Content-Type: application/json' -d '{body}'\n"
          f"  status: {cli} --instance-id {instance_id} status\n"
          f"  check:  {cli} --instance-id {instance_id} scrub\n", file=sys.stderr, flush=True)


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
    try:
        chosen.check_topology(server_args.tp_size, server_args.pp_size, server_args.dp_size)
        if chosen.enabled and not chosen.allow_unsupported_sglang:
            check_supported()
    except (SettingsError, PatchError) as exc:
        _fail(exc)
    environment = chosen.to_env()
    instance_id = chosen.instance_id or str(server_args.port)
    environment["GHOSTSERVE_INSTANCE_ID"] = instance_id
    os.environ.update(environment)
    if server_args.device == "cpu":
        for name, value in cpu_compat.tp_environment(server_args.tp_size).items():
            os.environ.setdefault(name, value)
    logs.configure(chosen.log_format)
    load_plugins()
    if chosen.enabled:
        threading.Thread(target=_announce_when_ready, args=(server_args.host, server_args.port, instance_id),
                         daemon=True).start()
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
        for path in remove_orphans(instance_id) if chosen.enabled else []:
            print(f"ghostserve: removed {path}", file=sys.stderr)
        stale_socket = socket_path(instance_id)
        if chosen.enabled and os.path.exists(stale_socket):
            os.unlink(stale_socket)


if __name__ == "__main__":
    main()
