"""On GPUs: the group-free collectives and migrations over real NCCL, with real tensors.

Needs two GPUs: NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), so on a
one-GPU machine only the start-up refusal of that layout runs (a single GPU serves one
worker; several workers need the CPU path or more GPUs). Run with ``pytest -m gpu``.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (NCCL refuses two ranks on one)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int) -> None:
    """Both ranks: collectives, then a migration of a real request state GPU to GPU."""
    from datetime import timedelta

    import torch.distributed as dist

    from engine.distributed.group_free import NcclCollectives
    from engine.executor.migration import run_migrations
    from engine.messages import Migration, Stage, Task
    from engine.models.loader import load_adapter
    from engine.request import ImageParams, Limits

    device = torch.device(f"cuda:{rank}")
    torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("nccl", store=store, rank=rank, world_size=2, device_id=device,
                            timeout=timedelta(seconds=120))
    try:
        comm = NcclCollectives(rank, 2, device)
        me = torch.full((4, 8), float(rank), device=device)
        gathered = comm.all_gather((1, 0), me)
        assert [float(t[0, 0]) for t in gathered] == [1.0, 0.0]
        swapped = comm.all_to_all((0, 1), [me + 10 * j for j in range(2)])
        assert [float(t[0, 0]) for t in swapped] == [10 * rank, 1 + 10 * rank]
        comm.barrier((0, 1))
        got = comm.exchange_bytes({1 - rank: bytes([rank]) * 1000}, [1 - rank])
        assert got[1 - rank] == bytes([1 - rank]) * 1000
        # A request's state moves from rank 0 to rank 1 as device tensors; both then take
        # the same next step and compare.
        adapter = load_adapter("tiny-pixart", str(device), "float32")
        params = ImageParams(seed=7, num_inference_steps=4, width=64, height=64).resolve(adapter.info(), Limits())
        states = {}
        if rank == 0:
            cond, uncond = adapter.encode(["a red fox"], [params])[0]
            states["a"] = adapter.prepare("a", params, cond, uncond)
            adapter.denoise([states["a"]])
        task = Task(1, Stage.DENOISE, ["a"], (1,), migrations=[Migration("a", 0, (1,))])
        before = states["a"].latents.clone() if rank == 0 else None
        if rank == 0:
            run_migrations(task, rank, {"a": states["a"]}, adapter, comm)  # rank 0 keeps its copy here
            adapter.denoise([states["a"]])
            comm.send(states["a"].latents, 1)
            comm.send(before, 1)
        else:
            run_migrations(task, rank, states, adapter, comm)
            moved = states["a"]
            assert moved.latents.device == device and moved.step == 1
            adapter.denoise([moved])
            theirs = comm.recv(moved.latents, 0)
            sent = comm.recv(moved.latents, 0)
            torch.cuda.synchronize(device)
            assert torch.allclose(moved.latents, theirs, atol=1e-5), "the moved state continued differently"
            assert not torch.equal(sent, moved.latents)
    finally:
        dist.destroy_process_group()


@two_gpus
def test_collectives_and_a_migration_over_nccl_between_two_gpus():
    import torch.multiprocessing as mp

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mp.spawn(_rank_main, args=(_free_port(),), nprocs=2, join=True)


def test_two_workers_on_one_gpu_are_refused_at_start_up(monkeypatch):
    from engine.config import EngineConfig
    from engine.executor.multiproc import MultiprocExecutor
    from engine.executor.worker_handle import DeviceLayoutError

    workers = torch.cuda.device_count() + 1
    with pytest.raises(DeviceLayoutError, match="NCCL needs one GPU per worker"):
        MultiprocExecutor(EngineConfig.create(device="cuda", num_workers=workers))
