"""The column exchange between TP ranks on one host, through shared memory: the all-to-all of the
capture path (and of rebuilds and scrubs) on CPU, where gloo's took about 0.3 ms a round over loopback
TCP and ran its own threads beside the ranks' forward (decode at 0.87x of an unprotected server against
0.97x with the exchange skipped, TP=2 on 2 cores).

Each rank owns a mailbox file in ``/dev/shm``: a header (its pid, an epoch, the round it posted last)
and two buffers. A round: a rank copies what it sends into the buffer of the round's parity, posts the
round, waits for each peer's post of that round and copies its own share out of the peer's buffer. A
rank can start round r + 1 only after every peer posted round r, which each did only after reading
round r - 1 in full: so the buffer round r + 1 overwrites has been read by everyone. Sends larger than
a buffer go in several rounds. The waits spin briefly, then sleep on a futex (``capture.c``).

A round has two halves, the post and the rest, and a capture step's post can be made early: by the
scheduler thread right after it gathered the step, when this rank's worker is idle (``post_early``).
The ranks' scheduler threads run in step with the forward; their workers, woken on cores busy with the
next forward, do not, and each waited for the other's post about 0.4 ms a step. Posted early, the
round is usually there when a worker looks. A rank still posts round r + 1 only after it read round r
in full, early or not.

A peer's death shows as its pid gone (checked every ``CHECK_SECONDS`` of waiting), and a wait raises
an error the protector treats as a lost peer, as it does gloo's. After a rank's replacement every rank
restarts the exchange at the rejoin's generation (``start``): it opens the peers' current mailboxes,
and a mailbox of another epoch is never read.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time

import torch

from ...shm import shm_dir
from ...store.segment import pid_alive
from . import capture_native

HEADER_BYTES = 4096
_PID, _EPOCH, _ROUND = 0, 8, 64  # byte offsets in the header
CHECK_SECONDS = 0.01
NOT_STARTED = -1
EARLY_MAX_BYTES = 1 << 20  # larger sends (a long prefill's parts) are posted by the worker, off the forward


def mailbox_path(instance_id: str, rank: int, directory: str | None = None) -> str:
    return os.path.join(directory or shm_dir(), f"ghostserve-{instance_id}-exchange{rank}")


class _Mailbox:
    def __init__(self, path: str, capacity: int | None = None) -> None:
        """Open ``path``; with ``capacity``, create it (this process's, not started), replacing a file
        left by a dead rank, so that a peer never finds it without its owner's pid."""
        opened = path if capacity is None else f"{path}.{os.getpid()}"
        if capacity is not None:
            with open(opened, "wb") as file:
                file.truncate(HEADER_BYTES + 2 * capacity)
        with open(opened, "r+b") as file:
            self.map = mmap.mmap(file.fileno(), 0)
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)
        self.capacity = (len(self.map) - HEADER_BYTES) // 2
        self.address = self.bytes.data_ptr()
        if capacity is not None:
            self.bytes[_PID:_PID + 8].view(torch.int64)[0] = os.getpid()
            self.bytes[_EPOCH:_EPOCH + 8].view(torch.int64)[0] = NOT_STARTED
            os.replace(opened, path)

    def word(self, offset: int) -> int:
        return self.address + offset

    @property
    def pid(self) -> int:
        return int(self.bytes[_PID:_PID + 8].view(torch.int64)[0])

    def buffer_address(self, round_: int) -> int:
        return self.address + HEADER_BYTES + (round_ % 2) * self.capacity

    def close(self) -> None:
        self.bytes = None
        with contextlib.suppress(BufferError):  # a view still held: the map goes with the last of them
            self.map.close()


