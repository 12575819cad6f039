"""Point-to-point channels between every pair of worker processes, in one shared-memory segment.

The segment is made once per world (by the engine, before the workers start) and mapped
by every worker; forming a group afterwards costs nothing. Channel (src -> dst) is a
single-slot mailbox with a small header:

    write_seq  incremented by src after it filled the slot
    read_seq   incremented by dst after it emptied the slot
    nbytes     bytes in the slot

State machine of one channel (only src writes write_seq/nbytes, only dst writes read_seq):

    EMPTY  (write_seq == read_seq): src may copy a chunk in, set nbytes, then write_seq += 1
    FULL   (write_seq == read_seq + 1): dst may copy the chunk out, then read_seq += 1

A message longer than the slot goes in several chunks; its first chunk starts with the
message's total length (8 bytes), so a receiver learns the size before it allocates.
After every state change the writer rings the other side's doorbell: a named FIFO that its
owner blocks on with ``select`` (no polling; a byte left in the FIFO means a wake-up is
never lost). x86 keeps stores in order, so a chunk's bytes are visible before the
``write_seq`` store that publishes them.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import tempfile
import time
import uuid
from dataclasses import dataclass

import numpy as np

HEADER_BYTES = 64  # one cache line per channel header: no false sharing between channels
_PID_TABLE_BYTES = 8 * 64  # pids of up to 64 ranks, for liveness checks
_LEN = 8  # bytes of the total-length prefix on a message's first chunk
SEGMENT_PREFIX = "gfdit-gf-"


class CollectiveError(RuntimeError):
    """A collective could not complete: a peer died, or it took longer than the timeout."""


class PeerDiedError(CollectiveError):
    """A peer's process ended during a collective (its replacement joins a new world)."""


@dataclass(frozen=True)
class WorldSpec:
    """Names of the shared resources of a world; plain data, sent to every worker."""

    segment: str
    bell_dir: str
    world_size: int
    capacity: int

    @property
    def size_bytes(self) -> int:
        pairs = self.world_size * self.world_size
        return _PID_TABLE_BYTES + pairs * (HEADER_BYTES + self.capacity)

    def bell(self, rank: int) -> str:
        return os.path.join(self.bell_dir, f"bell-{rank}")


