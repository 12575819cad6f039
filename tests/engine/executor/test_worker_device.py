"""The worker against a stand-in device: its time counts the device's work, and the
failures after which it must not go on.

``LateDevice`` is a GPU in miniature: work queued by a step completes some time after the
Python call returns, and only ``synchronize`` waits for it (and raises an error the work
hit, as CUDA reports asynchronous errors).
"""

from __future__ import annotations

import time

import pytest
import torch

from engine.config import EngineConfig
from engine.distributed.shm_channels import CollectiveError, PeerDiedError
from engine.executor.device_ops import HostOps, is_sticky_cuda_error
from engine.executor.inprocess import InProcessExecutor
from engine.executor.worker import Worker
from engine.messages import Migration, NewRequest, Stage, Task
from engine.models.loader import load_adapter
from engine.profiler import Profiler, ProfileSpec
from engine.request import ImageParams, Limits

WORK_S = 0.15  # device time of each denoise step


class LateDevice(HostOps):
    def __init__(self) -> None:
        self.done_at = 0.0
        self.error: str | None = None
        self.syncs = 0

    def queue(self, seconds: float) -> None:
        self.done_at = max(self.done_at, time.perf_counter()) + seconds

    def synchronize(self) -> None:
        self.syncs += 1
        time.sleep(max(0.0, self.done_at - time.perf_counter()))
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(error)


def late_steps(adapter, device: LateDevice) -> None:
    real = adapter.denoise

    def denoise(states):
        real(states)
        device.queue(WORK_S)  # the kernels are queued; the call returns at once

    adapter.denoise = denoise


@pytest.fixture(scope="module")
def adapter():
    return load_adapter("tiny-pixart", "cpu")


def encode_task(adapter, task_id: int = 0, steps: int = 2) -> Task:
    params = ImageParams(seed=1, num_inference_steps=steps, width=64, height=64).resolve(adapter.info(), Limits())
    return Task(task_id, Stage.ENCODE, ["r"], (0,), new_requests=[NewRequest("r", "a fox", params)])


def test_a_task_reports_its_time_once_the_device_has_done_its_work(adapter):
    device = LateDevice()
    worker = Worker(0, adapter, ops=device)
    late_steps(adapter, device)
    try:
        assert worker.execute(encode_task(adapter)).error is None
        result = worker.execute(Task(1, Stage.DENOISE, ["r"], (0,), num_steps=2))
    finally:
        del adapter.denoise
    assert result.error is None and result.items[0].step == 2
    assert result.elapsed_s >= 2 * WORK_S  # both steps' device work, not just their launches
    assert device.done_at <= time.perf_counter()


def test_an_error_the_device_reports_late_fails_the_task_and_a_sticky_one_makes_the_worker_leave(adapter):
    device = LateDevice()
    worker = Worker(0, adapter, ops=device)
    assert worker.execute(encode_task(adapter)).error is None
    device.error = "CUDA error: an illegal memory access was encountered"
    result = worker.execute(Task(1, Stage.DENOISE, ["r"], (0,)))
    assert "illegal memory access" in result.error and "r" not in worker.states
    assert worker.fatal is not None and "CUDA error" in worker.fatal


class FakeComm:
    def __init__(self, renewed_with_world: bool) -> None:
        self.renewed_with_world = renewed_with_world
        self.moves_device_tensors = False


@pytest.mark.parametrize(("renewed", "exc", "fatal"), [
    (True, PeerDiedError("peer rank 1 died during a collective"), False),  # CPU: the next world is fresh
    (False, PeerDiedError("peer rank 1 died during a collective"), True),  # NCCL: transfers may still hang
    (True, CollectiveError("collective with (0, 1) timed out"), True),  # the peer lives: out of step
    (True, RuntimeError("CUDA out of memory"), True),
])
def test_a_failed_multi_rank_task_leaves_the_worker_unfit_unless_the_world_renews_its_channels(
        adapter, renewed, exc, fatal):
    worker = Worker(0, adapter, comm=FakeComm(renewed))
    multi = Task(1, Stage.DENOISE, ["r"], (0, 1))
    assert (worker._fatal_reason(multi, exc) is not None) == fatal
    migrating = Task(2, Stage.DENOISE, ["r"], (0,), migrations=[Migration("r", 1, (0,))])
    assert (worker._fatal_reason(migrating, exc) is not None) == fatal
    assert worker._fatal_reason(Task(3, Stage.DENOISE, ["r"], (0,)), RuntimeError("CUDA out of memory")) is None


def test_which_errors_are_sticky():
    assert is_sticky_cuda_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_sticky_cuda_error(torch.AcceleratorError("CUDA error: unspecified launch failure"))
    assert not is_sticky_cuda_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_sticky_cuda_error(RuntimeError("CUDA error: out of memory"))
    assert not is_sticky_cuda_error(ValueError("bad prompt"))


async def test_the_profiler_measures_the_device_work_through_the_executor():
    device = LateDevice()
    executor = InProcessExecutor(EngineConfig.create(model="tiny-pixart", device="cpu"), device_ops=device)
    profiler = Profiler(executor)
    await profiler.start()
    late_steps(executor._worker.adapter, device)
    try:
        profile = await profiler.measure(ProfileSpec(sizes=((64, 64),), batch_sizes=(1,), cycles=1, steps=2),
                                         model="tiny-pixart", device="cpu")
    finally:
        await profiler.shutdown()
    (denoise,) = [p for p in profile.points if p.stage == "denoise"]
    assert denoise.ms >= WORK_S * 1e3
