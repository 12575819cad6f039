"""Serving metrics from per-request records; shared by the simulator and the serving benchmark.

Both produce the same records (class, arrival, latency, deadline), so a simulated and a
real run are summarised by the same code and compare directly. A request that failed
counts as a missed deadline and has no latency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class RequestRecord:
    label: str
    arrival_s: float
    latency_s: float | None  # None: the request failed
    deadline_s: float | None = None  # seconds after arrival; None: no SLO
    images: int = 1

    @property
    def ok(self) -> bool:
        return self.latency_s is not None

    @property
    def met(self) -> bool:
        return self.ok and (self.deadline_s is None or self.latency_s <= self.deadline_s)  # type: ignore[operator]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when empty."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class LatencyStats:
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> LatencyStats:
        if not values:
            return cls(math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(sum(values) / len(values), percentile(values, 50), percentile(values, 90),
                   percentile(values, 95), percentile(values, 99))


@dataclass(frozen=True)
class ServingMetrics:
    requests: int
    completed: int
    failed: int
    duration_s: float  # first arrival to last completion
    throughput: float  # completed requests per second over duration_s
    image_throughput: float
    latency: LatencyStats
    slo_attainment: float  # share of requests with a deadline that met it (NaN if none has one)
    class_attainment: dict[str, float] = field(default_factory=dict)
    class_mean_latency: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, records: Sequence[RequestRecord]) -> ServingMetrics:
        done = [r for r in records if r.ok]
        if records and done:
            start = min(r.arrival_s for r in records)
            end = max(r.arrival_s + r.latency_s for r in done)  # type: ignore[operator]
            duration = end - start
        else:
            duration = 0.0
        rate = (lambda k: k / duration) if duration > 0 else (lambda k: math.nan)
        labels = sorted({r.label for r in records})
        return cls(
            requests=len(records), completed=len(done), failed=len(records) - len(done), duration_s=duration,
            throughput=rate(len(done)), image_throughput=rate(sum(r.images for r in done)),
            latency=LatencyStats.of([r.latency_s for r in done]),  # type: ignore[misc]
            slo_attainment=attainment(records),
            class_attainment={k: attainment([r for r in records if r.label == k]) for k in labels},
            class_mean_latency={k: LatencyStats.of([r.latency_s for r in done if r.label == k]).mean  # type: ignore[misc]
                                for k in labels})

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON form the simulator and the benchmark write."""
        out = asdict(self)
        latency = out.pop("latency")
        out.update({"mean_latency_s": latency["mean"], "p50_latency_s": latency["p50"],
                    "p90_latency_s": latency["p90"], "p95_latency_s": latency["p95"],
                    "p99_latency_s": latency["p99"]})
        return out


def attainment(records: Sequence[RequestRecord]) -> float:
    with_slo = [r for r in records if r.deadline_s is not None]
    return sum(r.met for r in with_slo) / len(with_slo) if with_slo else math.nan


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None, for JSON (which has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
