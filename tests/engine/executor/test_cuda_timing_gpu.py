"""On a GPU: a task's time counts its kernels, not their launch; the engine runs on CUDA.

``torch.cuda._sleep`` queues a kernel that keeps the GPU busy for a number of cycles
while the Python call returns at once: a denoise step that adds one must take at least
that kernel's time (measured with CUDA events), and does only once the worker waits for
the device. Run with ``pytest -m gpu``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _busy_kernel_s(cycles: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


@pytest.fixture(scope="module")
def adapter():
    from engine.models.loader import load_adapter

    return load_adapter("tiny-pixart", "cuda:0", "float32")


def _timed_step(adapter, ops, cycles: int) -> tuple[float, int]:
    from engine.executor.worker import Worker
    from engine.messages import NewRequest, Stage, Task
    from engine.request import ImageParams, Limits

    worker = Worker(0, adapter, ops=ops)
    params = ImageParams(seed=1, num_inference_steps=3, width=64, height=64).resolve(adapter.info(), Limits())
    assert worker.execute(Task(0, Stage.ENCODE, ["r"], (0,), new_requests=[NewRequest("r", "a fox", params)])).error is None
    real = adapter.denoise

    def denoise(states):
        real(states)
        torch.cuda._sleep(cycles)

    adapter.denoise = denoise
    try:
        result = worker.execute(Task(1, Stage.DENOISE, ["r"], (0,)))
    finally:
        del adapter.denoise
        torch.cuda.synchronize()
    assert result.error is None
    return result.elapsed_s, result.peak_memory_bytes


def test_a_task_time_includes_its_kernels(adapter):
    from engine.executor.device_ops import CudaOps, HostOps

    cycles = 200_000_000
    busy = _busy_kernel_s(cycles)
    assert busy > 0.02, f"the busy kernel took only {busy:.4f} s"
    synced, peak = _timed_step(adapter, CudaOps(adapter.device), cycles)
    unsynced, _ = _timed_step(adapter, HostOps(), cycles)
    assert peak > 0  # the allocator's readings come with the synchronised device
    print(f"busy kernel {busy * 1e3:.1f} ms; step with sync {synced * 1e3:.1f} ms, without {unsynced * 1e3:.1f} ms")
    assert synced >= 0.95 * busy
    assert unsynced < synced  # without waiting, the step's time would not see its kernels


async def test_the_engine_runs_a_request_on_one_gpu_worker():
    from engine import AsyncEngine, ImageParams

    engine = await AsyncEngine.create(model="tiny-pixart", device="cuda", num_workers=1)
    try:
        outs = [o async for o in engine.generate("a red fox", ImageParams(seed=1, num_inference_steps=4,
                                                                          width=64, height=64))]
        assert outs[-1].finished and len(outs[-1].images) == 1
        assert engine.executor.world_epoch == 0 and engine.model_info.device.startswith("cuda")
    finally:
        await engine.shutdown()
