"""Erasure codec: N ranks' KV bytes in, m parity shards out, and back.

>>> code = new_code("rs", data_shards=4, parity_shards=2)
>>> parity = code.encode(shards)                      # 4 tensors in, 2 out
>>> whole = code.reconstruct([None, s1, None, s3, *parity])

May import: nothing else in the package.
"""

from .backends import BACKENDS, available_backends, select_backend
from .codes import CODES, ErasureCode, new_code
from .errors import CodecError, GeometryError, ShardCountError, ShardSizeError, TooFewShardsError

__all__ = [
    "BACKENDS", "CODES", "CodecError", "ErasureCode", "GeometryError", "ShardCountError",
    "ShardSizeError", "TooFewShardsError", "available_backends", "new_code", "select_backend",
]
