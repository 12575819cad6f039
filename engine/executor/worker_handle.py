"""The engine's end of one worker process: spawn it, talk to it, notice when it exits.

Why not ``multiprocessing``: its spawn start method launches a resource-tracker process
that outlives the engine's shutdown, re-imports the user's ``__main__`` in every worker,
and passes descriptors through pickling. A worker here is a fresh interpreter
(``python -m engine.executor.worker_main``, the spawn semantics without fork) that
inherits exactly its descriptors (``pass_fds``): its two rings, the parent-death pipe.

Everything on the engine side runs on the event loop: results arrive through
``loop.add_reader`` on the result ring's eventfd, and the process's exit through a pidfd
(readable once it has terminated), so death is seen at once without polling. Sending
never blocks the loop: what does not fit in the command ring waits in memory until the
ring's space eventfd fires.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import msgspec

from engine.executor.protocol import (
    EXIT_REPLACE_ME,
    FromWorker,
    WorkerSpec,
    encode_spec,
    from_worker_decoder,
)
from engine.executor.shm_queue import RingReader, RingWriter, ShmRing, frame_size
from engine.messages import ModelInfo

logger = logging.getLogger(__name__)


class WorkerStartError(RuntimeError):
    """A worker process could not load the model or join the world."""


class DeviceLayoutError(WorkerStartError):
    """The workers' devices cannot form a world (refused before any worker starts)."""


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    if returncode == EXIT_REPLACE_ME:
        return "left to be replaced (a CUDA error or a failed multi-rank task; see its log)"
    return f"exited with code {returncode}"


def child_env(threads: int | None) -> dict[str, str]:
    """The engine's environment, its import path, and the thread count for OpenMP."""
    env = dict(os.environ)
    paths = [os.path.abspath(p or os.curdir) for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


class WorkerHandle:
    """One worker process. ``ready`` resolves with the model info (or a WorkerStartError);
    ``exited`` resolves when the process has terminated and been reaped."""

    def __init__(self, spec: WorkerSpec, on_message: Callable[[WorkerHandle, FromWorker], None],
                 on_exit: Callable[[WorkerHandle], None]) -> None:
        self.rank = spec.rank
        self.serving = False  # joined the world at least once; the scheduler may use it
        self.leaving: str | None = None  # why the worker said it leaves (protocol.Leaving)
        self._loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[ModelInfo] = self._loop.create_future()
        self.exited: asyncio.Future[int] = self._loop.create_future()
        self._on_message = on_message
        self._on_exit = on_exit
        self._pending: collections.deque[tuple[bytes, int]] = collections.deque()
        # engine -> worker: the worker blocks on data; the engine's loop watches space.
        self._cmd = ShmRing.create(spec.ring_capacity, nonblocking_space=True)
        process = None
        try:
            # worker -> engine: the engine's loop watches data; the worker blocks on space.
            self._out = ShmRing.create(spec.ring_capacity, nonblocking_data=True)
            spec = msgspec.structs.replace(spec, cmd_fds=self._cmd.fds, out_fds=self._out.fds)
            process = subprocess.Popen(
                [sys.executable, "-m", "engine.executor.worker_main", encode_spec(spec)],
                pass_fds=(*self._cmd.fds, *self._out.fds, spec.parent_fd),
                env=child_env(spec.threads), stdin=subprocess.DEVNULL)
            self._pidfd = os.pidfd_open(process.pid)
        except BaseException:
            if process is not None:
                process.kill()
                process.wait()
            self._close_rings()
            raise
        self.process = process
        self._writer = RingWriter(self._cmd)
        self._reader = RingReader(self._out)
        self.pid = self.process.pid
        self._loop.add_reader(self._out.data_fd, self._drain)
        self._loop.add_reader(self._pidfd, self._reap)
        self._ended = False

    @property
    def alive(self) -> bool:
        return not self._ended

    def send(self, payload: bytes) -> None:
        """Queue an encoded message for the worker without blocking."""
        if self._ended:
            return
        if self._pending:
            self._pending.append((payload, 0))
            return
        offset = self._writer.write_some(payload)
        if offset < frame_size(len(payload)):
            self._pending.append((payload, offset))
            self._loop.add_reader(self._cmd.space_fd, self._flush)

    def _flush(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._cmd.space_fd)
        while self._pending:
            payload, offset = self._pending[0]
            offset = self._writer.write_some(payload, offset)
            if offset < frame_size(len(payload)):
                self._pending[0] = (payload, offset)
                return
            self._pending.popleft()
        self._loop.remove_reader(self._cmd.space_fd)

    def _drain(self) -> None:
        for message in self._reader.drain(from_worker_decoder.decode, consume_signal=True):
            self._on_message(self, message)
            if self._ended:
                return

    def kill(self) -> None:
        if not self._ended and self.process.returncode is None:
            self.process.kill()

    def _reap(self) -> None:
        """The process has terminated: deliver what it sent before, then report."""
        self._drain()
        self.process.wait()
        self._end()
        if not self.ready.done():
            self.ready.set_exception(WorkerStartError(
                f"worker {self.rank} (pid {self.pid}) {describe_exit(self.process.returncode)} "
                "while starting; see its log above"))
            self.ready.exception()  # retrieved: the owner may not be waiting any more
        self.exited.set_result(self.process.returncode)
        self._on_exit(self)

    def _end(self) -> None:
        self._ended = True
        self._pending.clear()
        for fd in (self._out.data_fd, self._pidfd, self._cmd.space_fd):
            self._loop.remove_reader(fd)
        os.close(self._pidfd)
        self._close_rings()

    def _close_rings(self) -> None:
        self._cmd.close()
        if hasattr(self, "_out"):
            self._out.close()

    @property
    def exit_reason(self) -> str:
        if self.leaving is not None and self.process.returncode == EXIT_REPLACE_ME:
            return f"worker {self.rank} (pid {self.pid}) left to be replaced: {self.leaving}"
        return f"worker {self.rank} (pid {self.pid}) {describe_exit(self.process.returncode)}"
