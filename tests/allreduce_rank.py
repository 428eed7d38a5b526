"""One rank of the all-reduce test, run as its own process: three ranks on a gloo group.

usage: allreduce_rank.py RANK PORT
Rank r holds (1e8, -1e8, 1.0)[r] in every element, so the sum is 1 when the parts are added in rank
order and 0 when -1e8 + 1.0 is added first (it rounds to -1e8 in float32). For tensors of 1 to 64
elements, prints at how many element positions gloo's own all-reduce gave different sums for different
tensor lengths, then how many elements the ordered all-reduce got wrong.
"""

import os
import sys
import types

import torch
import torch.distributed as dist

from ghostserve_sglang.sglang.patching.cpu_compat import ordered_all_reduce

rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
group = types.SimpleNamespace(world_size=3, device_group=dist.group.WORLD)
value = (1e8, -1e8, 1.0)[rank]


def gloo(part):
    dist.all_reduce(part)
    return part


sums_at = [set() for _ in range(64)]  # position -> the sums gloo gave it, over tensor lengths
ordered_wrong = 0
for length in range(1, 65):
    for position, total in enumerate(gloo(torch.full((length,), value)).tolist()):
        sums_at[position].add(total)
    result = ordered_all_reduce(gloo, group, (torch.full((length,), value),), {})
    ordered_wrong += int((result != 1.0).sum())
print(sum(len(sums) > 1 for sums in sums_at), ordered_wrong, flush=True)
dist.barrier()
# Tearing a gloo group down while a peer still closes its side can abort the process ("terminate
# called without an active exception"); every rank is done here, so leave without a teardown.
os._exit(0)
