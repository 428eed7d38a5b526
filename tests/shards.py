"""Shard helpers shared by the codec tests."""

import torch


def random_shards(count: int, numel: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    return [torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen).view(dtype)
            for _ in range(count)]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
