"""Group-free collectives: all_to_all, all_gather, send/recv and barrier over ANY ordered
tuple of world ranks, with no communicator created per group.

After one world set-up at start, a group is only a tuple of ranks. Creating a
communicator for a new group (``torch.distributed.new_group``) costs milliseconds with
gloo and hundreds of milliseconds with NCCL; here regrouping between two denoising steps
costs nothing. Only the group's members take part; a rank outside it is never involved.

Backends:
- ``ShmCollectives`` (CPU): pairwise shared-memory channels (``shm_channels``), blocking
  on doorbells, never polling.
- ``NcclCollectives`` (GPU): point-to-point ``isend``/``irecv`` over the single world
  communicator, so any subset of ranks can talk without a new one; every pair is warmed
  up once at start-up.
Both raise ``CollectiveError`` when a peer dies or a collective outlasts its timeout. On
NCCL the timeout is the process group's (engine/executor/world.py): its watchdog ends an
operation that outlasts it by ending the process, which the engine then replaces.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from engine.distributed.shm_channels import (
    Channels,
    CollectiveError,
    RecvOp,
    SendOp,
    WorldSpec,
    run_ops,
)

Group = tuple[int, ...]

__all__ = ["CollectiveError", "Collectives", "Group", "NcclCollectives", "ShmCollectives"]


class Collectives(ABC):
    """Collectives of one rank over arbitrary groups of world ranks."""

    rank: int
    world_size: int
    # Whether the next world epoch replaces everything these collectives hold (CPU: a fresh
    # shared-memory segment), so that a member whose peer died may stay; NCCL's
    # communicator may still hold operations that never complete.
    renewed_with_world: ClassVar[bool] = False
    # Whether a migration sends the state's device tensors as they are (NCCL) rather than
    # as bytes (engine/executor/migration.py).
    moves_device_tensors: ClassVar[bool] = False

    def _index(self, group: Group) -> int:
        try:
            return group.index(self.rank)
        except ValueError:
            raise CollectiveError(f"rank {self.rank} is not in group {group}") from None

    @abstractmethod
    def all_to_all(self, group: Group, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Send ``chunks[j]`` to ``group[j]``; return what each ``group[i]`` sent us, in group order.

        Every member's chunk for us must have the shape and dtype of our chunk for it.
        """

    @abstractmethod
    def all_gather(self, group: Group, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every member's ``tensor`` (same shape and dtype everywhere), in group order."""

    @abstractmethod
    def send(self, tensor: torch.Tensor, dst: int) -> None: ...

    @abstractmethod
    def recv(self, like: torch.Tensor, src: int) -> torch.Tensor:
        """A tensor of ``like``'s shape and dtype from ``src``."""

    def send_bytes(self, data: bytes, dst: int) -> None:
        self.exchange_bytes({dst: data}, ())

    def recv_bytes(self, src: int) -> bytes:
        return self.exchange_bytes({}, (src,))[src]

    @abstractmethod
    def exchange_bytes(self, outgoing: dict[int, bytes], incoming: Sequence[int]) -> dict[int, bytes]:
        """Send one message to each peer in ``outgoing`` and receive one from each peer in
        ``incoming``, all at once (so two ranks sending to each other cannot deadlock)."""

    def barrier(self, group: Group) -> None:
        """Return once every member of ``group`` has entered the barrier."""
        self.all_gather(group, torch.zeros(1, dtype=torch.uint8))

    def exchange_tensors(self, outgoing: dict[int, list[torch.Tensor]],
                         incoming: dict[int, list[tuple[list[int], torch.dtype]]]) -> dict[int, list[torch.Tensor]]:
        """Send each peer in ``outgoing`` its tensors and receive, from each peer in
        ``incoming``, tensors of the given shapes and dtypes, all at once."""
        raise NotImplementedError(f"{type(self).__name__} moves state as bytes")

    def close(self) -> None:
        return None


def _as_bytes(tensor: torch.Tensor) -> np.ndarray:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


class ShmCollectives(Collectives):
    """CPU collectives over the world's shared-memory channels."""

    renewed_with_world = True

    def __init__(self, spec: WorldSpec, rank: int, timeout_s: float = 60.0) -> None:
        self.rank = rank
        self.world_size = spec.world_size
        self.channels = Channels(spec, rank, timeout_s)

    def all_to_all(self, group: Group, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        me = self._index(group)
        if len(chunks) != len(group):
            raise ValueError(f"all_to_all over {group} needs {len(group)} chunks, got {len(chunks)}")
        out = [torch.empty_like(c, memory_format=torch.contiguous_format) for c in chunks]
        ops: list[SendOp | RecvOp] = []
        for j, peer in enumerate(group):
            if j == me:
                out[j].copy_(chunks[j])
                continue
            ops.append(SendOp(self.channels, peer, _as_bytes(chunks[j])))
            ops.append(RecvOp(self.channels, peer, _as_bytes(out[j])))
        run_ops(self.channels, ops)
        return out

    def all_gather(self, group: Group, tensor: torch.Tensor) -> list[torch.Tensor]:
        me = self._index(group)
        payload = _as_bytes(tensor)
        out = [tensor.clone() if j == me else torch.empty_like(tensor, memory_format=torch.contiguous_format)
               for j in range(len(group))]
        ops: list[SendOp | RecvOp] = []
        for j, peer in enumerate(group):
            if j != me:
                ops.append(SendOp(self.channels, peer, payload))
                ops.append(RecvOp(self.channels, peer, _as_bytes(out[j])))
        run_ops(self.channels, ops)
        return out

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        run_ops(self.channels, [SendOp(self.channels, dst, _as_bytes(tensor))])

    def recv(self, like: torch.Tensor, src: int) -> torch.Tensor:
        out = torch.empty_like(like, memory_format=torch.contiguous_format)
        run_ops(self.channels, [RecvOp(self.channels, src, _as_bytes(out))])
        return out

    def exchange_bytes(self, outgoing: dict[int, bytes], incoming: Sequence[int]) -> dict[int, bytes]:
        sends = [SendOp(self.channels, dst, np.frombuffer(data, dtype=np.uint8)) for dst, data in outgoing.items()]
        recvs = {src: RecvOp(self.channels, src) for src in incoming}
        run_ops(self.channels, [*sends, *recvs.values()])
        return {src: op.out.tobytes() for src, op in recvs.items()}  # type: ignore[union-attr]

    def close(self) -> None:
        self.channels.close()


class NcclCollectives(Collectives):
    """GPU collectives as batched point-to-point operations on the world communicator.

    ``torch.distributed`` must already be initialised over the world (NCCL). P2P calls on
    the default group name peers by world rank, so no sub-communicator is ever made.
    ``dist`` stands in for ``torch.distributed`` in tests.
    """

    moves_device_tensors = True

    def __init__(self, rank: int, world_size: int, device: torch.device, timeout_s: float = 60.0,
                 dist: Any = None) -> None:
        if dist is None:
            import torch.distributed as dist

        self.dist = dist
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.timeout_s = timeout_s
        self._warm_up()

    def _warm_up(self) -> None:
        # NCCL connects a pair lazily on its first transfer; connect every pair now so the
        # first real regroup does not pay for it. Every rank takes part, in one batch.
        probe = torch.zeros(1, device=self.device)
        for peer in range(self.world_size):
            if peer != self.rank:
                lo, hi = sorted((self.rank, peer))
                group = (lo, hi)
                self.all_gather(group, probe)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self, group: Group) -> None:
        # NCCL moves device tensors only: the base class's CPU probe would be refused.
        self.all_gather(group, torch.zeros(1, dtype=torch.uint8, device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # NCCL work only queues; a barrier must wait

    def exchange_tensors(self, outgoing: dict[int, list[torch.Tensor]],
                         incoming: dict[int, list[tuple[list[int], torch.dtype]]]) -> dict[int, list[torch.Tensor]]:
        received = {src: [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in specs]
                    for src, specs in incoming.items()}
        # Both ends know every shape, so both skip the empty tensors. Transfers between one
        # pair are matched in the order they were posted.
        self._exchange([(t.contiguous(), dst) for dst, tensors in outgoing.items() for t in tensors if t.numel()],
                       [(t, src) for src, tensors in received.items() for t in tensors if t.numel()])
        return received

    def _exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
        dist = self.dist
        ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
        if not ops:
            return
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def all_to_all(self, group: Group, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        me = self._index(group)
        out = [torch.empty_like(c, memory_format=torch.contiguous_format) for c in chunks]
        out[me].copy_(chunks[me])
        self._exchange([(chunks[j].contiguous(), peer) for j, peer in enumerate(group) if j != me],
                       [(out[j], peer) for j, peer in enumerate(group) if j != me])
        return out

    def all_gather(self, group: Group, tensor: torch.Tensor) -> list[torch.Tensor]:
        me = self._index(group)
        tensor = tensor.contiguous()
        out = [tensor.clone() if j == me else torch.empty_like(tensor) for j in range(len(group))]
        self._exchange([(tensor, peer) for j, peer in enumerate(group) if j != me],
                       [(out[j], peer) for j, peer in enumerate(group) if j != me])
        return out

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._exchange([(tensor.contiguous(), dst)], [])

    def recv(self, like: torch.Tensor, src: int) -> torch.Tensor:
        out = torch.empty_like(like, memory_format=torch.contiguous_format)
        self._exchange([], [(out, src)])
        return out

    def exchange_bytes(self, outgoing: dict[int, bytes], incoming: Sequence[int]) -> dict[int, bytes]:
        # Sizes first, so each receiver can allocate; then the payloads, all in one batch.
        sizes_out = [(torch.tensor([len(d)], dtype=torch.int64, device=self.device), dst)
                     for dst, d in outgoing.items()]
        sizes_in = {src: torch.zeros(1, dtype=torch.int64, device=self.device) for src in incoming}
        self._exchange(sizes_out, [(t, src) for src, t in sizes_in.items()])
        payloads_out = [(torch.frombuffer(bytearray(d), dtype=torch.uint8).to(self.device), dst)
                        for dst, d in outgoing.items() if d]
        payloads_in = {src: torch.empty(int(t.item()), dtype=torch.uint8, device=self.device)
                       for src, t in sizes_in.items()}
        self._exchange(payloads_out, [(t, src) for src, t in payloads_in.items() if t.numel()])
        return {src: t.cpu().numpy().tobytes() for src, t in payloads_in.items()}
