"""What telemetry tells the scheduler about its ranks: speed, interference, memory headroom.

Pure: a telemetry Snapshot (engine/telemetry.py) and the rank -> NVML device map go in, a
DeviceState comes out. The default DeviceState means "no telemetry", and with it every
policy behaves exactly as without this module.

Rules (``InterferenceRules``):

- A rank is *interfered* while its device runs a process that is not one of our workers
  (a foreign process). Even idle, such a process holds a context and may start kernels
  at any moment; one slow member stalls a whole sequence-parallel group, so multi-rank
  groups take interfered ranks last (placement.py).
- Its speed is derated by what was measured: with ``u`` the moving average of the
  foreign load (the foreign processes' own SM utilisation where NVML samples it, else
  the device's) over 100,

      speed = clamp(1 - derate * u, min_speed, 1)       derate = 0.5, min_speed = 0.2

  Two contexts that both keep a GPU busy are time-sliced about evenly, so a foreign job
  at 100 % leaves a DiT step about half the device (speed 0.5); an idle foreign process
  costs nothing but still marks the rank interfered. The cost model's step times are
  divided by the speed (policy.SchedulerView.speed).
- A rank whose device has less than ``nearly_full`` (5 %) of its memory free is *nearly
  full*: it gets no new requests (no new state), whatever else it could take. Free here
  is the scheduler's headroom (``DeviceState.nearly_full_given``): what the device reports
  free plus what the rank's caching allocator holds unused, since NVML counts PyTorch's
  cache as used and one large batch would otherwise mark the rank full for ever.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.telemetry import Snapshot


@dataclass(frozen=True)
class InterferenceRules:
    derate: float = 0.5
    """Speed lost per unit of foreign utilisation (1.0 = 100 %)."""
    min_speed: float = 0.2
    """The lowest speed a derated rank is given."""
    nearly_full: float = 0.05
    """Share of a device's memory below which its ranks get no new state."""

    def speed(self, foreign_util_percent: float) -> float:
        return min(1.0, max(self.min_speed, 1.0 - self.derate * foreign_util_percent / 100.0))


DEFAULT_RULES = InterferenceRules()
DEFAULT_RULES_NEARLY_FULL = DEFAULT_RULES.nearly_full


@dataclass(frozen=True)
class DeviceState:
    """Per-rank inputs from telemetry; ranks missing from a map have no figures."""

    time: float = -math.inf  # when the readings were taken (the engine's clock)
    rank_speed: Mapping[int, float] = field(default_factory=dict)
    interfered: frozenset[int] = frozenset()
    free_memory: Mapping[int, int] = field(default_factory=dict)  # bytes free on the rank's device
    total_memory: Mapping[int, int] = field(default_factory=dict)
    nearly_full: frozenset[int] = frozenset()  # by the device's free memory alone
    foreign_processes: Mapping[int, int] = field(default_factory=dict)  # per rank
    nearly_full_share: float = DEFAULT_RULES_NEARLY_FULL

    @property
    def known(self) -> bool:
        return bool(self.total_memory)

    def nearly_full_given(self, headroom: Mapping[int, int]) -> frozenset[int]:
        """The nearly full ranks once ``headroom`` (free plus the allocator's unused cache,
        per rank) is counted as free."""
        return frozenset(rank for rank in self.nearly_full
                         if headroom.get(rank, 0) < self.nearly_full_share * self.total_memory.get(rank, 0))


def device_state(snapshot: Snapshot, rank_devices: Mapping[int, int],
                 rules: InterferenceRules = DEFAULT_RULES) -> DeviceState:
    """The scheduler's inputs for ``snapshot``; ``rank_devices`` maps rank -> NVML index."""
    speed: dict[int, float] = {}
    interfered = set()
    free: dict[int, int] = {}
    total: dict[int, int] = {}
    full = set()
    foreign: dict[int, int] = {}
    for rank, index in rank_devices.items():
        device = snapshot.devices.get(index)
        if device is None:
            continue
        free[rank] = device.free_memory
        total[rank] = device.memory_total
        if device.free_memory < rules.nearly_full * device.memory_total:
            full.add(rank)
        pids = snapshot.foreign.get(index, [])
        foreign[rank] = len(pids)
        if pids:
            interfered.add(rank)
            speed[rank] = rules.speed(snapshot.foreign_util.get(index, device.gpu_util or 0.0))
    return DeviceState(snapshot.time, speed, frozenset(interfered), free, total, frozenset(full), foreign,
                       rules.nearly_full)
