"""A foreign job on one simulated GPU for a window, seen (or not) through telemetry.

``gfdit simulate --interference GPU:START:END[:UTIL]`` puts a foreign job at UTIL % (100 by
default) on one GPU from START to END seconds. The GPU really runs slower in the window,
in every run: two contexts that keep a GPU busy are time-sliced, so a step there takes
1 / speed as long, with speed from the same time-slicing rule the scheduler uses to
derate a device (engine/scheduler/device_state.py; 0.5 at 100 %). What differs is what
the scheduler knows:

- *blind*: nothing; it plans as if every GPU were nominal;
- *telemetry*: a ``FakeSource`` scripts the readings NVML would give (our workers on
  every GPU, plus the foreign process and its utilisation on the shared one in the
  window), a ``Telemetry`` samples it every ``period_s`` of virtual time, and the
  scheduler gets the DeviceState made from each sample, exactly as in the engine: the
  shared GPU is interfered (groups take it last) and its speed derated.

The simulator models time, not memory: the scheduler is given the readings' speed and
interference, not their memory figures (with no measured peaks, memory admission would
run one request per task).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from engine.scheduler.device_state import (
    DEFAULT_RULES,
    DeviceState,
    InterferenceRules,
    device_state,
)
from engine.sim.report import RequestRecord, attainment
from engine.sim.simulator import SharedDevice
from engine.telemetry import DeviceStats, FakeSource, GiB, Reading, Telemetry

OUR_FIRST_PID = 1000  # the simulated worker of rank r is pid 1000 + r
FOREIGN_PID = 999_999


@dataclass(frozen=True)
class Interference:
    gpu: int
    start_s: float
    end_s: float
    util: float = 100.0  # the foreign job's utilisation of the GPU, percent

    @classmethod
    def parse(cls, text: str) -> Interference:
        """``GPU:START:END[:UTIL]``, e.g. ``1:600:1800`` or ``1:600:1800:60``."""
        parts = text.split(":")
        try:
            if len(parts) not in (3, 4):
                raise ValueError
            spec = cls(int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3]) if len(parts) == 4 else 100.0)
        except ValueError:
            raise ValueError(f"interference {text!r}: expected GPU:START:END[:UTIL]") from None
        if spec.gpu < 0 or spec.end_s <= spec.start_s or not 0 < spec.util <= 100:
            raise ValueError(f"interference {text!r}: needs GPU >= 0, END > START and 0 < UTIL <= 100")
        return spec

    def speed(self, rules: InterferenceRules = DEFAULT_RULES) -> float:
        """The shared GPU's true speed in the window."""
        return rules.speed(self.util)

    def shared_device(self) -> SharedDevice:
        return SharedDevice(self.gpu, self.start_s, self.end_s, self.speed())

    def source(self, num_gpus: int, memory_total: int = 96 * GiB) -> FakeSource:
        """What NVML would read: our worker on every GPU, the foreign job in its window."""
        devices = [DeviceStats(i, memory_used=memory_total // 2, memory_total=memory_total, gpu_util=90.0,
                               memory_util=40.0, processes={OUR_FIRST_PID + i: memory_total // 2},
                               name="simulated GPU") for i in range(num_gpus)]
        ours = OUR_FIRST_PID + self.gpu
        script = [Reading(self.gpu, self.start_s, self.end_s, gpu_util=100.0,
                          processes={ours: memory_total // 2, FOREIGN_PID: memory_total // 4},
                          process_util={ours: 100.0 - self.util, FOREIGN_PID: self.util})]
        return FakeSource(devices, script)

    def in_window(self, records: Sequence[RequestRecord]) -> list[RequestRecord]:
        return [r for r in records if self.start_s <= r.arrival_s < self.end_s]

    def window_attainment(self, records: Sequence[RequestRecord]) -> float:
        """SLO attainment of the requests that arrived while the GPU was shared."""
        return attainment(self.in_window(records))


class SimulatedTelemetry:
    """The simulator's ``observe`` hook: a source sampled every ``period_s`` of virtual time
    (so the scheduler sees readings up to one period old), as a DeviceState. One per run:
    it keeps the telemetry's moving averages."""

    def __init__(self, source: FakeSource, num_gpus: int, period_s: float = 0.2,
                 rules: InterferenceRules = DEFAULT_RULES) -> None:
        ours = [OUR_FIRST_PID + r for r in range(num_gpus)]
        self.telemetry = Telemetry(source, our_pids=lambda: ours)
        self.rank_devices = {r: r for r in range(num_gpus)}
        self.period_s = period_s
        self.rules = rules
        self._tick = -math.inf
        self._state = DeviceState()

    def __call__(self, now: float) -> DeviceState:
        tick = math.floor(now / self.period_s) * self.period_s
        if tick > self._tick:
            self._tick = tick
            state = device_state(self.telemetry.sample(tick), self.rank_devices, self.rules)
            self._state = replace(state, free_memory={}, total_memory={}, nearly_full=frozenset())
        return self._state