class World:
    """Owner side (the engine): creates the segment and doorbells, and removes their names.

    The segment is a plain file under /dev/shm (not ``multiprocessing.shared_memory``, whose
    resource tracker would be one more process that outlives a shutdown). Its name carries
    the owner's pid, ``gfdit-gf-<pid>-<token>``; ``unlink`` once every rank has attached.
    """

    def __init__(self, world_size: int, capacity: int = 4 << 20) -> None:
        if not 1 <= world_size <= 64:
            raise ValueError("world_size must be between 1 and 64")
        name = f"{SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        bell_dir = tempfile.mkdtemp(prefix="gfdit-bells-")
        self.spec = WorldSpec(name, bell_dir, world_size, capacity)
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.spec.size_bytes)  # zero-filled: every channel starts EMPTY
        finally:
            os.close(fd)
        for rank in range(world_size):
            os.mkfifo(self.spec.bell(rank))

    def unlink(self) -> None:
        """Remove the names; ranks that attached keep working. Safe to call twice."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{self.spec.segment}")
        for rank in range(self.spec.world_size):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spec.bell(rank))
        with contextlib.suppress(OSError):
            os.rmdir(self.spec.bell_dir)

    def close(self) -> None:
        self.unlink()


class Channels:
    """One rank's view of the world's channels."""

    def __init__(self, spec: WorldSpec, rank: int, timeout_s: float = 60.0) -> None:
        self.spec = spec
        self.rank = rank
        self.timeout_s = timeout_s
        # A plain mmap, not SharedMemory: attaching must not register the segment with a
        # resource tracker (the owner's tracker already removes it if the owner dies).
        fd = os.open(f"/dev/shm/{spec.segment}", os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, spec.size_bytes)
        finally:
            os.close(fd)
        self._buf = np.frombuffer(self._map, dtype=np.uint8)
        self._pids = self._buf[:_PID_TABLE_BYTES].view(np.int64)
        self._pids[rank] = os.getpid()
        # Our own doorbell is opened read-write so opening never blocks and it never sees EOF.
        self._bell = os.open(spec.bell(rank), os.O_RDWR | os.O_NONBLOCK)
        self._peer_bells: dict[int, int] = {}
        for peer in range(spec.world_size):
            if peer != rank:
                self._peer_bells[peer] = os.open(spec.bell(peer), os.O_RDWR | os.O_NONBLOCK)

    # ----- layout ------------------------------------------------------------------
    def _header(self, src: int, dst: int) -> np.ndarray:
        offset = _PID_TABLE_BYTES + (src * self.spec.world_size + dst) * HEADER_BYTES
        return self._buf[offset:offset + 24].view(np.uint64)

    def _slot(self, src: int, dst: int) -> np.ndarray:
        pairs = self.spec.world_size * self.spec.world_size
        start = _PID_TABLE_BYTES + pairs * HEADER_BYTES + (src * self.spec.world_size + dst) * self.spec.capacity
        return self._buf[start:start + self.spec.capacity]

    # ----- waking ------------------------------------------------------------------
    def ring(self, peer: int) -> None:
        # A full FIFO holds unread wake-ups already: the peer will wake anyway.
        with contextlib.suppress(BlockingIOError):
            os.write(self._peer_bells[peer], b"\0")

    def wait(self, peers: tuple[int, ...], deadline: float) -> None:
        """Block until our doorbell rings (or a liveness check is due); raise if a peer died."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CollectiveError(f"rank {self.rank}: collective with {peers} timed out "
                                  f"after {self.timeout_s:.0f}s")
        ready, _, _ = select.select([self._bell], [], [], min(remaining, 0.5))
        if ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._bell, 4096)
            return
        for peer in peers:
            if not self.alive(peer):
                raise PeerDiedError(f"rank {self.rank}: peer rank {peer} died during a collective")

    def alive(self, peer: int) -> bool:
        pid = int(self._pids[peer])
        if pid <= 0:
            return True  # not attached yet: only the timeout can tell
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                state = stat.read().rsplit(b")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        except OSError as exc:
            return exc.errno != errno.ESRCH
        return state not in (b"Z", b"X")

    def deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    def close(self) -> None:
        for fd in [self._bell, *self._peer_bells.values()]:
            os.close(fd)
        self._peer_bells.clear()
        del self._buf, self._pids
        # If a caller still holds a view, the mapping goes with the process instead.
        with contextlib.suppress(BufferError):
            self._map.close()


class SendOp:
    """Progressively copies one message into the (rank -> dst) channel."""

    def __init__(self, channels: Channels, dst: int, payload: np.ndarray) -> None:
        self.channels, self.peer = channels, dst
        self.header = channels._header(channels.rank, dst)
        self.slot = channels._slot(channels.rank, dst)
        self.payload = payload
        self.offset = -_LEN  # the length prefix goes first
        self.done = False

    def progress(self) -> bool:
        header = self.header
        if self.done or header[0] != header[1]:
            return False
        capacity = len(self.slot)
        if self.offset < 0:
            self.slot[:_LEN] = np.frombuffer(np.uint64(len(self.payload)).tobytes(), dtype=np.uint8)
            take = min(capacity - _LEN, len(self.payload))
            self.slot[_LEN:_LEN + take] = self.payload[:take]
            header[2] = _LEN + take
            self.offset = take
        else:
            take = min(capacity, len(self.payload) - self.offset)
            self.slot[:take] = self.payload[self.offset:self.offset + take]
            header[2] = take
            self.offset += take
        header[0] += 1
        self.done = self.offset >= len(self.payload)
        self.channels.ring(self.peer)
        return True


class RecvOp:
    """Progressively copies one message out of the (src -> rank) channel."""

    def __init__(self, channels: Channels, src: int, out: np.ndarray | None = None) -> None:
        self.channels, self.peer = channels, src
        self.header = channels._header(src, channels.rank)
        self.slot = channels._slot(src, channels.rank)
        self.out = out
        self.offset = -_LEN
        self.done = False

    def progress(self) -> bool:
        header = self.header
        if self.done or header[0] == header[1]:
            return False
        nbytes = int(header[2])
        if self.offset < 0:
            total = int(np.frombuffer(self.slot[:_LEN].tobytes(), dtype=np.uint64)[0])
            if self.out is None:
                self.out = np.empty(total, dtype=np.uint8)
            elif len(self.out) != total:
                raise CollectiveError(f"rank {self.channels.rank}: expected {len(self.out)} bytes "
                                      f"from rank {self.peer}, got {total}")
            take = nbytes - _LEN
            self.out[:take] = self.slot[_LEN:nbytes]
            self.offset = take
        else:
            self.out[self.offset:self.offset + nbytes] = self.slot[:nbytes]  # type: ignore[index]
            self.offset += nbytes
        header[1] += 1
        self.done = self.offset >= len(self.out)  # type: ignore[arg-type]
        self.channels.ring(self.peer)
        return True


def run_ops(channels: Channels, ops: list[SendOp | RecvOp]) -> None:
    """Drive sends and receives together until all are done (no order can deadlock)."""
    pending = [op for op in ops if not op.done]
    deadline = channels.deadline()
    while pending:
        progressed = False
        for op in pending:
            while op.progress():
                progressed = True
        pending = [op for op in pending if not op.done]
        if pending and not progressed:
            channels.wait(tuple({op.peer for op in pending}), deadline)

