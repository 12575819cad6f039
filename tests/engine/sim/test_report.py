"""The statistics shared by the simulator and the serving benchmark, on hand-made records."""

import math

import pytest

from engine.sim.report import LatencyStats, RequestRecord, ServingMetrics, percentile


def test_percentile_interpolates_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))


def test_mean_and_median_are_not_confused():
    stats = LatencyStats.of([1.0, 1.0, 1.0, 1.0, 16.0])
    assert stats.mean == 4.0 and stats.p50 == 1.0
    assert stats.p99 == pytest.approx(15.4)


def test_serving_metrics_count_failures_as_misses_and_split_by_class():
    records = [
        RequestRecord("S", 0.0, 1.0, deadline_s=2.0),
        RequestRecord("S", 1.0, 3.0, deadline_s=2.0),  # late
        RequestRecord("L", 2.0, 8.0, deadline_s=10.0, images=2),
        RequestRecord("L", 3.0, None, deadline_s=10.0),  # failed
        RequestRecord("X", 4.0, 2.0),  # no deadline
    ]
    m = ServingMetrics.of(records)
    assert (m.requests, m.completed, m.failed) == (5, 4, 1)
    assert m.duration_s == 10.0  # first arrival at 0, last completion at 2 + 8
    assert m.throughput == pytest.approx(0.4) and m.image_throughput == pytest.approx(0.5)
    assert m.latency.mean == pytest.approx(3.5)
    assert m.slo_attainment == pytest.approx(2 / 4)
    assert m.class_attainment["S"] == 0.5 and m.class_attainment["L"] == 0.5 and math.isnan(m.class_attainment["X"])
    assert m.class_mean_latency == {"L": 8.0, "S": 2.0, "X": 2.0}
    flat = m.to_dict()
    assert flat["mean_latency_s"] == pytest.approx(3.5) and flat["p95_latency_s"] == m.latency.p95
    assert flat["class_attainment"]["S"] == 0.5


def test_no_records_give_nan_not_an_error():
    m = ServingMetrics.of([])
    assert m.requests == 0 and math.isnan(m.throughput) and math.isnan(m.slo_attainment)
