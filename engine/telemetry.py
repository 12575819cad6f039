"""GPU telemetry: a sampler thread reads NVML and publishes per-device snapshots.

NVML is read from a thread of the engine process, never from the event loop, and never
through CUDA (NVML does not create a CUDA context; engine/nvml.py). Processes on a device
that are not gfdit's workers are "foreign": a DiT step on a GPU shared with another job
runs slower, and one slow member stalls a whole sequence-parallel group, so the scheduler
avoids such devices for groups and derates their speed (engine/scheduler/device_state.py).
Where NVML is missing (a CPU machine) or fails, the sampler says so once in the log and
reports no devices; nothing else breaks.

``FakeSource`` replays scripted readings over time, for tests and the simulator.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from engine.device_stats import DeviceStats, TelemetryUnavailable
from engine.nvml import NvmlSource

__all__ = ["DeviceStats", "FakeSource", "Reading", "Snapshot", "Source", "Telemetry", "TelemetrySampler",
           "TelemetryUnavailable", "summary"]

logger = logging.getLogger(__name__)

GiB = 1 << 30


@dataclass(frozen=True)
class Snapshot:
    """What the sampler saw last; ``devices`` is empty where there is no telemetry."""

    time: float
    devices: dict[int, DeviceStats]
    foreign: dict[int, list[int]]  # device -> foreign pids
    # device -> moving average of the foreign load while foreign processes were present.
    foreign_util: dict[int, float]

    @classmethod
    def empty(cls) -> Snapshot:
        return cls(0.0, {}, {}, {})


class Source(Protocol):
    def read(self, now: float) -> list[DeviceStats]: ...


@dataclass(frozen=True)
class Reading:
    """A scripted change to one device during [start, end): fields of DeviceStats to override."""

    device: int
    start: float
    end: float
    memory_used: int | None = None
    gpu_util: float | None = None
    processes: dict[int, int] | None = None
    process_util: dict[int, float] | None = None


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
                                                 ("processes", reading.processes),
                                                 ("process_util", reading.process_util)) if v is not None}
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
        self.error: str | None = None  # why the source stopped, once it has

    def sample(self, now: float) -> Snapshot:
        if self.source is None:
            return self.latest
        try:
            devices = self.source.read(now)
        except Exception as exc:  # noqa: BLE001 - telemetry must never take the engine down
            if self.error is None:
                logger.warning("GPU telemetry stopped: %s; scheduling goes on without it", exc)
                self.error = str(exc)
            self.latest = Snapshot(now, {}, {}, {})
            return self.latest
        ours = set(self.our_pids())
        foreign = {d.index: d.foreign_pids(ours) for d in devices}
        previous = self.latest.foreign_util
        foreign_util = {}
        for d in devices:
            if foreign[d.index]:
                load = d.foreign_load(foreign[d.index])
                before = previous.get(d.index, load)
                foreign_util[d.index] = (1 - self.smoothing) * before + self.smoothing * load
        self.latest = Snapshot(now, {d.index: d for d in devices}, foreign, foreign_util)
        return self.latest


class TelemetrySampler:
    """A daemon thread sampling every ``period_s``; ``snapshot()`` is safe from any thread.

    ``reason`` says why there is no telemetry (no source, or the source failed)."""

    def __init__(self, telemetry: Telemetry, period_s: float = 0.2,
                 on_sample: Callable[[Snapshot], None] | None = None, reason: str | None = None) -> None:
        self.telemetry = telemetry
        self.period_s = period_s
        self.on_sample = on_sample
        self._reason = reason
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gfdit-telemetry", daemon=True)

    @classmethod
    def from_nvml(cls, our_pids: Callable[[], Iterable[int]], period_s: float = 0.2,
                  on_sample: Callable[[Snapshot], None] | None = None) -> TelemetrySampler:
        """NVML's sampler, or one that reports nothing (said once in the log) without NVML.
        NVML's initialisation can take a while: call this off the event loop."""
        try:
            source: Source | None = NvmlSource()
            reason = None
        except TelemetryUnavailable as exc:
            reason = str(exc)
            logger.info("GPU telemetry off: %s", exc)
            source = None
        return cls(Telemetry(source, our_pids), period_s, on_sample, reason)

    @property
    def available(self) -> bool:
        return self.telemetry.source is not None

    @property
    def reason(self) -> str | None:
        return self._reason or self.telemetry.error

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
        close = getattr(self.telemetry.source, "close", None)
        if close is not None:
            close()


def summary(snapshot: Snapshot, reason: str | None = None) -> str:
    """One line for the start-up log: every device, or why there is no telemetry."""
    if not snapshot.devices:
        return f"devices: no GPU telemetry: {reason or 'no devices reported'}"
    parts = []
    for index, d in sorted(snapshot.devices.items()):
        parts.append(f"{index} {d.name or 'GPU'} {d.memory_total / GiB:.1f} GiB ({d.memory_used / GiB:.1f} used, "
                     f"util {d.gpu_util:.0f}%, {len(snapshot.foreign.get(index, []))} foreign)")
    return "devices: " + "; ".join(parts)
