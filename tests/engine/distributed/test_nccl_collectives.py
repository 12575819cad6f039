"""NcclCollectives and migrations over them, against a stand-in for torch.distributed's
point-to-point calls: two ranks on two threads, each transfer a tensor handed between them.

What NCCL itself does (GPU to GPU) is shown by test_nccl_gpu.py on a GPU; here: which
tensors travel, on which device, in which order, and that a state moved this way is the
state that was sent.
"""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace as NS

import pytest
import torch

from engine.distributed.group_free import NcclCollectives, ShmCollectives
from engine.executor.migration import run_migrations, tensor_path
from engine.executor.state_transfer import direct_specs, pack_parts, pack_state
from engine.messages import Migration, NewRequest, Stage, Task
from engine.models.loader import load_adapter
from engine.request import ImageParams, Limits


class Fabric:
    """Per ordered pair of ranks, the tensors in flight, matched in posting order as NCCL does."""

    def __init__(self) -> None:
        self.pairs: dict[tuple[int, int], queue.Queue] = {}
        self.lock = threading.Lock()
        self.sent: list[tuple[int, int, torch.device, torch.Size]] = []

    def pair(self, src: int, dst: int) -> queue.Queue:
        with self.lock:
            return self.pairs.setdefault((src, dst), queue.Queue())

    def dist(self, rank: int):
        fabric = self

        def batch_isend_irecv(ops):
            for op in ops:
                if op.op == "isend":
                    fabric.sent.append((rank, op.peer, op.tensor.device, op.tensor.shape))
                    fabric.pair(rank, op.peer).put(op.tensor.clone())
            for op in ops:
                if op.op == "irecv":
                    got = fabric.pair(op.peer, rank).get(timeout=10)
                    assert got.shape == op.tensor.shape and got.dtype == op.tensor.dtype, "transfers out of step"
                    op.tensor.copy_(got)
            return [NS(wait=lambda: None)]

        return NS(isend="isend", irecv="irecv", batch_isend_irecv=batch_isend_irecv,
                  P2POp=lambda op, tensor, peer: NS(op=op, tensor=tensor, peer=peer))


def on_two_ranks(fabric: Fabric, device: torch.device, work):
    """Run ``work(comm)`` on rank 0 and 1 at once; their results."""
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            comm = NcclCollectives(rank, 2, device, dist=fabric.dist(rank))
            results[rank] = work(comm)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return results


def test_the_barrier_moves_a_device_tensor_not_a_host_one():
    fabric = Fabric()
    on_two_ranks(fabric, torch.device("meta"), lambda comm: comm.barrier((0, 1)))
    assert fabric.sent and {device.type for _, _, device, _ in fabric.sent} == {"meta"}


def test_collectives_over_point_to_point_transfers():
    fabric = Fabric()

    def work(comm):
        me = torch.full((2, 3), float(comm.rank))
        gathered = comm.all_gather((1, 0), me)
        swapped = comm.all_to_all((0, 1), [me + 10 * j for j in range(2)])
        return gathered, swapped

    out = on_two_ranks(fabric, torch.device("cpu"), work)
    for rank in (0, 1):
        gathered, swapped = out[rank]
        assert [float(t[0, 0]) for t in gathered] == [1.0, 0.0]
        assert [float(t[0, 0]) for t in swapped] == [10 * rank, 1 + 10 * rank]


@pytest.fixture(scope="module")
def adapter():
    return load_adapter("tiny-pixart", "cpu")


def encoded(adapter, rid: str, seed: int):
    params = ImageParams(seed=seed, num_inference_steps=4, width=64, height=64).resolve(adapter.info(), Limits())
    new = NewRequest(rid, "a red fox", params)
    cond, uncond = adapter.encode([new.prompt], [params])[0]
    state = adapter.prepare(rid, params, cond, uncond)
    adapter.denoise([state])
    return state


def test_the_path_is_chosen_by_the_collectives():
    assert NcclCollectives.moves_device_tensors and not ShmCollectives.moves_device_tensors
    assert tensor_path(NS(moves_device_tensors=True)) and not tensor_path(NS(moves_device_tensors=False))


def test_the_header_is_small_and_lists_the_tensors_that_travel_beside_it(adapter):
    state = encoded(adapter, "r", seed=4)
    header, tensors = pack_parts(state, adapter.device)
    assert len(header) < len(pack_state(state)) // 10 and len(header) < 16 << 10
    assert [(list(t.shape), t.dtype) for t in tensors] == direct_specs(header)
    assert any(t is state.latents or t.data_ptr() == state.latents.data_ptr() for t in tensors)
    assert pack_parts(state)[1] == []  # without a device, everything goes inline


def test_states_swap_over_nccl_as_tensors_and_continue_exactly(adapter):
    """Rank 0 sends request a to rank 1 while rank 1 sends b to rank 0, in one exchange."""
    a, b = encoded(adapter, "a", seed=5), encoded(adapter, "b", seed=6)
    task = Task(1, Stage.DENOISE, ["a", "b"], (0, 1), migrations=[Migration("a", 0, (1,)), Migration("b", 1, (0,))])
    held = {0: {"a": a}, 1: {"b": b}}
    fabric = Fabric()
    on_two_ranks(fabric, adapter.device, lambda comm: run_migrations(task, comm.rank, held[comm.rank], adapter, comm))
    assert set(held[0]) == set(held[1]) == {"a", "b"}
    latents_moved = [s for s in fabric.sent if s[3] == a.latents.shape]
    assert len(latents_moved) >= 2  # the latents crossed as tensors, both ways
    moved = held[1]["a"]
    assert moved is not a and moved.step == a.step and torch.equal(moved.latents, a.latents)
    assert all(torch.equal(moved.cond[k], a.cond[k]) for k in a.cond)
    adapter.denoise([moved])
    adapter.denoise([a])
    assert torch.equal(moved.latents, a.latents)  # scheduler and generator came along
