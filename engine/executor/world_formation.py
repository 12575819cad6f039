"""Forming the workers' torch.distributed world, and forming it again after a failure.

The world. Every worker joins one torch.distributed world at start-up. A process that
died cannot rejoin it, so once the replacement has loaded the model, the world is formed
again under a new epoch: every worker leaves and rejoins. Each worker handles its
command ring in order, and a submit writes to all member rings in one loop callback, so
every rank sees tasks and JoinWorld in the same order. The executor still sends JoinWorld
only when no multi-rank task is in flight, and holds new multi-rank tasks until every
rank has joined: no collective straddles two worlds. Single-rank tasks keep flowing.
A rank that does not answer JoinWorld within ``join_timeout_s`` (plus a grace) is stuck
(say, leaving a world whose peer died) and is killed, which moves the world to the next
epoch.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.distributed.shm_channels import World as ChannelsOwner
from engine.executor.protocol import Joined, JoinFailed, JoinWorld
from engine.executor.worker_handle import WorkerStartError

if TYPE_CHECKING:
    from engine.executor.worker_handle import WorkerHandle
    from engine.messages import Task

logger = logging.getLogger("engine.executor.multiproc")

MAX_JOIN_FAILURES = 3


@dataclass
class World:
    """Book of the world's re-formation."""

    epoch: int = -1
    needed: bool = True  # a (re)join is due once every rank is ready
    joining: set[int] = field(default_factory=set)  # ranks that owe an answer for ``epoch``
    failed: bool = False  # a rank failed to join ``epoch``
    interrupted: bool = False  # a rank died while ``epoch`` was forming (not the world's fault)
    failures: int = 0  # consecutive failed epochs
    formed: asyncio.Future[None] | None = None


class WorldFormation:
    """The world's part of ``MultiprocExecutor`` (a mixin: it reads the executor's worker
    handles, channels and in-flight book)."""

    join_timeout_s = 60.0
    join_grace_s = 10.0  # past the workers' own rendezvous timeout, a rank is stuck
    _world: World
    _handles: list[WorkerHandle | None]
    _num_workers: int
    _closing: bool
    _on_gpu: bool
    _channels: ChannelsOwner | None
    _multi_inflight: dict[int, tuple[int, ...]]
    _returning: set[int]
    _held: list[Task]
    _loop: asyncio.AbstractEventLoop
    # Also the executor's: _broadcast, _send_task, _close_channels, _give_up, _on_restart.

    def _maybe_form_world(self) -> None:
        world = self._world
        if self._closing or not world.needed or world.joining or self._multi_inflight:
            return
        handles = [h for h in self._handles if h is not None and h.alive and h.ready.done()
                   and h.ready.exception() is None]
        if len(handles) < self._num_workers:
            return
        world.needed, world.failed, world.interrupted = False, False, False
        world.epoch += 1
        world.joining = {h.rank for h in handles}
        logger.info("forming world epoch %d over %d workers", world.epoch, len(handles))
        self._close_channels()
        if not self._on_gpu:
            self._channels = ChannelsOwner(self._num_workers)
        spec = self._channels.spec if self._channels is not None else None
        self._broadcast(JoinWorld(world.epoch, self._num_workers, spec), sorted(world.joining))
        self._loop.call_later(self.join_timeout_s + self.join_grace_s, self._join_overdue, world.epoch)

    def _join_overdue(self, epoch: int) -> None:
        """Kill the ranks that still owe an answer for ``epoch``: they are stuck."""
        world = self._world
        if self._closing or world.epoch != epoch:
            return
        for rank in sorted(world.joining):
            handle = self._handles[rank]
            if handle is not None and handle.alive:
                logger.error("worker %d did not join world epoch %d within %.0f s; killing it", rank, epoch,
                             self.join_timeout_s + self.join_grace_s)
                handle.kill()

    def _join_answered(self, rank: int, message: Joined | JoinFailed) -> None:
        world = self._world
        if message.epoch != world.epoch or rank not in world.joining:
            return
        world.joining.discard(rank)
        if isinstance(message, JoinFailed):
            logger.error("worker %d could not join world epoch %d: %s", rank, message.epoch, message.message)
            world.failed = True
        if not world.joining:
            self._world_settled()

    def _world_settled(self) -> None:
        """Every rank has answered this epoch's JoinWorld (or died)."""
        world = self._world
        if self._channels is not None:
            self._channels.unlink()  # every rank that joined has attached; nothing else may
        if world.failed or world.needed:
            world.failures += world.failed and not world.interrupted
            world.needed = True
            if world.failures >= MAX_JOIN_FAILURES:
                self._give_up(0, f"the workers failed {world.failures} times to form their "
                              "torch.distributed world; see the worker logs")
            elif world.formed is not None and not world.formed.done() and world.failed:
                world.formed.set_exception(WorkerStartError(
                    "a worker could not join the torch.distributed world; see the worker logs"))
            else:
                self._maybe_form_world()
            return
        world.failures = 0
        if world.formed is not None and not world.formed.done():
            world.formed.set_result(None)
        for rank in sorted(self._returning):
            handle = self._handles[rank]
            if handle is not None and handle.alive:
                handle.serving = True
                logger.info("worker %d is back (pid %d)", rank, handle.pid)
                self._on_restart(rank)
        self._returning.clear()
        held, self._held = self._held, []
        for task in held:
            self._send_task(task)
