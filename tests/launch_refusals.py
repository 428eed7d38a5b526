"""Runs the launcher's start-up checks for several argument lists in this one process (SGLang is
imported once), for tests/test_compatibility.py. Reads a JSON list of argument lists on stdin and prints,
for each, a JSON object: the exit status, what it printed on stderr, the processes it left running and
the GhostServe files it left in /dev/shm."""

import contextlib
import io
import json
import os
import sys

import psutil

from ghostserve_sglang import launch


def ghostserve_files() -> list[str]:
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith("ghostserve-"))


def main() -> None:
    results = []
    for argv in json.load(sys.stdin):
        err, status, files = io.StringIO(), None, ghostserve_files()
        with contextlib.redirect_stderr(err):
            try:
                launch.main(argv)
            except SystemExit as exc:
                status = exc.code
        results.append({"status": status, "stderr": err.getvalue(),
                        "children": [p.pid for p in psutil.Process().children(recursive=True)],
                        "new_files": sorted(set(ghostserve_files()) - set(files))})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
