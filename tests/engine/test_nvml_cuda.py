"""NVML on a real GPU: the readings the scheduler and /metrics rely on."""

from __future__ import annotations

import os
import time

import pytest
import torch

from engine.telemetry import GiB, summary
from tests.cuda_helpers import requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.fixture()
def nvml():
    from engine.nvml import NvmlSource

    source = NvmlSource()
    yield source
    source.close()


def _device(source, ordinal: int = 0):
    index = source.rank_devices("cuda", 1)[ordinal]
    return next(d for d in source.read(time.monotonic()) if d.index == index)


def test_readings_of_the_device(nvml):
    torch.cuda.init()
    device = _device(nvml)
    assert device.name and device.name != "GPU"
    assert device.memory_total == pytest.approx(torch.cuda.get_device_properties(0).total_memory, rel=0.05)
    assert 0 < device.memory_used <= device.memory_total
    assert 0 <= device.gpu_util <= 100 and 0 <= device.memory_util <= 100
    assert device.power_w is not None and device.power_w > 0
    assert device.temperature_c is not None and 0 < device.temperature_c < 120
    assert device.sm_clock_mhz is not None and device.sm_clock_mhz > 0


def test_our_memory_and_process_show_up(nvml):
    torch.cuda.init()
    before = _device(nvml)
    block = torch.empty(2 * GiB, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    try:
        after = _device(nvml)
        assert after.memory_used - before.memory_used >= 1.5 * GiB
        # Ours vs foreign is decided by pid: NVML must report this process by its own pid.
        assert os.getpid() in after.processes, (
            f"NVML reports pids {sorted(after.processes)}, not ours ({os.getpid()}): run with --pid=host")
        assert after.processes[os.getpid()] >= 2 * GiB or after.processes[os.getpid()] == 0
        assert os.getpid() not in after.foreign_pids([os.getpid()])
    finally:
        del block
        torch.cuda.empty_cache()


def test_busy_device_reads_utilisation(nvml):
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    deadline = time.monotonic() + 3.0
    peak = 0.0
    while time.monotonic() < deadline and peak < 50:
        for _ in range(20):
            x = (x @ x).clamp_(-1, 1)
        torch.cuda.synchronize()
        peak = max(peak, _device(nvml).gpu_util)
    assert peak >= 50, f"NVML saw at most {peak}% utilisation while matrix products ran"


def test_start_up_summary_names_the_device():
    from engine.telemetry import TelemetrySampler

    sampler = TelemetrySampler.from_nvml(lambda: [os.getpid()])
    try:
        assert sampler.available, sampler.reason
        line = summary(sampler.telemetry.sample(time.monotonic()))
    finally:
        sampler.stop()
    assert line.startswith("devices: 0 ") and "GiB" in line, line
