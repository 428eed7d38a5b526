"""What one rank's host parity shard must hold, derived from the KV pool's geometry."""

from __future__ import annotations

import dataclasses
import functools
import json

import torch

from ..codec import new_code

DTYPES = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "uint8": torch.uint8,
}


class StoreError(RuntimeError):
    """A host store cannot be created, attached or used as asked; the message says why in one line."""


@dataclasses.dataclass(frozen=True)
class StoreGeometry:
    """The parity layout of one rank's shard.

    For each slot and layer a rank's K and V bytes (``slot_layer_bytes``) are cut into ``ranks`` column
    chunks; this rank encodes its column and keeps ``parity_shards`` chunks of it per slot and layer
    (xor, rs), or keeps its whole slot bytes (replicate).
    """

    code: str
    ranks: int
    parity_shards: int
    dtype: str
    heads_per_rank: int
    head_dim: int
    layers: int
    slots: int

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise StoreError(f"dtype={self.dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
        new_code(self.code, self.ranks, self.parity_shards)  # raises GeometryError, one line
        for name in ("heads_per_rank", "head_dim", "layers", "slots"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StoreError(f"{name}={value!r} is not allowed; it must be an int >= 1")

    # Sizes are cached: the drain reads them on every step.
    @functools.cached_property
    def slot_layer_bytes(self) -> int:
        """One rank's K and V bytes for one slot in one layer."""
        itemsize = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return 2 * self.heads_per_rank * self.head_dim * itemsize

    @functools.cached_property
    def column_bytes(self) -> int:
        return -(-self.slot_layer_bytes // self.ranks)

    @functools.cached_property
    def record_bytes(self) -> int:
        """Parity bytes one slot takes in this rank's shard (all layers)."""
        if self.code == "replicate":
            return self.layers * self.slot_layer_bytes
        return self.layers * self.parity_shards * self.column_bytes

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StoreGeometry:
        return cls(**json.loads(text))
