"""The shared-memory ring: framing, wrap-around, chunking, wake-ups, no names left behind."""

import os
import random
import select
import subprocess
import sys
import threading

import pytest

from engine.executor.protocol import encoder, from_worker_decoder
from engine.executor.shm_queue import (
    SEGMENT_PREFIX,
    SHM_DIR,
    RingReader,
    RingWriter,
    ShmRing,
    frame_size,
)
from engine.messages import ImageData, ItemResult, TaskResult


@pytest.fixture
def ring():
    ring = ShmRing.create(256, nonblocking_data=True)
    yield ring
    ring.close()


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_messages_of_every_size_come_out_whole_and_in_order_across_the_wrap(ring):
    writer, reader = RingWriter(ring), RingReader(ring)
    rng = random.Random(0)
    sent, got = [], []
    for i in range(400):
        payload = rng.randbytes(rng.randrange(0, 120))
        sent.append(payload)
        writer.write_some(payload)  # each fits: the reader drains after every two
        if i % 2:
            got += reader.drain(bytes, consume_signal=True)
    got += reader.drain(bytes, consume_signal=True)
    assert got == sent


def test_a_frame_that_does_not_fit_is_published_in_pieces(ring):
    writer, reader = RingWriter(ring), RingReader(ring)
    payload = os.urandom(1000)
    offset = writer.write_some(payload)
    assert offset == 256  # the ring is full; the rest waits
    pieces = reader.drain(bytes, consume_signal=True)
    assert pieces == []  # nothing whole yet
    while offset < frame_size(len(payload)):
        offset = writer.write_some(payload, offset)
        pieces += reader.drain(bytes, consume_signal=True)
    assert pieces == [payload]


def test_a_blocked_writer_wakes_when_the_reader_makes_room():
    ring = ShmRing.create(1024)
    try:
        writer, reader = RingWriter(ring), RingReader(ring)
        big = [os.urandom(50_000), os.urandom(3), os.urandom(70_001)]
        thread = threading.Thread(target=lambda: [writer.write(b) for b in big])
        thread.start()
        got = []
        while len(got) < len(big):
            reader.wait()
            got += reader.drain(bytes)
        thread.join(timeout=10)
        assert got == big and not thread.is_alive()
    finally:
        ring.close()


def test_the_reader_fd_is_readable_only_while_something_is_unread(ring):
    writer, reader = RingWriter(ring), RingReader(ring)
    assert not readable(ring.data_fd)
    writer.write_some(b"hello")
    assert readable(ring.data_fd)
    assert reader.drain(bytes, consume_signal=True) == [b"hello"]
    assert not readable(ring.data_fd)
    assert readable(ring.space_fd)  # the reader told the writer it made room


def test_no_segment_name_is_left_in_dev_shm():
    ring = ShmRing.create(4096)
    try:
        ours = [n for n in os.listdir(SHM_DIR) if n.startswith(f"{SEGMENT_PREFIX}{os.getpid()}-")]
        assert ours == []
    finally:
        ring.close()


ECHO = """
import json, sys
from engine.executor.protocol import encoder, from_worker_decoder
from engine.executor.shm_queue import RingReader, RingWriter, ShmRing
a, b, cap = json.loads(sys.argv[1])
reader, writer = RingReader(ShmRing.attach(tuple(a), cap)), RingWriter(ShmRing.attach(tuple(b), cap))
while True:
    reader.wait()
    for message in reader.drain(from_worker_decoder.decode):
        if message.task_id < 0:
            sys.exit(0)
        writer.write(encoder.encode(message))
"""


def test_a_large_message_round_trips_through_another_process():
    import json

    capacity = 64 << 10  # much smaller than the message: both directions go in chunks
    to_echo, from_echo = ShmRing.create(capacity), ShmRing.create(capacity)
    try:
        proc = subprocess.Popen([sys.executable, "-c", ECHO, json.dumps([to_echo.fds, from_echo.fds, capacity])],
                                pass_fds=(*to_echo.fds, *from_echo.fds))
        writer, reader = RingWriter(to_echo), RingReader(from_echo)
        message = TaskResult(7, 1, [ItemResult("r", 3, images=[ImageData(os.urandom(1 << 20), "raw", 512, 682)])])
        for _ in range(3):
            writer.write(encoder.encode(message))
            got = []
            while not got:
                reader.wait()
                got = reader.drain(from_worker_decoder.decode)
            assert got == [message]
        writer.write(encoder.encode(TaskResult(-1, 0)))
        assert proc.wait(timeout=30) == 0
    finally:
        to_echo.close()
        from_echo.close()
