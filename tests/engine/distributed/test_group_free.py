"""Group-free collectives between real processes over shared memory (CPU backend)."""

import multiprocessing as mp
import os
import time
import traceback

import pytest
import torch

from engine.distributed.group_free import CollectiveError, ShmCollectives
from engine.distributed.shm_channels import SEGMENT_PREFIX, World


def _payload(src: int, dst: int, numel: int) -> torch.Tensor:
    return torch.arange(numel, dtype=torch.float32) + 1000 * src + dst


def _scenarios(rank: int, comm: ShmCollectives, numel: int) -> dict:
    import torch.distributed as dist

    def no_new_group(*args, **kwargs):
        raise AssertionError("new_group must not be called")

    dist.new_group = no_new_group
    out = {}
    for group in [(0, 1, 2), (2, 0, 1), (0, 2), (1, 2), (2, 1)]:
        if rank not in group:
            continue  # a non-member is never involved
        chunks = [_payload(rank, peer, numel) for peer in group]
        got = comm.all_to_all(group, chunks)
        out[("a2a", group)] = [bool(torch.equal(t, _payload(peer, rank, numel))) for peer, t in zip(group, got)]
        gathered = comm.all_gather(group, torch.full((3, numel), float(rank)))
        out[("gather", group)] = [int(t[0, 0].item()) for t in gathered]
        comm.barrier(group)
    # Two ranks that send each other more than a slot holds, at once, must not deadlock.
    if rank in (1, 2):
        peer = 3 - rank
        got = comm.exchange_bytes({peer: bytes([rank]) * 200_000}, (peer,))
        out["exchange"] = got[peer] == bytes([peer]) * 200_000
    if rank == 0:
        comm.send_bytes(b"state of request 42" * 1000, 2)
        comm.send(torch.ones(5), 1)
    elif rank == 2:
        out["bytes"] = comm.recv_bytes(0) == b"state of request 42" * 1000
    else:
        out["tensor"] = comm.recv(torch.empty(5), 0).tolist()
    return out


def _worker(spec, rank, numel, queue, die_early):
    try:
        comm = ShmCollectives(spec, rank, timeout_s=20)
        if die_early and rank == 1:
            os._exit(0)
        if die_early:
            start = time.monotonic()
            try:
                comm.all_to_all((0, 1), [torch.zeros(4), torch.zeros(4)])
                queue.put((rank, "no error"))
            except CollectiveError as exc:
                queue.put((rank, (str(exc), time.monotonic() - start)))
            return
        queue.put((rank, _scenarios(rank, comm, numel)))
        comm.close()
    except Exception:  # noqa: BLE001
        queue.put((rank, traceback.format_exc()))


def _run(world_size, numel, capacity, die_early=False):
    ctx = mp.get_context("spawn")
    world = World(world_size, capacity=capacity)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(world.spec, r, numel, queue, die_early)) for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        expected = 1 if die_early else world_size
        results = dict(queue.get(timeout=120) for _ in range(expected))
    finally:
        for p in procs:
            p.join(timeout=30)
        world.close()
    return results


@pytest.mark.parametrize("numel, capacity", [(1000, 1 << 16), (300_000, 1 << 16)])
def test_collectives_over_any_ordered_group(numel, capacity):
    """The second case sends 1.2 MB messages through a 64 KiB slot: chunked in both directions."""
    results = _run(3, numel, capacity)
    for rank, out in results.items():
        assert isinstance(out, dict), out
        for key, value in out.items():
            if key[0] == "a2a":
                assert all(value), (rank, key)
            elif key[0] == "gather":
                assert value == list(key[1]), (rank, key)
    assert results[2]["bytes"] is True
    assert results[1]["exchange"] is True and results[2]["exchange"] is True
    assert results[1]["tensor"] == [1.0] * 5
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(SEGMENT_PREFIX)]


def test_a_collective_with_a_dead_peer_raises_instead_of_hanging():
    results = _run(2, 4, 1 << 16, die_early=True)
    message, waited = results[0]
    assert "peer rank 1 died" in message
    assert waited < 10
