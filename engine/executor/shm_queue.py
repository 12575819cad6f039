"""A single-producer, single-consumer byte ring in shared memory, with eventfd wake-ups.

Why: a ``multiprocessing.Queue`` pickles and pushes every message through a 64 KiB pipe
(several ms per MiB); a polling ring is fast alone but fights torch's threads for the
cores. This ring copies bytes into shared memory and wakes the other side through an
eventfd: the engine registers it with its asyncio loop, a worker blocks on it. Nobody
polls.

Layout of the segment (all integers little-endian uint64)::

    [0:8)      head   bytes ever published by the writer (only the writer stores it)
    [64:72)    tail   bytes ever consumed by the reader  (only the reader stores it)
    [128:...)  data   ``capacity`` bytes, a multiple of 8, addressed ``position % capacity``

A message is a frame: an 8-byte length ``n``, the ``n`` payload bytes, then zero padding
to a multiple of 8. Every position is a multiple of 8, so a frame's length field is never
split by the end of the data area nor by a partial publish. A frame larger than the free
space goes in chunks: the writer publishes what fits and waits for room, the reader
gathers the pieces. So any message size works with a small ring.

State machine. ``used = head - tail``, ``0 <= used <= capacity``::

    ring:    EMPTY (used == 0) --publish--> DATA (0 < used < capacity) --publish--> FULL
             FULL --consume--> DATA --consume--> EMPTY
    writer:  WRITING --frame not all written, ring FULL--> WAITING_SPACE (blocks on the
             space eventfd, or, on the engine side, keeps the rest and asks the loop to
             call back when it is readable) --space signalled--> WRITING
    reader:  IDLE (blocks on the data eventfd / loop reader) --data signalled--> DRAINING
             DRAINING: per frame HEADER -> (PAYLOAD -> PAYLOAD ...) -> decoded; a frame
             that is whole and contiguous is decoded straight from shared memory, one
             that is not is gathered into a private buffer across drains.
             DRAINING --head reached--> IDLE

Wake-up rules (each makes a lost wake-up impossible without atomics):
- the writer stores ``head`` after copying the bytes, then adds 1 to the data eventfd;
- the reader reads (and so resets) the data eventfd *before* loading ``head``, so bytes
  published after that load come with a count that wakes it again;
- the reader stores ``tail`` after copying out, then adds 1 to the space eventfd when it
  consumed anything; a writer that found no room reads the space eventfd, then looks again.
Spurious wake-ups are harmless (a drain finds nothing). The eventfd syscalls on both
sides also order the index and data accesses across processes.

Segments are created under /dev/shm as ``gfdit-ring-<pid>-<token>`` and unlinked at once;
the other process maps the inherited file descriptor. So no name is left behind even if
every process is killed.
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "gfdit-ring-"
DEFAULT_CAPACITY = 4 << 20

_HEAD = 0
_TAIL = 64
_DATA = 128
_U64 = struct.Struct("<Q")


def segment_name(pid: int | None = None) -> str:
    """A fresh segment name; ``gfdit-ring-<pid>-`` prefixes every segment of that process."""
    return f"{SEGMENT_PREFIX}{os.getpid() if pid is None else pid}-{secrets.token_hex(6)}"


def _align8(n: int) -> int:
    return (n + 7) & ~7


class ShmRing:
    """The shared pieces of one ring: the mapped segment and its two eventfds.

    ``create`` makes them in the producing process; ``fds`` go to the other process
    (``subprocess.Popen(pass_fds=...)``), which calls ``attach``.
    """

    def __init__(self, mem_fd: int, data_fd: int, space_fd: int, capacity: int) -> None:
        self.mem_fd, self.data_fd, self.space_fd = mem_fd, data_fd, space_fd
        self.capacity = capacity
        self.mem = mmap.mmap(mem_fd, _DATA + capacity)
        self.view = memoryview(self.mem)
        self.closed = False

    @classmethod
    def create(cls, capacity: int = DEFAULT_CAPACITY, *, nonblocking_data: bool = False,
               nonblocking_space: bool = False) -> ShmRing:
        """A new ring. ``nonblocking_*``: that eventfd is read from an asyncio loop."""
        if capacity <= 0 or capacity % 8:
            raise ValueError("capacity must be a positive multiple of 8")
        path = os.path.join(SHM_DIR, segment_name())
        mem_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.unlink(path)
            os.ftruncate(mem_fd, _DATA + capacity)
            data_fd = os.eventfd(0, os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblocking_data else 0))
            space_fd = os.eventfd(0, os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblocking_space else 0))
        except BaseException:
            os.close(mem_fd)
            raise
        return cls(mem_fd, data_fd, space_fd, capacity)

    @classmethod
    def attach(cls, fds: tuple[int, int, int], capacity: int) -> ShmRing:
        return cls(*fds, capacity)

    @property
    def fds(self) -> tuple[int, int, int]:
        return self.mem_fd, self.data_fd, self.space_fd

    def _load(self, offset: int) -> int:
        return _U64.unpack_from(self.mem, offset)[0]

    def _store(self, offset: int, value: int) -> None:
        _U64.pack_into(self.mem, offset, value)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.view.release()
        self.mem.close()
        for fd in self.fds:
            os.close(fd)


def _signal(fd: int) -> None:
    os.eventfd_write(fd, 1)


def _consume(fd: int) -> bool:
    """Reset an eventfd; False if it was not signalled (only on a non-blocking one)."""
    try:
        os.eventfd_read(fd)
        return True
    except BlockingIOError:
        return False


def frame_size(payload_len: int) -> int:
    """Bytes a payload takes in the ring: length field, payload, padding."""
    return 8 + _align8(payload_len)


class RingWriter:
    """The producing side. ``write_some`` never blocks; ``write`` waits for room.

    It takes a payload (an encoded message) and writes its frame: the length field, the
    payload, then skips the padding, so no frame is ever assembled in memory.
    """

    def __init__(self, ring: ShmRing) -> None:
        self.ring = ring
        self._head = ring._load(_HEAD)

    def write_some(self, payload: bytes | memoryview, offset: int = 0) -> int:
        """Publish as much of the payload's frame as fits, from byte ``offset`` of the
        frame; returns the new offset (the frame is done at ``frame_size(len(payload))``)."""
        ring = self.ring
        cap = ring.capacity
        n = len(payload)
        free = cap - (self._head - ring._load(_TAIL))
        size = min(free, frame_size(n) - offset)
        if size <= 0:
            return offset
        end = offset + size
        if offset == 0:  # free >= 8 here: every position and size is a multiple of 8
            _U64.pack_into(ring.mem, _DATA + self._head % cap, n)
        lo, hi = max(offset, 8) - 8, min(end, 8 + n) - 8
        if lo < hi:
            self._copy(self._head + (lo + 8 - offset), memoryview(payload)[lo:hi])
        self._head += size
        ring._store(_HEAD, self._head)
        _signal(ring.data_fd)
        return end

    def _copy(self, position: int, src: memoryview) -> None:
        cap = self.ring.capacity
        data = self.ring.view
        start = position % cap
        first = min(len(src), cap - start)
        data[_DATA + start:_DATA + start + first] = src[:first]
        if first < len(src):
            data[_DATA:_DATA + len(src) - first] = src[first:]

    def write(self, payload: bytes | memoryview) -> None:
        """Write a whole frame, blocking on the space eventfd while the ring is full."""
        total = frame_size(len(payload))
        offset = self.write_some(payload)
        while offset < total:
            os.eventfd_read(self.ring.space_fd)
            offset = self.write_some(payload, offset)


class RingReader:
    """The consuming side: ``drain`` decodes every whole frame published so far."""

    def __init__(self, ring: ShmRing) -> None:
        self.ring = ring
        self._tail = ring._load(_TAIL)
        self._partial: bytearray | None = None
        self._frame_len = 0  # payload length of the frame being gathered
        self._need = 0  # bytes (payload + padding) still to gather

    def wait(self) -> None:
        """Block until the writer signals (a worker's idle state)."""
        os.eventfd_read(self.ring.data_fd)

    def drain(self, decode: Callable[[memoryview], T], *, consume_signal: bool = False) -> list[T]:
        """Decode the frames published so far. ``consume_signal``: reset the data eventfd
        first (the loop side; a worker resets it in ``wait``)."""
        ring = self.ring
        if consume_signal:
            _consume(ring.data_fd)
        cap = ring.capacity
        data = ring.view
        head = ring._load(_HEAD)
        tail = self._tail
        out: list[T] = []
        while tail < head:
            if self._partial is None:
                start = tail % cap
                n = _U64.unpack_from(data, _DATA + start)[0]
                padded = _align8(n)
                if head - tail - 8 >= padded and start + 8 + n <= cap:
                    out.append(decode(data[_DATA + start + 8:_DATA + start + 8 + n]))
                    tail += 8 + padded
                    continue
                tail += 8
                self._partial, self._frame_len, self._need = bytearray(), n, padded
            take = min(head - tail, self._need)
            start = tail % cap
            first = min(take, cap - start)
            self._partial += data[_DATA + start:_DATA + start + first]
            if first < take:
                self._partial += data[_DATA:_DATA + take - first]
            tail += take
            self._need -= take
            if self._need == 0:
                whole = memoryview(self._partial)[:self._frame_len]
                self._partial = None
                out.append(decode(whole))
        if tail != self._tail:
            self._tail = tail
            ring._store(_TAIL, tail)
            _signal(ring.space_fd)
        return out
