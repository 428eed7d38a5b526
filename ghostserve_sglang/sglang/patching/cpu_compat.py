"""What a stock SGLang 0.5.23 server needs to run on a CPU-only machine, and nothing more.

Applied only on CPU: a ``vllm._custom_ops`` stand-in (SGLang's RotaryEmbedding imports
``rotary_embedding`` from it when CUDA is absent; vllm is not a dependency) and, for TP > 1, the two
environment settings SGLang reads in each scheduler (one OpenMP core list per rank, and an NCCL library
path that does not exist so the pynccl communicator disables itself and collectives go over gloo), plus
an OpenMP thread count that matches each rank's core list.

For TP > 2 also an all-reduce that sums the ranks' parts in rank order (:func:`ordered_all_reduce`,
installed through the patch table). Gloo's ring all-reduce adds each element's parts in an order that
depends on where the element falls in its chunk of the tensor, so on three or more ranks the same
token's activations come out different in the last bits when the batch around it has another size, and
two runs of the same concurrent requests can pick different greedy tokens. With two ranks the order
cannot matter (a + b == b + a in floating point), so TP=2 keeps SGLang's own all-reduce.

For the same reason every linear layer (and the LM head) computes at least ``LINEAR_MIN_ROWS`` rows on
CPU (:func:`batch_invariant_linear`): a float32 matrix product with only a few rows takes another code
path whose rounding differs, so a decode step of 7 requests gave a token other bits than the same step
of 8, and a request that arrived a little later could change another request's greedy tokens.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import torch

from ...drills import process as process_drills
from ..restart import liveness

MISSING_NCCL = "/nonexistent/ghostserve-cpu-has-no-nccl/libnccl.so.2"


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
                     head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    """Rotate ``query`` and ``key`` in place, as vllm's op does: the first ``cos_sin_cache.shape[-1]``
    dims of each head, as two halves (neox) or interleaved pairs."""
    rot = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions.flatten().long()].float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    for x in (query, key):
        if x is None:
            continue
        heads = x.view(positions.numel(), -1, head_size)[..., :rot]
        if is_neox:
            x1, x2 = heads[..., : rot // 2].float(), heads[..., rot // 2 :].float()
        else:
            x1, x2 = heads[..., 0::2].float(), heads[..., 1::2].float()
        o1, o2 = (x1 * cos - x2 * sin).to(x.dtype), (x2 * cos + x1 * sin).to(x.dtype)
        if is_neox:
            heads[..., : rot // 2], heads[..., rot // 2 :] = o1, o2
        else:
            heads[..., 0::2], heads[..., 1::2] = o1, o2


def ordered_all_reduce(wrapped, instance, args, kwargs):
    """``GroupCoordinator.all_reduce`` on CPU with more than two ranks: gather every rank's part and add
    them in rank order, in place, as SGLang's CPU path does; the sum then depends on the element alone,
    not on the batch around it. With any number of ranks the rank is stamped as waiting in a
    collective meanwhile (``liveness``), from the moment it calls in."""
    part = args[0] if args else kwargs["input_"]
    process_drills.hang_here("collective")  # a rank that never hands its part over: its peers wait
    with liveness.collective():  # the rank waits for its peers here (a hung peer's victims do)
        if instance.world_size <= 2 or not part.is_cpu:
            return wrapped(*args, **kwargs)
        parts = [torch.empty_like(part) for _ in range(instance.world_size)]
        torch.distributed.all_gather(parts, part.contiguous(), group=instance.device_group)
        total = parts[0]
        for other in parts[1:]:
            total += other
        part.copy_(total)
        return part


LINEAR_MIN_ROWS = 16  # from this many rows on, each row's result does not depend on the row count


def batch_invariant_linear(wrapped, instance, args, kwargs):
    """``UnquantizedLinearMethod.apply`` / ``UnquantizedEmbeddingMethod.apply`` on CPU: a batch of fewer
    than ``LINEAR_MIN_ROWS`` rows is padded with zero rows, and only its own rows are returned."""
    x = args[1] if len(args) > 1 else kwargs["x"]
    rows = x.shape[0] if x.dim() == 2 else 0
    if not x.is_cpu or not 0 < rows < LINEAR_MIN_ROWS:
        return wrapped(*args, **kwargs)
    padded = torch.nn.functional.pad(x, (0, 0, 0, LINEAR_MIN_ROWS - rows))
    if len(args) > 1:
        args = (args[0], padded, *args[2:])
    else:
        kwargs = {**kwargs, "x": padded}
    return wrapped(*args, **kwargs)[:rows]


def needs_rotary_standin() -> bool:
    if torch.cuda.is_available() or "vllm" in sys.modules:
        return False
    return importlib.util.find_spec("vllm") is None


def install_rotary_standin() -> bool:
    """Register the stand-in module when this process runs SGLang on CPU without vllm."""
    if not needs_rotary_standin():
        return False
    package = types.ModuleType("vllm")
    package.__path__ = []
    ops = types.ModuleType("vllm._custom_ops")
    ops.rotary_embedding = rotary_embedding
    package._custom_ops = ops
    sys.modules["vllm"], sys.modules["vllm._custom_ops"] = package, ops
    return True


def tp_environment(tp_size: int, cores: list[int] | None = None) -> dict[str, str]:
    """SGLang's CPU settings for ``tp_size`` ranks: cores split evenly, or shared round-robin when
    there are fewer cores than ranks."""
    if tp_size <= 1:
        return {}
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    if len(cores) >= tp_size:
        per = len(cores) // tp_size
        lists = [cores[i * per : (i + 1) * per] for i in range(tp_size)]
    else:
        lists = [[cores[i % len(cores)]] for i in range(tp_size)]
    bind = "|".join(",".join(map(str, group)) for group in lists)
    # Without SGLang's CPU engine nothing sizes each rank's OpenMP pool, and every rank would start one
    # thread per core of the machine: ranks then fight over the cores (3-5x slower decode here).
    threads = str(len(lists[0]))
    return {"SGLANG_CPU_OMP_THREADS_BIND": bind, "SGLANG_NCCL_SO_PATH": MISSING_NCCL,
            "OMP_NUM_THREADS": threads}
