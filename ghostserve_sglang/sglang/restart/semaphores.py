"""The named semaphores a killed scheduler process leaves in ``/dev/shm`` (Python's multiprocessing
makes them; its resource tracker removes them only when the server stops)."""

from __future__ import annotations

import contextlib
import glob
import os


def remove_orphaned(since: float, directory: str = "/dev/shm") -> list[str]:
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

