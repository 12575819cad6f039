"""Prometheus metrics of one engine, fed by its observer hook, in a registry of their own.

A registry per engine (rather than prometheus_client's global one) lets several engines
live in one process (tests, embedding applications) without name clashes. Gauges read the
scheduler at scrape time, so they cannot drift from the engine's own book.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from engine.messages import Stage
from engine.stats import RequestStats, TaskStats

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine

# Outcomes of a request: the engine's three ends, and the refusals of a front end.
OUTCOMES = ("finished", "failed", "aborted", "rejected", "queue_full")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

__all__ = ["CONTENT_TYPE_LATEST", "EngineMetrics"]


class EngineMetrics:
    """Observes an engine (``engine.add_observer``) and renders the Prometheus text format."""

    def __init__(self, engine: AsyncEngine, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("gfdit_queue_depth", "Requests waiting for their first task.", registry=r)
        self.queue_depth.set_function(lambda: engine.scheduler.num_waiting)
        self.running = Gauge("gfdit_running_requests", "Requests whose state lives on a worker.", registry=r)
        self.running.set_function(lambda: engine.scheduler.num_running)
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
        engine.add_observer(self)

    # ----- EngineObserver ------------------------------------------------------------
    def on_task(self, stats: TaskStats) -> None:
        self.stage_latency.labels(stats.stage.name.lower()).observe(stats.elapsed_s)
        if stats.stage == Stage.DENOISE and not stats.failed:
            self.step_latency.labels(str(stats.images), str(stats.degree)).observe(
                stats.elapsed_s / max(stats.num_steps, 1))

    def on_request(self, stats: RequestStats) -> None:
        outcome = stats.status.name.lower()
        self.requests.labels(outcome).inc()
        if stats.queue_wait_s is not None:
            self.queue_wait.observe(stats.queue_wait_s)
        if outcome == "finished":
            self.latency.observe(stats.latency_s)
            self.images.inc(stats.images)

    # ----- front ends ----------------------------------------------------------------
    def count_refused(self, outcome: str) -> None:
        """A request refused before it reached the engine (``rejected`` or ``queue_full``)."""
        self.requests.labels(outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
