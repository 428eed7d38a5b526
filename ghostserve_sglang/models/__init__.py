"""Models bundled for trying and testing GhostServe without a download: two-layer Llamas whose seeded
weights sit at a real scale, so their greedy output depends on the whole context held in the KV cache,
plus a byte-level BPE tokenizer, so they take text.

- ``tiny-llama``: 12 attention heads and 12 KV heads of dim 16 (multi-head attention).
- ``tiny-llama-gqa``: 24 attention heads sharing 12 KV heads of dim 16 (grouped-query attention).

Both divide by TP sizes 1 to 4. Only ``config.json`` and ``SHA256SUMS`` are committed; the weights and
tokenizer are generated on first use (about a second) by :mod:`.build`, next to them when the package
folder is writable and otherwise under ``~/.cache/ghostserve-sglang/models``. Serve them with
``--dtype float32``: SGLang would otherwise serve the float32 weights in float16, and then concurrent
requests' greedy outputs depend on how they are batched.

May import: nothing else in the package.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import build

HERE = Path(__file__).parent
NAMES = ("tiny-llama", "tiny-llama-gqa")


def check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"model {name!r} is not bundled; bundled: {', '.join(NAMES)}")


def path(name: str = "tiny-llama") -> Path:
    """The folder of bundled model ``name``, generated first if it is not there yet."""
    check_name(name)
    source = HERE / name
    if build.is_built(source):
        return source
    if os.access(source, os.W_OK):
        build.build(source, source)
        return source
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ghostserve-sglang" / "models"
    target = cache / name
    if not build.is_built(target) or build.expected_sums(target) != build.expected_sums(source):
        build.build(source, target)
    return target
