"""One device's telemetry reading (DeviceStats), shared by the NVML reader and the sampler."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


class TelemetryUnavailable(RuntimeError):
    """No telemetry here (no NVML library, no driver, no GPU)."""


@dataclass(frozen=True)
class DeviceStats:
    index: int  # NVML device index
    memory_used: int
    memory_total: int
    gpu_util: float  # percent of time a kernel ran, last sample period
    memory_util: float
    # pid -> bytes used on the device, for every compute (or graphics) process NVML sees.
    processes: dict[int, int] = field(default_factory=dict)
    # pid -> SM utilisation (%) of each process, where the driver keeps per-process samples.
    process_util: dict[int, float] = field(default_factory=dict)
    name: str = ""
    power_w: float | None = None
    temperature_c: float | None = None
    sm_clock_mhz: int | None = None
    throttle_reasons: int = 0  # NVML's clocks-event-reason bit mask

    @property
    def free_memory(self) -> int:
        return max(0, self.memory_total - self.memory_used)

    def foreign_pids(self, ours: Iterable[int]) -> list[int]:
        mine = set(ours)
        return sorted(pid for pid in self.processes if pid not in mine)

    def foreign_load(self, foreign: list[int]) -> float:
        """Utilisation (%) the foreign processes cause: their own SM samples where NVML has
        them, else the whole device's (which also counts our workers' kernels, so it
        overestimates while ours run)."""
        if self.process_util:
            return min(100.0, sum(self.process_util.get(pid, 0.0) for pid in foreign))
        return self.gpu_util
