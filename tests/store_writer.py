"""A parity producer for the store tests, run as its own process so that it can be SIGKILLed.

usage: store_writer.py INSTANCE DURABLE_STEPS STAGED_STEPS
Writes DURABLE_STEPS steps and waits until they are durable, pauses the drain, stages STAGED_STEPS more,
prints READY and sleeps until killed.
"""

import sys
import time

import torch

from ghostserve_sglang.store import ParityDrain, ParitySegment, StoreGeometry

GEOMETRY = StoreGeometry("rs", 4, 2, "float16", 3, 16, 2, 512)
SLOTS_PER_STEP = 40


def step_slots(step: int) -> torch.Tensor:
    return torch.randperm(GEOMETRY.slots, generator=torch.Generator().manual_seed(step))[:SLOTS_PER_STEP]


def payload(step: int, slots: torch.Tensor) -> torch.Tensor:
    columns = torch.arange(GEOMETRY.record_bytes)
    return ((slots[:, None] * 7 + columns[None, :] * 3 + step * 11) % 256).to(torch.uint8)


def main() -> None:
    instance, durable, staged = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    segment = ParitySegment.create(instance, 0, GEOMETRY, ring_entries=4 * SLOTS_PER_STEP * (staged + 1))
    drain = ParityDrain(segment).start()
    for step in range(1, durable + 1):
        drain.submit(step, step_slots(step), payload(step, step_slots(step)))
    assert drain.flush(30)
    drain.pause()
    for step in range(durable + 1, durable + staged + 1):
        drain.submit(step, step_slots(step), payload(step, step_slots(step)))
    print("READY", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
