"""The engine's eye on its GPUs: a telemetry sampler and what it means for the scheduler.

The sampler thread reads the devices (NVML, or a source the caller gives, such as a
``FakeSource`` in tests) every ``telemetry_period_s``; the event loop only ever reads the
latest snapshot, which is one attribute load, and turns it into a DeviceState for the
scheduler at each dispatch. After each sample the thread asks the loop, through
``call_soon_threadsafe``, to look again (memory freed or a foreign job gone may let held
work start). NVML's initialisation and first sample run on a worker thread too, so
``start`` never blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from engine.scheduler.device_state import DeviceState, InterferenceRules, device_state
from engine.telemetry import Snapshot, Source, Telemetry, TelemetrySampler, summary

logger = logging.getLogger(__name__)


class DeviceMonitor:
    def __init__(self, period_s: float, *, source: Source | None = None,
                 rank_devices: Mapping[int, int] | None = None, rules: InterferenceRules | None = None,
                 detect_foreign: bool = True) -> None:
        """``source``: read it instead of NVML; ``rank_devices``: rank -> device index
        (default: NVML's mapping of the workers' CUDA devices, or rank r -> device r for
        a given source); ``detect_foreign`` False: no process counts as foreign."""
        self.period_s = period_s
        self.detect_foreign = detect_foreign
        self.rules = rules or InterferenceRules()
        self._source = source
        self._rank_devices = dict(rank_devices) if rank_devices is not None else None
        self.sampler: TelemetrySampler | None = None
        self._off_reason: str | None = None
        self._state = DeviceState()
        self._state_of: Snapshot | None = None

    async def start(self, *, device: str, model_device: str, num_ranks: int,
                    our_pids: Callable[[], Iterable[int]], on_sample: Callable[[], None]) -> None:
        """``device`` is the engine's option (auto, cpu, cuda, cuda:K); ``model_device`` where
        the model really runs (its ranks map to GPUs only on cuda)."""
        loop = asyncio.get_running_loop()

        def notify(_: Snapshot) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(on_sample)

        if self.period_s <= 0 or (device == "cpu" and self._source is None):
            self._off_reason = "telemetry_period_s is 0" if self.period_s <= 0 else "the engine runs on cpu"
            logger.info("GPU telemetry off: %s", self._off_reason)
            return
        if self._source is not None:
            sampler = TelemetrySampler(Telemetry(self._source, our_pids, detect_foreign=self.detect_foreign),
                                       self.period_s, notify)
            rank_devices = self._rank_devices if self._rank_devices is not None else {r: r for r in range(num_ranks)}
        else:
            def open_nvml() -> tuple[TelemetrySampler, dict[int, int]]:
                sampler = TelemetrySampler.from_nvml(our_pids, self.period_s, notify, self.detect_foreign)
                source = sampler.telemetry.source
                if self._rank_devices is not None:
                    return sampler, self._rank_devices
                if source is not None and model_device.startswith("cuda"):
                    return sampler, source.rank_devices(device, num_ranks)  # type: ignore[attr-defined]
                return sampler, {}

            # NVML calls (init, UUID look-ups) stay off the loop; NVML failing in any way
            # means no telemetry, never a failed start.
            try:
                sampler, rank_devices = await loop.run_in_executor(None, open_nvml)
            except Exception as exc:  # noqa: BLE001
                self._off_reason = f"NVML failed: {type(exc).__name__}: {exc}"
                logger.warning("GPU telemetry off: %s", self._off_reason)
                return
        self._rank_devices = rank_devices
        self.sampler = sampler
        if sampler.available:
            await loop.run_in_executor(None, sampler.telemetry.sample, time.monotonic())
            sampler.start()

    @property
    def rank_devices(self) -> dict[int, int]:
        return dict(self._rank_devices or {})

    def snapshot(self) -> Snapshot:
        return self.sampler.snapshot() if self.sampler is not None else Snapshot.empty()

    def state(self) -> DeviceState:
        """The scheduler's inputs from the latest snapshot (derived once per snapshot)."""
        snapshot = self.snapshot()
        if snapshot is not self._state_of:
            self._state = device_state(snapshot, self._rank_devices or {}, self.rules)
            self._state_of = snapshot
        return self._state

    def summary(self) -> str:
        reason = self._off_reason or (self.sampler.reason if self.sampler is not None else None)
        return summary(self.snapshot(), reason)

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
