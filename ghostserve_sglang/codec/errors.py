"""Named codec errors. Callers (and tests) match on the type; the message is one line for people."""


class CodecError(ValueError):
    """Base class of every error the codec raises."""


class GeometryError(CodecError):
    """The code cannot be built with these shard counts."""


class ShardCountError(CodecError):
    """A call was given a number of shards other than data_shards + parity_shards."""


class ShardSizeError(CodecError):
    """Shards differ in shape, dtype or device, or are not contiguous."""


class TooFewShardsError(CodecError):
    """More shards are missing than the code can rebuild."""
