"""Prometheus metrics of one engine, fed by its observer hook, in a registry of their own.

A registry per engine (rather than prometheus_client's global one) lets several engines
live in one process (tests, embedding applications) without name clashes. Gauges read the
scheduler at scrape time, so they cannot drift from the engine's own book; so do the
per-device gauges, from the telemetry sampler's latest snapshot (``DeviceCollector``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from engine.messages import Stage
from engine.stats import RequestStats, TaskStats

if TYPE_CHECKING:
    from engine.client import EngineClient
    from engine.device_monitor import DeviceMonitor

# Outcomes of a request: the engine's three ends, and the refusals of a front end.
OUTCOMES = ("finished", "failed", "aborted", "rejected", "queue_full")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

__all__ = ["CONTENT_TYPE_LATEST", "EngineMetrics"]


class EngineMetrics:
    """Observes an engine client (``add_observer``) and renders the Prometheus text format."""

    def __init__(self, engine: EngineClient, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("gfdit_queue_depth", "Requests waiting for their first task.", registry=r)
        self.queue_depth.set_function(lambda: engine.load().waiting)
        self.running = Gauge("gfdit_running_requests", "Requests whose state lives on a worker.", registry=r)
        self.running.set_function(lambda: engine.load().running)
        self.requests = Counter("gfdit_requests", "Requests by how they ended.", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.latency = Histogram("gfdit_request_latency_seconds", "Arrival to images, finished requests.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("gfdit_request_queue_wait_seconds", "Arrival to the first task.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.step_latency = Histogram(
            "gfdit_step_latency_seconds", "One denoise step of a batch, by images in it and parallel degree.",
            ["batch_size", "degree"], buckets=STEP_BUCKETS, registry=r)
        self.stage_latency = Histogram("gfdit_task_latency_seconds", "One task, by stage.", ["stage"],
                                       buckets=STEP_BUCKETS, registry=r)
        self.images = Counter("gfdit_images_generated", "Images delivered.", registry=r)
        self.steps = Counter("gfdit_request_steps", "Denoise steps of ended requests: computed (every transformer "
                             "block ran) or cached (the step cache reused the later blocks' residual).", ["kind"],
                             registry=r)
        for kind in ("computed", "cached"):
            self.steps.labels(kind)
        self.peak_memory = Gauge("gfdit_task_peak_memory_bytes",
                                 "Device memory of the last measured task by stage: the scheduler's predicted "
                                 "peak and the worker's actual one.", ["stage", "kind"], registry=r)
        self.underpredicted = Counter("gfdit_memory_underpredicted_tasks",
                                      "Tasks whose actual memory peak exceeded the prediction.", registry=r)
        for collector in engine.metric_collectors():
            r.register(collector)
        engine.add_observer(self)

    # ----- EngineObserver ------------------------------------------------------------
    def on_task(self, stats: TaskStats) -> None:
        self.stage_latency.labels(stats.stage.name.lower()).observe(stats.elapsed_s)
        if stats.stage == Stage.DENOISE and not stats.failed:
            self.step_latency.labels(str(stats.images), str(stats.degree)).observe(
                stats.elapsed_s / max(stats.num_steps, 1))
        if stats.peak_memory_bytes and stats.predicted_peak_bytes is not None:
            stage = stats.stage.name.lower()
            self.peak_memory.labels(stage, "predicted").set(stats.predicted_peak_bytes)
            self.peak_memory.labels(stage, "actual").set(stats.peak_memory_bytes)
            if stats.peak_memory_bytes > stats.predicted_peak_bytes:
                self.underpredicted.inc()

    def on_request(self, stats: RequestStats) -> None:
        outcome = stats.status.name.lower()
        self.requests.labels(outcome).inc()
        if stats.queue_wait_s is not None:
            self.queue_wait.observe(stats.queue_wait_s)
        self.steps.labels("computed").inc(stats.computed_steps)
        self.steps.labels("cached").inc(stats.cached_steps)
        if outcome == "finished":
            self.latency.observe(stats.latency_s)
            self.images.inc(stats.images)

    # ----- front ends ----------------------------------------------------------------
    def count_refused(self, outcome: str) -> None:
        """A request refused before it reached the engine (``rejected`` or ``queue_full``)."""
        self.requests.labels(outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def local_collectors(admission_cuts: Callable[[], int], devices: DeviceMonitor) -> list[Collector]:
    """What only an engine in this process can report: memory admission and its devices."""
    return [AdmissionCollector(admission_cuts), DeviceCollector(devices)]


class AdmissionCollector(Collector):
    def __init__(self, admission_cuts: Callable[[], int]) -> None:
        self.admission_cuts = admission_cuts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("gfdit_memory_admission_cut_requests",
                                "Requests memory admission held back from a planned task (since start).",
                                value=float(self.admission_cuts()))


# (name, help, value of a DeviceStats or None): the per-device gauges read from NVML.
_DEVICE_GAUGES = (
    ("memory_used_bytes", "Device memory in use (all processes).", lambda d: d.memory_used),
    ("memory_total_bytes", "Device memory.", lambda d: d.memory_total),
    ("gpu_utilization_percent", "Share of the last sample period a kernel ran.", lambda d: d.gpu_util),
    ("memory_utilization_percent", "Share of the last sample period device memory was read or written.",
     lambda d: d.memory_util),
    ("power_watts", "Power draw.", lambda d: d.power_w),
    ("temperature_celsius", "GPU temperature.", lambda d: d.temperature_c),
    ("sm_clock_mhz", "SM clock.", lambda d: d.sm_clock_mhz),
    ("throttle_reasons", "NVML clocks-event (throttle) reason bit mask; 0: none.", lambda d: d.throttle_reasons),
)


class DeviceCollector(Collector):
    """Per-device gauges at scrape time from the telemetry sampler's latest snapshot, plus
    what the scheduler makes of them: foreign processes, derated speed, interference."""

    def __init__(self, devices: DeviceMonitor) -> None:
        self.devices = devices

    def collect(self) -> Iterator[GaugeMetricFamily]:
        monitor = self.devices
        snapshot = monitor.snapshot()
        state = monitor.state()
        devices = sorted(snapshot.devices.items())
        for name, doc, value in _DEVICE_GAUGES:
            family = GaugeMetricFamily(f"gfdit_device_{name}", doc, labels=["device"])
            for index, d in devices:
                if value(d) is not None:
                    family.add_metric([str(index)], float(value(d)))
            yield family
        foreign = GaugeMetricFamily("gfdit_device_foreign_processes", "Processes on the device that are not "
                                    "gfdit's workers.", labels=["device"])
        for index, _ in devices:
            foreign.add_metric([str(index)], float(len(snapshot.foreign.get(index, []))))
        yield foreign
        speed = GaugeMetricFamily("gfdit_rank_speed", "Relative speed the scheduler gives each worker rank "
                                  "(1 nominal; derated while its device is shared).", labels=["rank", "device"])
        interfered = GaugeMetricFamily("gfdit_rank_interfered", "1 while the rank's device runs a foreign process.",
                                       labels=["rank", "device"])
        headroom = GaugeMetricFamily("gfdit_rank_free_memory_bytes", "Free memory on the rank's device.",
                                     labels=["rank", "device"])
        for rank, index in sorted(monitor.rank_devices.items()):
            if rank not in state.total_memory:
                continue
            labels = [str(rank), str(index)]
            speed.add_metric(labels, state.rank_speed.get(rank, 1.0))
            interfered.add_metric(labels, float(rank in state.interfered))
            headroom.add_metric(labels, float(state.free_memory[rank]))
        yield from (speed, interfered, headroom)
