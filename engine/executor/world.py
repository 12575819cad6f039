"""The torch.distributed world of a worker process: one rendezvous per epoch.

Every worker joins one world over all ranks (gloo on CPU, NCCL on GPU) so the
collectives that follow (engine/distributed/) never create a communicator on the hot
path. A process that died cannot rejoin the world it left, so when the engine replaces a
worker it asks every worker to join a new epoch's world: each leaves the old one and
rendezvous again, under a key prefix of that epoch, through the TCPStore the engine
process serves.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.executor.protocol import WorkerSpec

logger = logging.getLogger(__name__)


class World:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.epoch: int | None = None
        self._store: dist.TCPStore | None = None

    @property
    def backend(self) -> str:
        return "nccl" if self.spec.device.startswith("cuda") else "gloo"

    def join(self, epoch: int, world_size: int) -> None:
        """Leave the current world (if any) and join ``epoch``'s; ends with a barrier, so a
        return means every rank is connected."""
        self.leave()
        spec = self.spec
        timeout = timedelta(seconds=spec.join_timeout_s)
        if self._store is None:
            self._store = dist.TCPStore(spec.store_host, spec.store_port, is_master=False,
                                        timeout=timeout)
        store = dist.PrefixStore(f"gfdit/world/{epoch}", self._store)
        device_id = torch.device(spec.device) if self.backend == "nccl" else None
        dist.init_process_group(self.backend, store=store, rank=spec.rank, world_size=world_size,
                                timeout=timeout, device_id=device_id)
        dist.barrier()
        self.epoch = epoch
        setup_collectives(spec, epoch)
        logger.info("rank %d joined world epoch %d (%d ranks, %s)", spec.rank, epoch, world_size,
                    self.backend)

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        self.epoch = None


def setup_collectives(spec: WorkerSpec, epoch: int) -> None:
    """Where the group-free collectives (engine/distributed/group_free.py) set up their
    per-world state (shared buffers, warmed-up peer pairs), once per epoch, after every rank
    has joined. Nothing to do until they exist."""
