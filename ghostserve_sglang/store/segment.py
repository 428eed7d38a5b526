"""One rank's host parity shard: a POSIX shared-memory segment that outlives the process writing it.

Layout (all offsets fixed by the header, which holds the format version and the geometry):

    header      4 KiB: magic, version, geometry (JSON), control words (watermark, ring head and tail,
                owner)
    slots       per slot: the step its parity became durable at (0: none) and the record's CRC-32C
    table       per slot: ``record_bytes`` of parity, indexed by slot
    ring_steps  staging between producer and table: per entry, the step (int64)
    ring_slots  per entry, the slot (int64), from a page boundary: copied from the device like the ring
    ring        per entry, ``record_bytes`` of parity

A slot's record is written as: step := 0, parity bytes, CRC-32C of (step int64 LE, slot int64 LE,
bytes), step := step. A record is handed out for a rebuild only when its step is at or below the
durable watermark and its CRC matches, so a torn write or flipped bits are reported and never used.
Slot 0 is the serving engine's padding slot (padded tokens write there; it never holds live KV): its
records may be staged and are never stored. Version 2 changed the CRC from CRC-32 (zlib) to CRC-32C
and split the ring's (step, slot) pairs into two arrays; a version-1 segment is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import re
import struct

import torch

from ..shm import shm_dir
from . import native
from .geometry import StoreError, StoreGeometry

FORMAT_VERSION = 2
MAGIC = b"GHSTPAR\0"
HEADER_BYTES = 4096
EXISTING = ("fail", "attach", "remove")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PREAMBLE = struct.Struct("<8sIII")  # magic, version, ring entries, geometry JSON length
_CONTROL_OFFSET, _GEOMETRY_OFFSET = 64, 256
WATERMARK, RING_HEAD, RING_TAIL, OWNER_PID = range(4)


def segment_path(instance_id: str, rank: int, directory: str | None = None) -> str:
    if not isinstance(instance_id, str) or not _INSTANCE_ID.fullmatch(instance_id):
        raise StoreError(f"instance id {instance_id!r} is not allowed; use 1-64 of A-Z a-z 0-9 _ . -")
    return os.path.join(directory or shm_dir(), f"ghostserve-{instance_id}-rank{rank}")


def remove_orphans(instance_id: str, directory: str | None = None) -> list[str]:
    """Delete the instance's segments whose owner process is gone (the server has stopped); a segment
    with a live owner is kept. Returns the paths removed."""
    directory = directory or shm_dir()
    prefix = os.path.basename(segment_path(instance_id, 0))[: -len("0")]
    removed = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        path = os.path.join(directory, name)
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            if not pid_alive(ParitySegment._owner_of(path)):
                with contextlib.suppress(FileNotFoundError):  # its rank's own stop may remove it first
                    os.unlink(path)
                    removed.append(path)
    return removed


def _align(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


def _layout(geometry: StoreGeometry, ring_entries: int) -> tuple[dict[str, int], int]:
    """Byte offsets of the regions, and the segment's size."""
    record = geometry.record_bytes
    offsets = {"slots": HEADER_BYTES}
    offsets["table"] = _align(offsets["slots"] + 16 * geometry.slots)
    offsets["ring_steps"] = _align(offsets["table"] + record * geometry.slots)
    # From a page boundary: ring_slots and ring are registered with CUDA together, and nothing else.
    offsets["ring_slots"] = _align(offsets["ring_steps"] + 8 * ring_entries, mmap.PAGESIZE)
    offsets["ring"] = _align(offsets["ring_slots"] + 8 * ring_entries)
    return offsets, _align(offsets["ring"] + record * ring_entries)


