"""The erasure codes: ``xor`` (one parity shard), ``rs`` (Reed-Solomon, Cauchy matrix) and
``replicate`` (parity is a full copy of every data shard; the baseline).

API in the style of klauspost/reedsolomon: build a code with ``new_code(code, data_shards,
parity_shards)``, then ``encode``, ``reconstruct`` and ``verify``. Shards are torch tensors of any
dtype; they are treated as their bytes, so no float arithmetic ever touches them. All shards of one
call share shape, dtype and device and are contiguous.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from . import gf256
from .backends import select_backend
from .errors import GeometryError, ShardCountError, ShardSizeError, TooFewShardsError

CODES = ("xor", "rs", "replicate")
MAX_SHARDS = 256  # GF(2^8) has 256 distinct Cauchy points


def _as_bytes(shard: torch.Tensor) -> torch.Tensor:
    return shard.reshape(-1).view(torch.uint8)


def _check_like(shards: Sequence[torch.Tensor | None], what: str) -> torch.Tensor:
    """The first shard given; raises ShardSizeError unless every shard is a contiguous tensor like it."""
    present = [(i, s) for i, s in enumerate(shards) if s is not None]
    if not present:
        raise TooFewShardsError(f"no {what} shard was given")
    first, ref = present[0]
    like = (ref.shape, ref.dtype, ref.device) if isinstance(ref, torch.Tensor) else None
    for i, shard in present:
        if not isinstance(shard, torch.Tensor):
            raise ShardSizeError(f"{what} shard {i} is a {type(shard).__name__}, expected a torch.Tensor")
        if not shard.is_contiguous():
            raise ShardSizeError(f"{what} shard {i} is not contiguous")
        if (shard.shape, shard.dtype, shard.device) != like:
            raise ShardSizeError(
                f"{what} shard {i} is {shard.dtype}{list(shard.shape)} on {shard.device}, "
                f"expected {ref.dtype}{list(ref.shape)} on {ref.device} like shard {first}"
            )
    return ref


class ErasureCode:
    """data_shards data shards protected by parity_shards parity shards.

    Shard index i < data_shards is data; the rest are parity, in order.
    """

    code: str

    def __init__(self, data_shards: int, parity_shards: int, backend: str | None = None) -> None:
        self.data_shards = data_shards
        self.parity_shards = parity_shards
        self.backend = backend

    @property
    def total_shards(self) -> int:
        return self.data_shards + self.parity_shards

    def __repr__(self) -> str:
        return f"{self.code}-{self.data_shards}+{self.parity_shards}"

    def encode(
        self, data: Sequence[torch.Tensor], out: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """The parity shards of ``data`` (written into ``out`` when given), same shape and dtype."""
        data = list(data)
        if len(data) != self.data_shards:
            raise ShardCountError(f"encode got {len(data)} data shards, {self} needs {self.data_shards}")
        ref = _check_like(data, "data")
        if any(s is None for s in data):
            raise TooFewShardsError("encode needs every data shard; use reconstruct for missing ones")
        if out is None:
            parity = [torch.empty_like(ref) for _ in range(self.parity_shards)]
        else:
            parity = list(out)
            if len(parity) != self.parity_shards:
                raise ShardCountError(f"encode got {len(parity)} output shards, {self} makes "
                                      f"{self.parity_shards}")
            _check_like([ref, *parity], "output")
        self._encode_bytes([_as_bytes(s) for s in data], [_as_bytes(p) for p in parity])
        return parity

    def reconstruct(
        self, shards: Sequence[torch.Tensor | None], missing: Iterable[int] = ()
    ) -> list[torch.Tensor]:
        """All shards, with the missing ones rebuilt. A shard is missing when it is None or its index
        is in ``missing``; the shards given are returned as they are, never modified."""
        shards = list(shards)
        if len(shards) != self.total_shards:
            raise ShardCountError(f"reconstruct got {len(shards)} shards, {self} has {self.total_shards}")
        for index in missing:
            if not 0 <= index < self.total_shards:
                raise ShardCountError(f"missing shard index {index} is outside 0..{self.total_shards - 1}")
            shards[index] = None
        ref = _check_like(shards, "given")
        lost = [i for i, s in enumerate(shards) if s is None]
        if not lost:
            return shards
        rebuilt = [torch.empty_like(ref) for _ in lost]
        present = {i: _as_bytes(s) for i, s in enumerate(shards) if s is not None}
        self._rebuild_bytes(present, lost, [_as_bytes(r) for r in rebuilt])
        for index, shard in zip(lost, rebuilt):
            shards[index] = shard
        return shards

    def verify(self, shards: Sequence[torch.Tensor]) -> bool:
        """True when the parity shards match the data shards byte for byte."""
        shards = list(shards)
        if len(shards) != self.total_shards:
            raise ShardCountError(f"verify got {len(shards)} shards, {self} has {self.total_shards}")
        if any(s is None for s in shards):
            raise TooFewShardsError("verify needs every shard")
        _check_like(shards, "given")
        expected = self.encode(shards[: self.data_shards])
        return all(
            torch.equal(_as_bytes(a), _as_bytes(b))
            for a, b in zip(expected, shards[self.data_shards :])
        )

    def _encode_bytes(self, data: list[torch.Tensor], parity: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _rebuild_bytes(
        self, present: dict[int, torch.Tensor], lost: list[int], outputs: list[torch.Tensor]
    ) -> None:
        raise NotImplementedError


class MatrixCode(ErasureCode):
    """A systematic linear code over GF(2^8): parity = P . data. ``xor`` is P = [1 1 ... 1];
    ``rs`` is the Cauchy matrix of ISA-L's gf_gen_cauchy1_matrix. Any data_shards of the
    total_shards rebuild the rest."""

    def __init__(self, code: str, data_shards: int, parity_shards: int, backend: str | None = None):
        super().__init__(data_shards, parity_shards, backend)
        self.code = code
        self._rebuild_matrices: dict[tuple, gf256.Matrix] = {}
        if code == "xor":
            self.parity_rows = [[1] * data_shards]
        else:
            self.parity_rows = gf256.cauchy_parity_rows(data_shards, parity_shards)

    def _apply(self, matrix: gf256.Matrix, sources: list[torch.Tensor], outputs: list[torch.Tensor]):
        select_backend(outputs[0].device, self.backend).apply(matrix, sources, outputs)

    def _encode_bytes(self, data, parity):
        self._apply(self.parity_rows, data, parity)

    def _rebuild_bytes(self, present, lost, outputs):
        if len(present) < self.data_shards:
            raise TooFewShardsError(
                f"{len(lost)} shards are missing ({lost}); {self} rebuilds at most {self.parity_shards}"
            )
        chosen = sorted(present)[: self.data_shards]
        key = (tuple(chosen), tuple(lost))
        if key not in self._rebuild_matrices:
            self._rebuild_matrices[key] = self._rebuild_matrix(*key)
        matrix = self._rebuild_matrices[key]
        self._apply(matrix, [present[i] for i in chosen], outputs)

    def _rebuild_matrix(self, chosen: tuple[int, ...], lost: tuple[int, ...]) -> gf256.Matrix:
        """Rows that map the chosen surviving shards to the lost ones."""
        generator = [[int(i == j) for j in range(self.data_shards)] for i in range(self.data_shards)]
        generator += self.parity_rows
        decode = gf256.invert([generator[i] for i in chosen])
        return gf256.matmul([generator[i] for i in lost], decode)


class ReplicateCode(ErasureCode):
    """Parity shard k + i is a copy of data shard i: host memory and traffic of a full replica."""

    code = "replicate"

    def _encode_bytes(self, data, parity):
        for src, dst in zip(data, parity):
            dst.copy_(src)

    def _rebuild_bytes(self, present, lost, outputs):
        k = self.data_shards
        for index, out in zip(lost, outputs):
            twin = index + k if index < k else index - k
            if twin not in present:
                raise TooFewShardsError(f"shard {index} and its copy {twin} are both missing")
            out.copy_(present[twin])


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def new_code(
    code: str, data_shards: int, parity_shards: int | None = None, backend: str | None = None
) -> ErasureCode:
    """Build a code, checking its geometry once, up front.

    xor: parity_shards is 1 (may be omitted); rs: 1 <= parity_shards and data_shards + parity_shards
    <= 256; replicate: parity_shards equals data_shards (may be omitted). data_shards >= 1 always.
    ``backend`` forces one backend (torch, isal, triton); by default the fastest one for the device.
    """
    if code not in CODES:
        raise GeometryError(f"unknown code {code!r}; allowed: {', '.join(CODES)}")
    if not _is_count(data_shards) or data_shards < 1:
        raise GeometryError(f"data_shards={data_shards!r} is not allowed; {code} needs an int >= 1")
    if parity_shards is None and code in ("xor", "replicate"):
        parity_shards = 1 if code == "xor" else data_shards
    if not _is_count(parity_shards):
        raise GeometryError(f"parity_shards={parity_shards!r} is not allowed; {code} needs an int")
    if code == "xor" and parity_shards != 1:
        raise GeometryError(f"parity_shards={parity_shards} is not allowed; xor has exactly 1")
    if code == "rs" and not (1 <= parity_shards and data_shards + parity_shards <= MAX_SHARDS):
        raise GeometryError(
            f"data_shards={data_shards} parity_shards={parity_shards} is not allowed; rs needs "
            f"parity_shards >= 1 and data_shards + parity_shards <= {MAX_SHARDS}"
        )
    if code == "replicate":
        if parity_shards != data_shards:
            raise GeometryError(f"parity_shards={parity_shards} is not allowed; replicate keeps one "
                                f"copy per data shard ({data_shards})")
        return ReplicateCode(data_shards, parity_shards, backend)
    return MatrixCode(code, data_shards, parity_shards, backend)
