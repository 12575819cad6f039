"""Moving request state between workers at the start of a task, peer to peer.

Each worker gathers the migrations of a task that involve it: states it must send (it is
a migration's source) and states it must receive (it is a destination). Everything for
one peer travels as one message of length-prefixed packed states, and all of a worker's
sends and receives run at once, so two workers that swap requests cannot deadlock.

Two paths (``tensor_path``): over shared memory (CPU) the states travel whole as bytes;
over NCCL (GPU) the bytes carry only a small header per state and the device tensors
follow in one batch of transfers, straight from GPU to GPU.
"""

from __future__ import annotations

import struct

from engine.distributed.group_free import Collectives
from engine.executor.state_transfer import direct_specs, pack_parts, unpack_state
from engine.messages import Task
from engine.models.base import DiTAdapter, RequestState


def _frame(parts: list[bytes]) -> bytes:
    return b"".join(struct.pack("<Q", len(p)) + p for p in parts)


def _unframe(data: bytes) -> list[bytes]:
    parts, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        parts.append(data[offset + 8:offset + 8 + length])
        offset += 8 + length
    return parts


def tensor_path(comm: Collectives) -> bool:
    """Whether migrations over ``comm`` send device tensors directly (NCCL) or bytes."""
    return comm.moves_device_tensors


def run_migrations(task: Task, rank: int, states: dict[str, RequestState], adapter: DiTAdapter,
                   comm: Collectives | None) -> None:
    """Send and receive this rank's share of ``task.migrations``; a rank that only sends
    (outside the task's group) drops what it sent."""
    sending: list[tuple[RequestState, tuple[int, ...]]] = []
    incoming: set[int] = set()
    for migration in task.migrations:
        if migration.src == rank:
            state = states.get(migration.request_id)
            if state is None:
                raise RuntimeError(f"rank {rank} must send request {migration.request_id} but holds no state")
            sending.append((state, migration.dsts))
        if rank in migration.dsts:
            incoming.add(migration.src)
    if not sending and not incoming:
        return
    if comm is None:
        raise RuntimeError(f"task {task.task_id} moves state between workers, but rank {rank} has no collectives")
    direct = tensor_path(comm)
    outgoing: dict[int, list[bytes]] = {}
    outgoing_tensors: dict[int, list] = {}
    for state, dsts in sending:
        packed, tensors = pack_parts(state, adapter.device if direct else None)
        for dst in dsts:
            outgoing.setdefault(dst, []).append(packed)
            outgoing_tensors.setdefault(dst, []).extend(tensors)
    received = comm.exchange_bytes({dst: _frame(parts) for dst, parts in outgoing.items()}, sorted(incoming))
    parts = {src: _unframe(data) for src, data in received.items()}
    tensors_in: dict[int, list] = {}
    if direct:
        specs = {src: [spec for part in src_parts for spec in direct_specs(part)] for src, src_parts in parts.items()}
        tensors_in = comm.exchange_tensors(outgoing_tensors, specs)
    for src, src_parts in parts.items():
        tensors = tensors_in.get(src, [])
        for part in src_parts:
            count = len(direct_specs(part)) if direct else 0
            state = unpack_state(part, adapter, tensors[:count])
            tensors = tensors[count:]
            states[state.request_id] = state
    if rank not in task.group:
        for state, _ in sending:
            states.pop(state.request_id, None)