class LocalExchange:
    """Rank ``rank`` of ``ranks`` on this host; ``capacity``: bytes a round sends (all ranks' shares)."""

    def __init__(self, instance_id: str, rank: int, ranks: int, capacity: int, timeout_s: float) -> None:
        self.lib = capture_native.library()
        if self.lib is None:
            raise OSError("the same-host exchange needs capture.c built")
        self.instance_id, self.rank, self.ranks = instance_id, rank, ranks
        self.timeout_s = timeout_s
        self.capacity = max(ranks, capacity - capacity % ranks)
        self.own = _Mailbox(mailbox_path(instance_id, rank), self.capacity)
        self.peers: dict[int, _Mailbox] = {}
        self.epoch, self.round, self.completed = NOT_STARTED, 0, 0  # rounds posted, and received
        self.wait_seconds = 0.0  # spent waiting for peers' posts (they arrive later than this rank)

    def start(self, epoch: int) -> None:
        """Every rank, at the same point, once every rank's mailbox exists and with no exchange in flight
        on any rank (a collective orders it: the start-up's, or the rejoin's): round 0 of ``epoch``."""
        for peer in self.peers.values():
            peer.close()
        self.peers = {j: _Mailbox(mailbox_path(self.instance_id, j)) for j in range(self.ranks)
                      if j != self.rank}
        self.epoch, self.round, self.completed = epoch, 0, 0
        self.lib.ghost_mailbox_reset(self.own.word(_EPOCH), self.own.word(_ROUND), epoch)

    def post_early(self, send: torch.Tensor) -> tuple[int, int] | None:
        """Post ``send`` (as ``all_to_all`` takes it) as the next round now, from the thread that
        produced it, so that peers find it as soon as they look; the rest of the round is done later by
        ``all_to_all`` or ``reduce_scatter_xor`` given the returned ``posted``. The caller makes sure no
        other exchange of this rank comes before that call. Only a send of up to ``EARLY_MAX_BYTES``
        that fits one round, and only when no round is in flight; None otherwise (nothing posted)."""
        if (self.epoch == NOT_STARTED or self.completed != self.round
                or not 0 < send.nbytes <= min(EARLY_MAX_BYTES, self.capacity)):
            return None
        share = send.nbytes // self.ranks
        self._post(send.data_ptr(), share, share)
        return self.epoch, self.round

    def all_to_all(self, send: torch.Tensor, posted: tuple[int, int] | None = None) -> torch.Tensor:
        """Entry i of ``send`` (contiguous, on CPU) goes to rank i; entry i of the result came from it.
        ``posted``: what ``post_early`` returned for ``send``."""
        received = torch.empty_like(send)
        self._rounds(send, received, False, posted)
        return received

    def reduce_scatter_xor(self, send: torch.Tensor, posted: tuple[int, int] | None = None) -> torch.Tensor:
        """The XOR of every rank's entry ``rank`` of ``send`` (``[ranks, ...]``, contiguous, on CPU):
        the exchange and xor parity's encode in one pass, the peers' bytes XORed as they are read."""
        reduced = torch.empty_like(send[0])
        self._rounds(send, reduced, True, posted)
        return reduced

    def _rounds(self, send: torch.Tensor, out: torch.Tensor, xor: bool, posted: tuple | None) -> None:
        if self.epoch == NOT_STARTED:
            raise RuntimeError("the same-host exchange was used before it started")
        share = send.nbytes // self.ranks
        if posted is not None:
            if posted != (self.epoch, self.round) or self.completed == self.round:
                raise RuntimeError(f"an exchange round posted early as {posted} (epoch, round) is not the "
                                   f"one in flight ({self.epoch}, {self.round})")
            self._complete(out.data_ptr(), 0 if xor else share, share, xor)
            return
        window = self.capacity // self.ranks
        for start in range(0, share, window):
            width = min(window, share - start)
            self._post(send.data_ptr() + start, share, width)
            self._complete(out.data_ptr() + start, 0 if xor else share, width, xor)

    def _post(self, send: int, stride: int, width: int) -> None:
        """A round's first half: ``width`` bytes of each rank's entry (``stride`` apart from ``send``)
        into this rank's buffer of the round, then the post."""
        self.round = (self.round + 1) & 0xFFFFFFFF
        self.lib.ghost_mailbox_send(self.own.buffer_address(self.round), send, self.ranks, width, stride,
                                    self.own.word(_ROUND), self.round)

    def _complete(self, out: int, out_stride: int, width: int, xor: bool) -> None:
        """The posted round's second half: from each rank, its ``width`` bytes for this rank into
        ``out`` (entry j at ``j * out_stride``), or XORed together there, once it posted the round."""
        own = self.own.buffer_address(self.round)
        self.lib.ghost_mailbox_take(out + self.rank * out_stride, own + self.rank * width, width, 0)
        for j, peer in self.peers.items():
            self._wait(j, peer)
            self.lib.ghost_mailbox_take(out + j * out_stride, peer.buffer_address(self.round)
                                        + self.rank * width, width, int(xor))
        self.completed = self.round

    def _wait(self, j: int, peer: _Mailbox) -> None:
        started = time.perf_counter()
        try:
            while self.lib.ghost_mailbox_wait(peer.word(_EPOCH), peer.word(_ROUND), self.epoch, self.round,
                                              int(CHECK_SECONDS * 1e9)):
                if not pid_alive(peer.pid):
                    raise ConnectionError(f"Connection closed: rank {j} (pid {peer.pid}) of the same-host "
                                          "exchange is gone")
                if time.perf_counter() - started >= self.timeout_s:
                    raise ConnectionError(f"Connection closed: rank {j} posted no exchange round in "
                                          f"{self.timeout_s:.0f} s")
        finally:
            self.wait_seconds += time.perf_counter() - started

    def close(self) -> None:
        """Unmap the mailboxes and remove this rank's."""
        for peer in self.peers.values():
            peer.close()
        self.peers = {}
        self.own.close()
        remove(self.instance_id, self.rank)


def remove(instance_id: str, rank: int | None = None, directory: str | None = None) -> list[str]:
    directory = directory or shm_dir()
    """Delete rank ``rank``'s mailbox (every rank's when None); returns the paths removed."""
    if rank is not None:
        paths = [mailbox_path(instance_id, rank, directory)]
    else:
        prefix = os.path.basename(mailbox_path(instance_id, 0, directory))[:-1]
        names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        paths = [os.path.join(directory, name) for name in names
                 if name.startswith(prefix) and name[len(prefix):].isdigit()]
    removed = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed
