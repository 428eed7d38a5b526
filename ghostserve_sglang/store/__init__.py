"""Host side of GhostServe: per-rank parity shards in shared memory and the drain that fills them.

May import: codec, threads, shm.
"""

from .drain import ON_FULL, DrainCounters, ParityDrain
from .geometry import StoreError, StoreGeometry
from .segment import EXISTING, ParitySegment, ReadResult, remove_orphans, segment_path

__all__ = [
    "EXISTING", "ON_FULL", "DrainCounters", "ParityDrain", "ParitySegment", "ReadResult", "StoreError",
    "StoreGeometry", "remove_orphans", "segment_path",
]
