"""Where this node's GhostServe files live: the host parity segments, progress stamps, exchange
mailboxes and control socket of a server, in one shared-memory directory per node
(``--ghost-shm-dir``, default ``/dev/shm``), exported by the launcher to every process it starts.

May import: nothing else in the package.
"""

from __future__ import annotations

import os

ENV = "GHOSTSERVE_SHM_DIR"


def shm_dir() -> str:
    return os.environ.get(ENV) or "/dev/shm"
