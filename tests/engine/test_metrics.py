"""Prometheus metrics (engine/metrics.py), fed by the engine's observer hook."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import AsyncEngine, ImageParams
from engine.metrics import EngineMetrics


@pytest.fixture
async def engine():
    engine = await AsyncEngine.create(model="tiny-pixart", device="cpu", executor="inprocess", steps_per_task=2)
    yield engine
    await engine.shutdown()


async def test_prometheus_metrics_count_what_happened(engine):
    metrics = EngineMetrics(engine)
    outputs = [o async for o in engine.generate("a fox", ImageParams(n=2, num_inference_steps=4, width=64, height=64))]
    assert outputs[-1].finished
    metrics.count_refused("rejected")

    def value(name, **labels):
        return metrics.registry.get_sample_value(name, labels)

    assert value("gfdit_images_generated_total") == 2
    assert value("gfdit_requests_total", outcome="finished") == 1
    assert value("gfdit_requests_total", outcome="rejected") == 1
    assert value("gfdit_requests_total", outcome="aborted") == 0
    assert value("gfdit_request_latency_seconds_count") == 1
    assert value("gfdit_request_queue_wait_seconds_count") == 1
    # 4 steps in tasks of 2: two observations of one step each for the batch of 2 images.
    assert value("gfdit_step_latency_seconds_count", batch_size="2", degree="1") == 2
    assert value("gfdit_queue_depth") == 0 and value("gfdit_running_requests") == 0
    names = {f.name for f in text_string_to_metric_families(metrics.render().decode())}
    assert {"gfdit_queue_depth", "gfdit_running_requests", "gfdit_requests", "gfdit_step_latency_seconds",
            "gfdit_task_latency_seconds", "gfdit_images_generated"} <= names
    # Two engines in one process keep separate registries.
    assert EngineMetrics(engine).registry is not metrics.registry
