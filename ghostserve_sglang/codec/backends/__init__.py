"""Backends of one computation: outputs[i] = XOR over j of matrix[i][j] * sources[j] in GF(2^8).

``select_backend`` is the one place that decides which implementation runs; codes call it and never
branch on the answer. Every backend gives bit-identical results.
"""

from __future__ import annotations

import functools
import os
from typing import Protocol

import torch

from ..errors import CodecError
from ..gf256 import Matrix

BACKENDS = ("torch", "isal", "triton")


class Backend(Protocol):
    name: str

    def apply(self, matrix: Matrix, sources: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """Write the GF(2^8) product into ``outputs`` (1-D uint8 tensors of one length and device)."""


@functools.cache
def _load(name: str) -> Backend:
    if name == "torch":
        from .torch_ref import TorchBackend

        return TorchBackend()
    if name == "isal":
        from .isal import IsalBackend

        return IsalBackend()
    from .triton_gf import TritonBackend

    return TritonBackend()


def _loads(name: str) -> bool:
    try:
        _load(name)
    except (ImportError, OSError):
        return False
    return True


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` here. Triton counts on CPU only under the interpreter."""
    device = torch.device(device)
    names = ["torch"]
    if device.type == "cpu" and _loads("isal"):
        names.append("isal")
    if (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1") and _loads("triton"):
        names.append("triton")
    return names


def select_backend(device: torch.device | str, name: str | None = None) -> Backend:
    """The backend for tensors on ``device``: ``name`` if given, else the fastest available
    (Triton on a GPU, ISA-L on a CPU that has it, the torch reference otherwise)."""
    return _select(torch.device(device).type, name)


@functools.cache
def _select(device_type: str, name: str | None) -> Backend:
    available = available_backends(device_type)
    if name is None:
        fast = "triton" if device_type == "cuda" else "isal"
        name = fast if fast in available else "torch"
    if name not in BACKENDS:
        raise CodecError(f"unknown codec backend {name!r}; allowed: {', '.join(BACKENDS)}")
    if name not in available:
        raise CodecError(f"codec backend {name!r} cannot run on {device_type} here; "
                         f"available: {', '.join(available)}")
    return _load(name)