def check_space(geometry: StoreGeometry, ring_entries: int, directory: str | None = None,
                ranks: int = 1) -> int:
    """Refuse, in one line naming the need and the fixes, segments for ``ranks`` ranks of this host
    that ``directory`` has no room for (their pages are committed as parity arrives, so a shortfall
    would surface later as a crash). Returns one segment's size."""
    need = _layout(geometry, ring_entries)[1]
    directory = directory or shm_dir()
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    if ranks * need > free:
        mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
        raise StoreError(f"the parity store needs {mib(need)} per rank, {mib(ranks * need)} for {ranks} "
                         f"rank(s), in {directory}, which has {mib(free)} free; enlarge it (docker run "
                         f"--shm-size, or mount -o remount,size=... {directory}), or lower "
                         "--max-total-tokens or --ghost-staging-mib")
    return need


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (ended, not yet reaped by its parent) does not."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@dataclasses.dataclass
class ReadResult:
    """Parity of the slots asked for. ``usable[i]`` is True only for a durable record whose CRC
    matched; ``corrupt`` lists slots whose durable record failed its CRC."""

    parity: torch.Tensor
    steps: torch.Tensor
    usable: torch.Tensor
    corrupt: list[int]


class ParitySegment:
    """A mapped parity shard. Create with ``create`` (``existing`` says what to do with a segment a
    dead instance left behind) or re-attach after a crash with ``attach``."""

    def __init__(self, path: str, fd: int, geometry: StoreGeometry, ring_entries: int) -> None:
        self.path = path
        self.geometry = geometry
        self.ring_entries = ring_entries
        record = geometry.record_bytes
        self._offsets, self.size_bytes = _layout(geometry, ring_entries)
        found_bytes = os.fstat(fd).st_size
        if found_bytes == 0:
            os.ftruncate(fd, self.size_bytes)
        elif found_bytes != self.size_bytes:
            raise StoreError(f"segment {path} is {found_bytes} bytes, its header implies "
                             f"{self.size_bytes}; it is damaged")
        self._map = mmap.mmap(fd, self.size_bytes)
        os.close(fd)
        buf = torch.frombuffer(self._map, dtype=torch.uint8)
        self._address = buf.data_ptr()
        o = self._offsets
        # Control words through a memoryview: a torch element read or write costs ~10 us, and the drain
        # touches them several times a step.
        self._control = memoryview(self._map)[_CONTROL_OFFSET : _CONTROL_OFFSET + 64].cast("q")
        slot_words = buf[o["slots"] : o["slots"] + 16 * geometry.slots].view(torch.int64).view(-1, 2)
        self.slot_steps, self.slot_crcs = slot_words[:, 0], slot_words[:, 1]
        self.table = buf[o["table"] : o["table"] + record * geometry.slots].view(geometry.slots, record)
        self.ring_steps = buf[o["ring_steps"] : o["ring_steps"] + 8 * ring_entries].view(torch.int64)
        self.ring_steps_array = self.ring_steps.numpy()  # the same memory, for cheap fills per step
        self.ring_slots = buf[o["ring_slots"] : o["ring_slots"] + 8 * ring_entries].view(torch.int64)
        self.ring = buf[o["ring"] : o["ring"] + record * ring_entries].view(ring_entries, record)
        self._pinned_at = 0  # address of the registered range
        self.checksum_failures = 0  # records refused by ``read`` since this process mapped the segment

    # -- lifecycle ------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, instance_id: str, rank: int, geometry: StoreGeometry, ring_entries: int,
        existing: str = "fail", directory: str | None = None,
    ) -> ParitySegment:
        """A fresh segment, mode 0600. A segment already there is refused (``fail``), re-attached
        for recovery (``attach``) or deleted first (``remove``); one whose owner is alive is never
        removed."""
        if existing not in EXISTING:
            raise StoreError(f"existing={existing!r} is not allowed; allowed: {', '.join(EXISTING)}")
        if not isinstance(ring_entries, int) or ring_entries < 1:
            raise StoreError(f"ring_entries={ring_entries!r} is not allowed; it must be an int >= 1")
        path = segment_path(instance_id, rank, directory)
        if os.path.exists(path):
            if existing == "attach":
                return cls.attach(instance_id, rank, geometry, directory)
            owner = cls._owner_of(path)
            if existing == "fail" or pid_alive(owner):
                live = f"; its owner pid {owner} is alive" if pid_alive(owner) else ""
                raise StoreError(f"segment {path} already exists{live}; start with existing='attach' "
                                 "to recover from it or existing='remove' to start fresh")
            os.unlink(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchmod(fd, 0o600)  # independent of the umask
        segment = cls(path, fd, geometry, ring_entries)
        segment._write_header(instance_id)
        return segment

    @classmethod
    def attach(cls, instance_id: str, rank: int, geometry: StoreGeometry,
               directory: str | None = None) -> ParitySegment:
        """Map an existing segment, refusing any other format version or geometry."""
        path = segment_path(instance_id, rank, directory)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise StoreError(f"no segment {path} to attach to") from None
        header = os.pread(fd, HEADER_BYTES, 0)
        magic, version, ring_entries, length = _PREAMBLE.unpack_from(header)
        if magic != MAGIC or version != FORMAT_VERSION:
            os.close(fd)
            raise StoreError(f"segment {path} has format {magic!r} version {version}; this GhostServe "
                             f"reads {MAGIC!r} version {FORMAT_VERSION}")
        found = StoreGeometry.from_json(header[_GEOMETRY_OFFSET : _GEOMETRY_OFFSET + length].decode())
        if found != geometry:
            os.close(fd)
            diff = ", ".join(f"{f.name}={getattr(found, f.name)!r} (expected {getattr(geometry, f.name)!r})"
                             for f in dataclasses.fields(geometry)
                             if getattr(found, f.name) != getattr(geometry, f.name))
            raise StoreError(f"segment {path} has another geometry: {diff}")
        segment = cls(path, fd, geometry, ring_entries)
        segment._control[OWNER_PID] = os.getpid()
        return segment

    @staticmethod
    def _owner_of(path: str) -> int:
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
        if len(header) < _CONTROL_OFFSET + 32:
            return 0
        return struct.unpack_from("<q", header, _CONTROL_OFFSET + 8 * OWNER_PID)[0]

    def _write_header(self, instance_id: str) -> None:
        geometry = self.geometry.to_json().encode()
        if _GEOMETRY_OFFSET + len(geometry) > HEADER_BYTES:
            raise StoreError("geometry does not fit the segment header")
        _PREAMBLE.pack_into(self._map, 0, MAGIC, FORMAT_VERSION, self.ring_entries, len(geometry))
        self._map[_GEOMETRY_OFFSET : _GEOMETRY_OFFSET + len(geometry)] = geometry
        self._control[OWNER_PID] = os.getpid()

    def sync(self) -> None:
        """Write dirty pages through to the file (msync); for a segment on disk, that makes it durable."""
        self._map.flush()

    def pin(self) -> int:
        """Register the staging ring's slot ids and rows (the only targets of device-to-host copies;
        from ``ring_slots`` to the segment's end) with CUDA, so that the copies into them run
        asynchronously. Returns 0, or CUDA's error code when registration failed: copies then go to
        pageable memory, synchronously."""
        if self._pinned_at or not torch.cuda.is_available():
            return 0
        page = mmap.PAGESIZE
        start = self._offsets["ring_slots"] // page * page
        end = -(-self.size_bytes // page) * page
        err = int(torch.cuda.cudart().cudaHostRegister(self._address + start, end - start, 0))
        if err == 0:
            self._pinned_at = self._address + start
        return err

    @property
    def pinned(self) -> bool:
        return bool(self._pinned_at)

    def close(self, unlink: bool = False) -> None:
        """Unmap; ``unlink`` also deletes the segment (normal shutdown)."""
        if self._pinned_at:
            torch.cuda.cudart().cudaHostUnregister(self._pinned_at)
            self._pinned_at = 0
        self._control[OWNER_PID] = 0
        self._control.release()
        del self._control, self.slot_steps, self.slot_crcs, self.table, self.ring_steps, self.ring_slots
        del self.ring, self.ring_steps_array
        self._map.close()
        if unlink:
            os.unlink(self.path)

    # -- control words ---------------------------------------------------------------------------
    def control(self, word: int) -> int:
        return self._control[word]

    def set_control(self, word: int, value: int) -> None:
        self._control[word] = int(value)

    @property
    def watermark(self) -> int:
        """The last step whose parity is entirely in the table."""
        return self.control(WATERMARK)

    # -- records ---------------------------------------------------------------------------------
    def write_staged(self, index: int, count: int, threads: int = 1) -> int:
        """Store ring entries ``[index, index + count)`` in the table, each marked with its step; a slot
        staged twice ends with its later record, and entries for slot 0 (padding) are skipped. One
        native call that releases the GIL and shares the records among up to ``threads`` threads (the
        caller's included), or from Python where that is not built. Returns how many records were
        stored; raises StoreError, after storing the others, when entries name a slot out of range."""
        steps, slots = self.ring_steps[index : index + count], self.ring_slots[index : index + count]
        rows = self.ring[index : index + count]
        writer = native.batch_writer()
        if writer is not None:
            stored, refused = writer(self.table.data_ptr(), self.slot_steps.data_ptr(), self.geometry.slots,
                                     steps.data_ptr(), slots.data_ptr(), rows.data_ptr(), count,
                                     self.geometry.record_bytes, threads)
        else:
            stored, refused = self._write_staged_python(steps, slots, rows)
        if refused:  # slot_steps above: the first of each slot's two words
            raise StoreError(f"{refused} staged records name a slot outside 0..{self.geometry.slots - 1}")
        return stored

    def _write_staged_python(self, steps: torch.Tensor, slots: torch.Tensor,
                             rows: torch.Tensor) -> tuple[int, int]:
        inside = (slots >= 0) & (slots < self.geometry.slots)
        keep = torch.nonzero(inside & (slots != 0)).flatten()
        steps, slots, rows = steps[keep], slots[keep], rows[keep]
        crcs = native.record_crcs(steps, slots, rows)
        cuts = (torch.nonzero(steps[1:] != steps[:-1]).flatten() + 1).tolist()
        for lo, hi in zip([0, *cuts], [*cuts, len(keep)]):  # a step's slots are distinct
            self._store(int(steps[lo]), slots[lo:hi], rows[lo:hi], crcs[lo:hi])
        return len(keep), int((~inside).sum())

    def write_records(self, step: int, slots: torch.Tensor, parity: torch.Tensor) -> None:
        """Store one step's parity rows for distinct ``slots`` and mark them durable at ``step``; rows
        for slot 0 (padding) are skipped."""
        slots = torch.as_tensor(slots, dtype=torch.int64)
        keep = torch.nonzero(slots != 0).flatten()
        slots, parity = slots[keep], parity[keep]
        steps = torch.full((len(slots),), step, dtype=torch.int64)
        self._store(step, slots, parity, native.record_crcs(steps, slots, parity))

    def _store(self, step: int, slots: torch.Tensor, rows: torch.Tensor, crcs: torch.Tensor) -> None:
        """The torn-write protocol for distinct slots, from Python."""
        self.slot_steps[slots] = 0
        self.table[slots] = rows
        self.slot_crcs[slots] = crcs
        self.slot_steps[slots] = step

    def invalidate(self, slots: torch.Tensor) -> None:
        """Forget the parity of ``slots`` (they were freed or rewritten without protection)."""
        self.slot_steps[slots] = 0

    def read(self, slots: torch.Tensor) -> ReadResult:
        """Copies of the records of ``slots``; only durable, CRC-valid ones are marked usable."""
        slots = torch.as_tensor(slots, dtype=torch.int64)
        steps = self.slot_steps[slots].clone()
        crcs = self.slot_crcs[slots].clone()
        parity = self.table[slots].clone()
        # A record rewritten while it was copied (the drain runs beside a read) is not usable; it
        # is not corrupt either.
        usable = (steps > 0) & (steps <= self.watermark) & (self.slot_steps[slots] == steps)
        check = torch.nonzero(usable).flatten()
        failed = check[native.record_crcs(steps[check], slots[check], parity[check]) != crcs[check]]
        usable[failed] = False
        corrupt = slots[failed].tolist()
        self.checksum_failures += len(corrupt)
        return ReadResult(parity, steps, usable, corrupt)

    def durable_slots(self) -> torch.Tensor:
        """Slots holding a record at or below the watermark (CRCs are checked on ``read``)."""
        steps = self.slot_steps
        return torch.nonzero((steps > 0) & (steps <= self.watermark)).flatten()

    def pending(self) -> list[tuple[int, int]]:
        """(step, slot) of the staged records the drain had not yet written: not durable."""
        head, tail = self.control(RING_HEAD), self.control(RING_TAIL)
        positions = torch.arange(tail, head) % self.ring_entries
        return list(zip(self.ring_steps[positions].tolist(), self.ring_slots[positions].tolist()))
