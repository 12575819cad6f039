"""The NVML source against a stand-in pynvml: this machine has no GPU, the code path is real."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace as NS

import pytest

from engine.device_monitor import DeviceMonitor
from engine.nvml import NvmlSource, rank_ordinals, visible_entries
from engine.telemetry import GiB, Telemetry, TelemetrySampler, summary


class NVMLError(Exception):
    pass


def fake_pynvml(fail_init: bool = False) -> types.ModuleType:
    """Three GPUs; a foreign process (pid 77) on GPU 1 next to our worker (pid 11)."""
    nvml = types.ModuleType("pynvml")
    gpus = [NS(name=b"NVIDIA H200", uuid=f"GPU-{i}aaa-bbbb", used=(3 + 20 * (i == 1)) * GiB, total=140 * GiB,
               procs=[NS(pid=10 + i, usedGpuMemory=2 * GiB)] + ([NS(pid=77, usedGpuMemory=20 * GiB)] if i == 1 else []))
            for i in range(3)]
    seen_timestamps = []

    def init():
        if fail_init:
            raise NVMLError("NVML Shared Library Not Found")

    def process_util(handle, since):
        seen_timestamps.append(since)
        if handle is not gpus[1]:
            raise NVMLError("Not Found")  # no samples since `since`
        return [NS(pid=77, timeStamp=since + 100, smUtil=80), NS(pid=77, timeStamp=since + 200, smUtil=60),
                NS(pid=11, timeStamp=since + 200, smUtil=30)]

    def graphics(handle):
        raise NVMLError("Not Supported")

    nvml.NVMLError = NVMLError
    nvml.NVML_CLOCK_SM = 1
    nvml.NVML_TEMPERATURE_GPU = 0
    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(gpus)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    nvml.nvmlDeviceGetName = lambda h: h.name
    nvml.nvmlDeviceGetUUID = lambda h: h.uuid
    nvml.nvmlDeviceGetMemoryInfo = lambda h: NS(used=h.used, total=h.total)
    nvml.nvmlDeviceGetUtilizationRates = lambda h: NS(gpu=90, memory=35)
    nvml.nvmlDeviceGetClockInfo = lambda h, clock: 1980
    nvml.nvmlDeviceGetPowerUsage = lambda h: 450_500  # milliwatts
    nvml.nvmlDeviceGetTemperature = lambda h, sensor: 55
    nvml.nvmlDeviceGetCurrentClocksEventReasons = lambda h: 0x4
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: h.procs
    nvml.nvmlDeviceGetGraphicsRunningProcesses = graphics
    nvml.nvmlDeviceGetProcessUtilization = process_util
    nvml.seen_timestamps = seen_timestamps
    return nvml


@pytest.fixture
def nvml(monkeypatch):
    module = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


def test_readings_cover_every_figure_and_per_process_utilisation(nvml):
    source = NvmlSource()
    devices = source.read(0.0)
    assert [d.index for d in devices] == [0, 1, 2]
    d = devices[1]
    assert d.name == "NVIDIA H200" and d.memory_used == 23 * GiB and d.memory_total == 140 * GiB
    assert (d.gpu_util, d.memory_util, d.power_w, d.temperature_c, d.sm_clock_mhz, d.throttle_reasons) == \
        (90.0, 35.0, 450.5, 55.0, 1980, 4)
    assert d.processes == {11: 2 * GiB, 77: 20 * GiB}
    assert d.process_util == {77: 70.0, 11: 30.0}  # the mean of each process's samples
    assert devices[0].process_util == {}
    source.read(1.0)
    assert nvml.seen_timestamps[-2] == 200  # the next read asks only for newer samples


def test_our_workers_are_ours_and_the_rest_is_foreign(nvml):
    snapshot = Telemetry(NvmlSource(), our_pids=lambda: [10, 11, 12]).sample(0.0)
    assert snapshot.foreign == {0: [], 1: [77], 2: []}
    assert snapshot.foreign_util == {1: 70.0}  # the foreign process's own load, not the device's 90 %


@pytest.mark.parametrize(("env", "ranks", "expected"), [
    (None, 3, {0: 0, 1: 1, 2: 2}),
    ("2,0", 2, {0: 2, 1: 0}),
    ("GPU-1aaa", 1, {0: 1}),  # a UUID prefix
    ("GPU-2aaa-bbbb,GPU-0aaa-bbbb", 2, {0: 2, 1: 0}),
    ("MIG-1234", 1, {}),  # MIG instances have no device-level figures
    ("", 3, {}),
    ("-1", 3, {}),
    ("1,-1,2", 1, {0: 1}),  # CUDA stops at the first invalid entry
])
def test_rank_r_on_cuda_r_maps_through_cuda_visible_devices(nvml, env, ranks, expected):
    """One GPU per rank: the executor refuses layouts where ranks share one (test_gpu_layout)."""
    assert NvmlSource().rank_devices("auto", ranks, env=env) == expected


def test_the_device_option_decides_the_ordinals():
    assert rank_ordinals("cuda", 2, 2) == {0: 0, 1: 1}
    assert rank_ordinals("cuda:1", 1, 2) == {0: 1}
    assert rank_ordinals("cuda:3", 1, 2) == {} and rank_ordinals("cpu", 2, 2) == {}
    assert visible_entries(None) is None and visible_entries(" 0, 1 ") == ["0", "1"]


def test_a_mig_instance_without_utilisation_keeps_its_other_readings(nvml):
    def utilisation(handle):
        if handle.name == b"MIG":
            raise NVMLError("Not Supported")
        return NS(gpu=90, memory=35)

    nvml.nvmlDeviceGetHandleByIndex(1).name = b"MIG"
    nvml.nvmlDeviceGetUtilizationRates = utilisation
    source = NvmlSource()
    snapshot = Telemetry(source, our_pids=lambda: [10, 11, 12]).sample(0.0)
    d = snapshot.devices[1]
    assert d.gpu_util is None and d.memory_util is None
    assert (d.memory_used, d.power_w, d.sm_clock_mhz, d.processes[77]) == (23 * GiB, 450.5, 1980, 20 * GiB)
    assert snapshot.foreign_util == {1: 70.0} and snapshot.devices[0].gpu_util == 90.0
    assert "1 MIG 140.0 GiB (23.0 used, util n/a, 1 foreign)" in summary(snapshot)


def test_a_device_without_a_handle_is_left_out_and_the_others_read(nvml):
    def handle(i):
        if i == 1:
            raise NVMLError("Unknown Error")
        return real(i)

    real = nvml.nvmlDeviceGetHandleByIndex
    nvml.nvmlDeviceGetHandleByIndex = handle
    source = NvmlSource()
    assert [d.index for d in source.read(0.0)] == [0, 2]
    assert source.rank_devices("auto", 2, env="2,1") == {0: 2, 1: 1}  # rank 1 then has no figures
    nvml.nvmlDeviceGetHandleByIndex = lambda i: (_ for _ in ()).throw(NVMLError("Unknown Error"))
    sampler = TelemetrySampler.from_nvml(our_pids=lambda: [])
    assert not sampler.available and "no handle" in sampler.reason


async def test_nvml_failing_in_any_way_never_fails_the_engine_start(nvml):
    def count():
        raise OSError("driver/library version mismatch")

    nvml.nvmlDeviceGetCount = count
    monitor = DeviceMonitor(0.01)
    await monitor.start(device="auto", model_device="cuda:0", num_ranks=2, our_pids=list, on_sample=lambda: None)
    assert monitor.state().known is False and "version mismatch" in monitor.summary()


async def test_a_failed_start_after_the_workers_started_stops_them():
    from engine import AsyncEngine, EngineConfig
    from tests.engine.test_profiler import Clock, FakeExecutor

    class BrokenMonitor(DeviceMonitor):
        async def start(self, **kwargs):
            raise RuntimeError("monitor broke")

    executor = FakeExecutor(2, Clock())
    stopped = []

    async def shutdown():
        stopped.append(True)

    executor.shutdown = shutdown
    engine = AsyncEngine(EngineConfig.create(device="cpu"), executor)
    engine.devices = BrokenMonitor(0.01)
    with pytest.raises(RuntimeError, match="monitor broke"):
        await engine.start()
    assert stopped and not engine.is_running


def test_a_failing_init_gives_a_sampler_without_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(fail_init=True))
    sampler = TelemetrySampler.from_nvml(our_pids=lambda: [])
    assert not sampler.available and "NVML Shared Library Not Found" in sampler.reason


async def test_the_engine_monitor_maps_gpu_ranks_through_cuda_visible_devices(nvml, monkeypatch):
    """Two GPU workers on CUDA_VISIBLE_DEVICES=2,1: rank 1 sits on NVML device 1, which a
    foreign process shares at 70 %."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,1")
    monitor = DeviceMonitor(0.01)
    await monitor.start(device="auto", model_device="cuda:0", num_ranks=2, our_pids=lambda: [11, 12],
                        on_sample=lambda: None)
    try:
        assert monitor.rank_devices == {0: 2, 1: 1}
        state = monitor.state()
        assert state.interfered == {1} and state.rank_speed == {1: pytest.approx(1 - 0.5 * 0.7)}
        assert state.free_memory == {0: 137 * GiB, 1: 117 * GiB}
        # Device 0 is not ours: its process (pid 10) counts as foreign there, unused by any rank.
        assert monitor.summary() == ("devices: 0 NVIDIA H200 140.0 GiB (3.0 used, util 90%, 1 foreign); "
                                     "1 NVIDIA H200 140.0 GiB (23.0 used, util 90%, 1 foreign); "
                                     "2 NVIDIA H200 140.0 GiB (3.0 used, util 90%, 0 foreign)")
    finally:
        monitor.stop()
    cpu_workers = DeviceMonitor(0.01)
    await cpu_workers.start(device="auto", model_device="cpu", num_ranks=2, our_pids=list, on_sample=lambda: None)
    cpu_workers.stop()
    assert cpu_workers.rank_devices == {} and cpu_workers.state().known is False
