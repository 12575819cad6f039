"""Reading GPUs through NVML (nvidia-ml-py), and which NVML device each worker rank uses.

NVML is a management library: it never creates a CUDA context, so the engine process can
read every GPU without touching CUDA. Every call here runs on the telemetry thread.

Rank r runs on CUDA ordinal ``r % visible`` (engine/executor/multiproc.py). CUDA ordinals
count the devices in ``CUDA_VISIBLE_DEVICES`` (when set), and NVML counts every device on
the machine, so ordinal k is NVML device k only when nothing is hidden. The mapping reads
the variable: an integer entry is an NVML index (exact with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``,
which NVML also follows; CUDA's default fastest-first order agrees on machines of
identical GPUs), a ``GPU-<uuid>`` entry (or a unique prefix of one) is looked up by UUID.
MIG instances (``MIG-...``) have no device-level figures: such ranks go unmapped and the
scheduler treats them as without telemetry.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from engine.device_stats import DeviceStats, TelemetryUnavailable


def visible_entries(value: str | None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` split into entries; None when unset (every device visible)."""
    if value is None:
        return None
    entries = []
    for entry in value.split(","):
        entry = entry.strip()
        # CUDA stops at the first invalid entry; -1 is the usual way to hide everything.
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return entries


def rank_ordinals(device: str, num_ranks: int, visible: int) -> dict[int, int]:
    """The CUDA ordinal of each rank for the engine's ``device`` option (as rank_device does)."""
    if visible < 1:
        return {}
    if device in ("auto", "cuda"):
        return {rank: rank % visible for rank in range(num_ranks)}
    if device.startswith("cuda:"):
        ordinal = int(device.partition(":")[2])
        return dict.fromkeys(range(num_ranks), ordinal) if ordinal < visible else {}
    return {}


class NvmlSource:
    """Reads every GPU on the machine through nvidia-ml-py."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, ImportError ...
            raise TelemetryUnavailable(f"NVML is not available ({exc})") from exc
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.names = [self._text(self._optional(lambda h=h: pynvml.nvmlDeviceGetName(h)) or "GPU")
                      for h in self.handles]
        # Per device, the newest per-process sample seen (NVML's microsecond timestamps).
        self._last_sample_us = [0] * len(self.handles)

    # ----- which device each rank uses -------------------------------------------------
    def rank_devices(self, device: str, num_ranks: int, env: str | None = None) -> dict[int, int]:
        """NVML index of each rank's GPU; ranks that cannot be mapped are left out."""
        entries = visible_entries(os.environ.get("CUDA_VISIBLE_DEVICES") if env is None else env)
        indices = list(range(len(self.handles))) if entries is None else [self._index(e) for e in entries]
        out = {}
        for rank, ordinal in rank_ordinals(device, num_ranks, len(indices)).items():
            index = indices[ordinal]
            if index is not None:
                out[rank] = index
        return out

    def _index(self, entry: str) -> int | None:
        if entry.isdigit():
            index = int(entry)
            return index if index < len(self.handles) else None
        if entry.startswith("GPU-"):
            for index, handle in enumerate(self.handles):
                uuid = self._text(self._optional(lambda h=handle: self.nvml.nvmlDeviceGetUUID(h)) or "")
                if uuid.startswith(entry):
                    return index
        return None

    # ----- readings -----------------------------------------------------------------------
    def read(self, now: float) -> list[DeviceStats]:
        nvml = self.nvml
        out = []
        for index, handle in enumerate(self.handles):
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            util = nvml.nvmlDeviceGetUtilizationRates(handle)
            clock = self._optional(lambda h=handle: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM))
            out.append(DeviceStats(
                index=index, name=self.names[index], memory_used=int(memory.used), memory_total=int(memory.total),
                gpu_util=float(util.gpu), memory_util=float(util.memory),
                processes=self._processes(handle), process_util=self._process_util(index, handle),
                power_w=self._optional(lambda h=handle: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
                temperature_c=self._optional(
                    lambda h=handle: float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))),
                sm_clock_mhz=None if clock is None else int(clock),
                throttle_reasons=int(self._optional(lambda h=handle: self._throttle(h)) or 0)))
        return out

    def _processes(self, handle: object) -> dict[int, int]:
        """pid -> bytes for compute and graphics contexts (either one competes for the SMs)."""
        found: dict[int, int] = {}
        for call in (self.nvml.nvmlDeviceGetComputeRunningProcesses, self.nvml.nvmlDeviceGetGraphicsRunningProcesses):
            for proc in self._optional(lambda c=call: c(handle)) or []:
                found[int(proc.pid)] = max(found.get(int(proc.pid), 0), int(proc.usedGpuMemory or 0))
        return found

    def _process_util(self, index: int, handle: object) -> dict[int, float]:
        """pid -> SM utilisation (%) over the samples since the last read; empty where the
        driver keeps no per-process samples (or none arrived: NVMLError_NotFound)."""
        samples = self._optional(lambda: self.nvml.nvmlDeviceGetProcessUtilization(handle, self._last_sample_us[index]))
        util: dict[int, list[float]] = {}
        for s in samples or []:
            util.setdefault(int(s.pid), []).append(float(s.smUtil))
            self._last_sample_us[index] = max(self._last_sample_us[index], int(s.timeStamp))
        return {pid: sum(v) / len(v) for pid, v in util.items()}

    def _throttle(self, handle: object) -> int:
        # Renamed "clocks event reasons" in newer drivers; the old name is deprecated.
        call = getattr(self.nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) \
            or self.nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        return int(call(handle))

    def _optional(self, call: Callable[[], object]) -> object | None:
        try:
            return call()
        except self.nvml.NVMLError:
            return None

    @staticmethod
    def _text(value: object) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    def close(self) -> None:
        with contextlib.suppress(self.nvml.NVMLError):
            self.nvml.nvmlShutdown()
