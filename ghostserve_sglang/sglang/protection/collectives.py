"""GhostServe's own collectives over the TP ranks, on groups of its own, so that SGLang's collectives
never interleave with ours: control collectives over gloo; the column exchange through shared memory
on CPU when every rank runs on this host and shares its ``--ghost-shm-dir``
(``exchange.LocalExchange``), else over gloo, and over a
separate NCCL communicator on GPU. Every rank creates them at the same point (scheduler
init). A collective that one rank never joins (an error there) fails after ``TIMEOUT`` instead of
hanging its peers.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from ...shm import shm_dir
from . import capture_native, exchange

TIMEOUT = datetime.timedelta(minutes=5)


def peer_lost(exc: BaseException) -> bool:
    """Whether an error looks like a collective failing because a peer is gone."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or "gloo" in text or "Connection closed" in text


class TPCollectives:
    """``transport``: how columns are exchanged (none, shared memory, gloo or nccl). ``instance_id`` and
    ``capacity`` (the bytes of the largest exchange round) size the same-host exchange; ``started``:
    False for a replacement rank, whose exchange starts at the rejoin
    (``start_exchange``) with its peers'."""

    def __init__(self, tp_group, device: torch.device, exchanges: bool, instance_id: str = "",
                 capacity: int = 0, started: bool = True) -> None:
        self.ranks = tp_group.world_size
        self.group = None
        if self.ranks > 1:
            self.group = dist.new_group(tp_group.ranks, backend="gloo", timeout=TIMEOUT)
        self.exchange_group = self.group
        self.local = None
        self.transport = ("none" if self.ranks == 1 or not exchanges
                          else "nccl" if device.type == "cuda" else "gloo")
        if self.ranks > 1 and exchanges and device.type == "cpu" and instance_id and capture_native.library():
            local = exchange.LocalExchange(instance_id, tp_group.rank_in_group, self.ranks, capacity,
                                           TIMEOUT.total_seconds())
            # One host and one shared-memory directory (nodes on one host may each have their own).
            places = self.gather_objects((socket.gethostname(), os.path.realpath(shm_dir())))
            if len(set(places)) == 1:  # and every rank's mailbox exists now
                self.local, self.transport = local, "shared memory"
                if started:
                    local.start(0)
            else:
                local.close()
        if self.ranks > 1 and device.type == "cuda" and exchanges:
            self.exchange_group = dist.new_group(tp_group.ranks, backend="nccl", timeout=TIMEOUT)

    @property
    def wait_seconds(self) -> float:
        """Time the exchange spent waiting for peers to arrive (measured for the same-host exchange)."""
        return self.local.wait_seconds if self.local is not None else 0.0

    def start_exchange(self, epoch: int) -> None:
        """Every rank, at the same point after a rejoin: the same-host exchange starts over."""
        if self.local is not None:
            self.local.start(epoch)

    def post_early(self, send: torch.Tensor) -> tuple[int, int] | None:
        """The same-host exchange's early post of ``send`` (``LocalExchange.post_early``); None where
        there is none, or it did not post."""
        return self.local.post_early(send) if self.local is not None else None

    def all_to_all(self, send: torch.Tensor, posted: tuple[int, int] | None = None) -> torch.Tensor:
        """Entry i of ``send`` goes to rank i; entry i of the result came from rank i. ``posted``: what
        ``post_early`` returned for ``send``."""
        if self.ranks == 1:
            return send.clone()
        if self.local is not None:
            return self.local.all_to_all(send, posted)
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.exchange_group)
        return received

    @property
    def reduces_xor(self) -> bool:
        """Whether ``reduce_scatter_xor`` runs here (the same-host exchange)."""
        return self.local is not None

    def reduce_scatter_xor(self, send: torch.Tensor, posted: tuple[int, int] | None = None) -> torch.Tensor:
        """The XOR of every rank's entry ``rank`` of ``send``: xor parity's exchange and encode."""
        return self.local.reduce_scatter_xor(send, posted)

    def all_reduce(self, tensor: torch.Tensor, op) -> None:
        if self.group is not None:
            dist.all_reduce(tensor, op=op, group=self.group)

    def gather_objects(self, value) -> list:
        """Every rank's ``value``, in rank order."""
        if self.group is None:
            return [value]
        values: list = [None] * self.ranks
        dist.all_gather_object(values, value, group=self.group)
        return values
