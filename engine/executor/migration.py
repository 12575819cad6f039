"""Moving request state between workers at the start of a task, peer to peer.

Each worker gathers the migrations of a task that involve it: states it must send (it is
a migration's source) and states it must receive (it is a destination). Everything for
one peer travels as one message of length-prefixed packed states, and all of a worker's
sends and receives run at once, so two workers that swap requests cannot deadlock.
"""

from __future__ import annotations

import struct

from engine.distributed.group_free import Collectives
from engine.executor.state_transfer import pack_state, unpack_state
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


def run_migrations(task: Task, rank: int, states: dict[str, RequestState], adapter: DiTAdapter,
                   comm: Collectives | None) -> None:
    """Send and receive this rank's share of ``task.migrations``; a rank that only sends
    (outside the task's group) drops what it sent."""
    outgoing: dict[int, list[bytes]] = {}
    incoming: set[int] = set()
    sent: list[str] = []
    for migration in task.migrations:
        if migration.src == rank:
            state = states.get(migration.request_id)
            if state is None:
                raise RuntimeError(f"rank {rank} must send request {migration.request_id} but holds no state")
            packed = pack_state(state)
            for dst in migration.dsts:
                outgoing.setdefault(dst, []).append(packed)
            sent.append(migration.request_id)
        if rank in migration.dsts:
            incoming.add(migration.src)
    if not outgoing and not incoming:
        return
    if comm is None:
        raise RuntimeError(f"task {task.task_id} moves state between workers, but rank {rank} has no collectives")
    received = comm.exchange_bytes({dst: _frame(parts) for dst, parts in outgoing.items()}, sorted(incoming))
    for data in received.values():
        for part in _unframe(data):
            state = unpack_state(part, adapter)
            states[state.request_id] = state
    if rank not in task.group:
        for request_id in sent:
            states.pop(request_id, None)
