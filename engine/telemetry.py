"""GPU telemetry: a sampler thread reads NVML and publishes per-device snapshots.

NVML is read from a thread of the engine process, never from the event loop, and never
through CUDA (NVML does not create a CUDA context). Processes on a device that are not
gfdit's workers are "foreign": a DiT step on a GPU shared with another job runs slower,
and one slow member stalls a whole sequence-parallel group, so the scheduler avoids such
devices for groups and derates their speed. Where NVML is missing (a CPU machine) or
fails, the sampler says so once in the log and reports no devices; nothing else breaks.

``FakeSource`` replays scripted readings over time, for tests and the simulator.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceStats:
    index: int
    memory_used: int
    memory_total: int
    gpu_util: float  # percent of time a kernel ran, last sample period
    memory_util: float
    # pid -> bytes used on the device, for every compute process NVML sees.
    processes: dict[int, int] = field(default_factory=dict)
    power_w: float | None = None
    temperature_c: float | None = None
    sm_clock_mhz: int | None = None
    throttle_reasons: int = 0

    @property
    def free_memory(self) -> int:
        return max(0, self.memory_total - self.memory_used)

    def foreign_pids(self, ours: Iterable[int]) -> list[int]:
        mine = set(ours)
        return sorted(pid for pid in self.processes if pid not in mine)


@dataclass(frozen=True)
class Snapshot:
    """What the sampler saw last; ``devices`` is empty where there is no telemetry."""

    time: float
    devices: dict[int, DeviceStats]
    foreign: dict[int, list[int]]  # device -> foreign pids
    # device -> moving average of utilisation while foreign processes were present.
    foreign_util: dict[int, float]

    @classmethod
    def empty(cls) -> Snapshot:
        return cls(0.0, {}, {}, {})


class TelemetryUnavailable(RuntimeError):
    pass


class Source(Protocol):
    def read(self, now: float) -> list[DeviceStats]: ...


class NvmlSource:
    """Reads every visible GPU through nvidia-ml-py."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, ImportError ...
            raise TelemetryUnavailable(f"NVML is not available ({exc})") from exc
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    def _optional(self, call: Callable[[], float]) -> float | None:
        try:
            return call()
        except self.nvml.NVMLError:
            return None

    def read(self, now: float) -> list[DeviceStats]:
        nvml = self.nvml
        out = []
        for index, handle in enumerate(self.handles):
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            util = nvml.nvmlDeviceGetUtilizationRates(handle)
            try:
                procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except nvml.NVMLError:
                procs = []
            power = self._optional(lambda h=handle: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0)
            temp = self._optional(lambda h=handle: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
            clock = self._optional(lambda h=handle: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM))
            throttle = self._optional(lambda h=handle: nvml.nvmlDeviceGetCurrentClocksThrottleReasons(h))
            out.append(DeviceStats(
                index=index, memory_used=int(memory.used), memory_total=int(memory.total),
                gpu_util=float(util.gpu), memory_util=float(util.memory),
                processes={int(p.pid): int(p.usedGpuMemory or 0) for p in procs},
                power_w=power, temperature_c=temp, sm_clock_mhz=None if clock is None else int(clock),
                throttle_reasons=int(throttle or 0)))
        return out

    def close(self) -> None:
        with contextlib.suppress(self.nvml.NVMLError):
            self.nvml.nvmlShutdown()


@dataclass(frozen=True)
class Reading:
    """A scripted change to one device during [start, end): fields of DeviceStats to override."""

    device: int
    start: float
    end: float
    memory_used: int | None = None
    gpu_util: float | None = None
    processes: dict[int, int] | None = None


class FakeSource:
    """Devices with a base state plus scripted readings over (virtual or real) time."""

    def __init__(self, devices: list[DeviceStats], script: Iterable[Reading] = ()) -> None:
        self.devices = devices
        self.script = list(script)

    def read(self, now: float) -> list[DeviceStats]:
        out = []
        for device in self.devices:
            stats = device
            for reading in self.script:
                if reading.device == device.index and reading.start <= now < reading.end:
                    changes = {k: v for k, v in (("memory_used", reading.memory_used),
                                                 ("gpu_util", reading.gpu_util),
                                                 ("processes", reading.processes)) if v is not None}
                    stats = replace(stats, **changes)
            out.append(stats)
        return out


class Telemetry:
    """Turns readings into snapshots; ``sample`` is pure given ``now``, the thread calls it."""

    def __init__(self, source: Source | None, our_pids: Callable[[], Iterable[int]] = tuple,
                 smoothing: float = 0.3) -> None:
        self.source = source
        self.our_pids = our_pids
        self.smoothing = smoothing
        self.latest = Snapshot.empty()
        self._failed = False

    def sample(self, now: float) -> Snapshot:
        if self.source is None:
            return self.latest
        try:
            devices = self.source.read(now)
        except Exception as exc:  # noqa: BLE001 - telemetry must never take the engine down
            if not self._failed:
                logger.warning("GPU telemetry stopped: %s; scheduling goes on without it", exc)
                self._failed = True
            self.latest = Snapshot(now, {}, {}, {})
            return self.latest
        ours = set(self.our_pids())
        foreign = {d.index: d.foreign_pids(ours) for d in devices}
        previous = self.latest.foreign_util
        foreign_util = {}
        for d in devices:
            if foreign[d.index]:
                before = previous.get(d.index, d.gpu_util)
                foreign_util[d.index] = (1 - self.smoothing) * before + self.smoothing * d.gpu_util
        self.latest = Snapshot(now, {d.index: d for d in devices}, foreign, foreign_util)
        return self.latest


class TelemetrySampler:
    """A daemon thread sampling every ``period_s``; ``snapshot()`` is safe from any thread."""

    def __init__(self, telemetry: Telemetry, period_s: float = 0.2,
                 on_sample: Callable[[Snapshot], None] | None = None) -> None:
        self.telemetry = telemetry
        self.period_s = period_s
        self.on_sample = on_sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gfdit-telemetry", daemon=True)

    @classmethod
    def from_nvml(cls, our_pids: Callable[[], Iterable[int]], period_s: float = 0.2,
                  on_sample: Callable[[Snapshot], None] | None = None) -> TelemetrySampler:
        try:
            source: Source | None = NvmlSource()
        except TelemetryUnavailable as exc:
            logger.info("GPU telemetry off: %s", exc)
            source = None
        return cls(Telemetry(source, our_pids), period_s, on_sample)

    @property
    def available(self) -> bool:
        return self.telemetry.source is not None

    def start(self) -> None:
        if self.available:
            self._thread.start()

    def snapshot(self) -> Snapshot:
        return self.telemetry.latest

    def _run(self) -> None:
        while not self._stop.is_set():
            snapshot = self.telemetry.sample(time.monotonic())
            if self.on_sample is not None:
                self.on_sample(snapshot)
            self._stop.wait(self.period_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        source = self.telemetry.source
        if isinstance(source, NvmlSource):
            source.close()
