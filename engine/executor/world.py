"""The torch.distributed world of a worker process: one rendezvous per epoch.

Every worker joins one world over all ranks (gloo on CPU, NCCL on GPU) so the
collectives that follow (engine/distributed/) never create a communicator on the hot
path. A process that died cannot rejoin the world it left, so when the engine replaces a
worker it asks every worker to join a new epoch's world: each leaves the old one and
rendezvous again, under a key prefix of that epoch, through the TCPStore the engine
process serves. With the world comes this rank's group-free collectives: over the world's
NCCL communicator on GPU, over the epoch's shared-memory channels on CPU.

Leaving after a failure (a new epoch means a peer was replaced or a task failed across
ranks) aborts the NCCL communicator instead of destroying it: ``destroy_process_group``
may wait for a peer that is gone. Only a clean shutdown destroys it. On NCCL the process
group's timeout is the collectives' timeout: its watchdog ends an operation that outlasts
it, and the process with it, and the engine replaces the process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch

from engine.distributed.group_free import Collectives, NcclCollectives, ShmCollectives
from engine.distributed.shm_channels import WorldSpec
from engine.executor.protocol import WorkerSpec

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 600.0


class World:
    def __init__(self, spec: WorkerSpec, dist: Any = None,
                 collectives: Callable[[WorkerSpec, int, WorldSpec | None], Collectives] | None = None) -> None:
        """``dist`` and ``collectives`` stand in for ``torch.distributed`` and
        ``make_collectives`` in tests."""
        if dist is None:
            import torch.distributed as dist

        self.dist = dist
        self._make_collectives = collectives or make_collectives
        self.spec = spec
        self.epoch: int | None = None
        self.comm: Collectives | None = None
        self._store: Any = None

    @property
    def backend(self) -> str:
        return "nccl" if self.spec.device.startswith("cuda") else "gloo"

    def join(self, epoch: int, world_size: int, channels: WorldSpec | None = None) -> None:
        """Leave the current world (if any) and join ``epoch``'s; ends with a barrier, so a
        return means every rank is connected and has attached its collectives (the engine
        removes the channels' names once every rank answered)."""
        dist = self.dist
        self.leave(abort=True)
        spec = self.spec
        timeout = timedelta(seconds=spec.join_timeout_s)
        if self._store is None:
            self._store = dist.TCPStore(spec.store_host, spec.store_port, is_master=False,
                                        timeout=timeout)
        store = dist.PrefixStore(f"gfdit/world/{epoch}", self._store)
        device_id = torch.device(spec.device) if self.backend == "nccl" else None
        # NCCL's watchdog enforces the process group's timeout on every operation.
        group_timeout = timedelta(seconds=collective_timeout_s(spec)) if self.backend == "nccl" else timeout
        dist.init_process_group(self.backend, store=store, rank=spec.rank, world_size=world_size,
                                timeout=group_timeout, device_id=device_id)
        self.comm = self._make_collectives(spec, world_size, channels)
        dist.barrier()
        self.epoch = epoch
        logger.info("rank %d joined world epoch %d (%d ranks, %s)", spec.rank, epoch, world_size,
                    self.backend)

    def leave(self, abort: bool = False) -> None:
        """Leave the world; ``abort`` on a failure path (see the module docstring)."""
        dist = self.dist
        if self.comm is not None:
            self.comm.close()
            self.comm = None
        if dist.is_initialized():
            if abort and self.backend == "nccl":
                dist.distributed_c10d._abort_process_group()
            else:
                dist.destroy_process_group()
        self.epoch = None


def collective_timeout_s(spec: WorkerSpec) -> float:
    # A dead peer is seen within a second on CPU (and by the engine on GPU); the timeout only
    # ends a collective whose peer is alive but never comes (it must outlast the longest
    # single-rank task a member may be finishing first).
    return max(spec.join_timeout_s, COLLECTIVE_TIMEOUT_S)


def make_collectives(spec: WorkerSpec, world_size: int, channels: WorldSpec | None) -> Collectives:
    """This rank's collectives over any group of the world's ranks, made once per epoch."""
    timeout_s = collective_timeout_s(spec)
    if spec.device.startswith("cuda"):
        return NcclCollectives(spec.rank, world_size, torch.device(spec.device), timeout_s)
    if channels is None:
        raise RuntimeError("a CPU world needs shared-memory channels for its collectives")
    return ShmCollectives(channels, spec.rank, timeout_s)
