"""The engine with telemetry: NVML absent on this machine, and a scripted source over real time."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

from engine import AsyncEngine, ImageParams
from engine.telemetry import DeviceStats, FakeSource, GiB, Reading

FAST = ImageParams(num_inference_steps=3, width=64, height=64, n=2, seed=1)


async def images(engine) -> int:
    outputs = [o async for o in engine.generate("a red fox", FAST)]
    return len(outputs[-1].images)


async def test_without_nvml_the_engine_says_so_once_and_serves(caplog):
    """device=auto tries NVML; here pynvml.nvmlInit raises NVMLError_LibraryNotFound."""
    with caplog.at_level(logging.INFO):
        engine = await AsyncEngine.create(model="tiny-pixart", device="auto", executor="inprocess",
                                          telemetry_period_s=0.01)
        try:
            assert await images(engine) == 2
            await asyncio.sleep(0.05)
            assert await images(engine) == 2
            assert engine.devices.state().known is False
            assert engine.device_summary().startswith("devices: no GPU telemetry: NVML is not available")
        finally:
            await engine.shutdown()
    lines = [r.getMessage() for r in caplog.records if "telemetry" in r.getMessage().lower()]
    assert len(lines) == 1 and "NVML is not available" in lines[0], lines
    assert not any(t.name == "gfdit-telemetry" for t in threading.enumerate())


async def test_telemetry_can_be_turned_off(caplog):
    with caplog.at_level(logging.INFO):
        engine = await AsyncEngine.create(model="tiny-pixart", device="cpu", executor="inprocess",
                                          telemetry_period_s=0)
        try:
            assert await images(engine) == 2
        finally:
            await engine.shutdown()
    assert engine.device_summary() == "devices: no GPU telemetry: telemetry_period_s is 0"
    assert not any("NVML" in r.getMessage() for r in caplog.records)
    given = FakeSource([DeviceStats(0, memory_used=0, memory_total=GiB, gpu_util=0.0, memory_util=0.0)])
    engine = await AsyncEngine.create(model="tiny-pixart", device="cpu", executor="inprocess",
                                      telemetry_period_s=0, telemetry_source=given)
    try:
        assert engine.devices.sampler is None and engine.devices.state().known is False
    finally:
        await engine.shutdown()


async def test_the_sampler_thread_hands_new_readings_to_the_scheduler():
    """A foreign process appears on the scripted device 0.3 s after start: the scheduler's
    view changes without the loop ever reading the source itself."""
    start = time.monotonic()
    device = DeviceStats(0, memory_used=10 * GiB, memory_total=80 * GiB, gpu_util=50.0, memory_util=10.0,
                         processes={os.getpid(): 10 * GiB})
    script = [Reading(0, start + 0.3, start + 3600, gpu_util=100.0,
                      processes={os.getpid(): 10 * GiB, 999: 5 * GiB}, memory_used=15 * GiB)]
    engine = await AsyncEngine.create(model="tiny-pixart", device="cpu", executor="inprocess",
                                      telemetry_period_s=0.02, telemetry_source=FakeSource([device], script))
    try:
        assert engine.devices.state().interfered == frozenset()
        deadline = time.monotonic() + 10
        while not engine.devices.state().interfered and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        state = engine.devices.state()
        assert state.interfered == {0} and state.rank_speed == {0: 0.5} and state.free_memory == {0: 65 * GiB}
        assert await images(engine) == 2
        assert engine.scheduler.devices.interfered == {0}  # what the last dispatch planned with
    finally:
        await engine.shutdown()
    assert not any(t.name == "gfdit-telemetry" for t in threading.enumerate())
