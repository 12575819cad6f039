"""Policies side by side on one workload: what ``gfdit simulate`` runs and reports.

Each policy runs twice on fresh scheduler state: on the workload (Poisson arrivals at the
target load) and, if asked, in saturation (every request at t=0, for the maximum
throughput). The comparison sets a cost-aware policy against a static baseline with the
ratios the GF-DiT paper reports, and states the best saturated throughput any policy
could reach on this profile, so a target that the hardware figures rule out is visible
as such.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.scheduler.cost_model import CostModel
from engine.scheduler.policies import make_policy
from engine.sim.simulator import ObserveFn, SimResult, Simulator, SpeedFn
from engine.sim.workload import RequestClass, WorkloadRequest

# "Compared with fixed-pipeline execution with static parallelism" (GF-DiT, up to).
PAPER = {"throughput_x": 6.01, "mean_latency_change": -0.95, "slo_violation_change": -0.90}


@dataclass(frozen=True)
class PolicySpec:
    label: str  # how the table names it: static-4, elastic, my.module:Policy
    name: str  # what make_policy takes
    options: dict[str, Any]

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        """``static-K`` is the static policy at degree K; anything else goes to make_policy."""
        head, _, degree = text.partition("-")
        if head == "static" and degree.isdigit():
            return cls(text, "static", {"static_degree": int(degree)})
        return cls(text, text, {})


def default_policies(degrees: Sequence[int]) -> list[PolicySpec]:
    return [PolicySpec.parse(s) for s in [*(f"static-{d}" for d in degrees), "fcfs", "srtf", "edf", "elastic"]]


@dataclass
class PolicyResult:
    spec: PolicySpec
    loaded: SimResult | None
    saturated: SimResult | None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.loaded is not None:
            out.update(self.loaded.metrics.to_dict())
            out["utilisation"] = self.loaded.utilisation
            out["migrations"] = self.loaded.migrations
            out["denoise_image_steps_by_degree"] = {str(d): n for d, n in self.loaded.denoise_steps_by_degree.items()}
        if self.saturated is not None:
            out["saturated_throughput"] = self.saturated.metrics.throughput
            out["saturated_mean_latency_s"] = self.saturated.metrics.latency.mean
        return out


def run_policies(specs: Sequence[PolicySpec], cost_model: CostModel, num_gpus: int,
                 workload: Sequence[WorkloadRequest], saturated: Sequence[WorkloadRequest] = (), *,
                 max_batch_size: int = 16, max_batch_tokens: int | None = None, jitter: float = 0.0, seed: int = 0,
                 speed: SpeedFn | None = None, observe: ObserveFn | None = None,
                 make_observe: Callable[[], ObserveFn] | None = None,
                 cache_hit_rate: float = 0.0) -> list[PolicyResult]:
    """``make_observe`` gives each run a fresh ``observe`` hook (telemetry keeps state)."""
    degrees = tuple(d for d in cost_model.degrees if d <= num_gpus)

    def simulate(spec: PolicySpec, requests: Sequence[WorkloadRequest]) -> SimResult | None:
        if not requests:
            return None
        policy = make_policy(spec.name, cost_model=cost_model, **spec.options)
        sim = Simulator(policy, cost_model, num_gpus, max_batch_size=max_batch_size,
                        max_batch_tokens=max_batch_tokens, degrees=degrees,
                        speed=speed, observe=make_observe() if make_observe is not None else observe,
                        jitter=jitter, seed=seed, cache_hit_rate=cache_hit_rate)
        return sim.run(requests)

    return [PolicyResult(spec, simulate(spec, workload), simulate(spec, saturated)) for spec in specs]


def compare(candidate: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """Ratios of one policy's figures (``PolicyResult.to_dict``, or their ``average``) to a
    baseline's: below 1 is better for violations and latency, above 1 for throughput."""
    out: dict[str, float] = {}
    if "slo_attainment" in candidate and "slo_attainment" in baseline:
        out["slo_violation_x"] = _ratio(1 - candidate["slo_attainment"], 1 - baseline["slo_attainment"])
        out["mean_latency_x"] = _ratio(candidate["mean_latency_s"], baseline["mean_latency_s"])
        out["p95_latency_x"] = _ratio(candidate["p95_latency_s"], baseline["p95_latency_s"])
    if "saturated_throughput" in candidate and "saturated_throughput" in baseline:
        out["saturated_throughput_x"] = _ratio(candidate["saturated_throughput"], baseline["saturated_throughput"])
    return out


def average(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean of several runs' figures, key by key (nested dicts too; NaN left out)."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [run[key] for run in runs if key in run]
        if isinstance(values[0], dict):
            out[key] = average(values)
        elif isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            finite = [v for v in values if not math.isnan(v)]
            out[key] = sum(finite) / len(finite) if finite else math.nan
        else:
            out[key] = values[0]
    return out


def saturation_bound(classes: Sequence[RequestClass], cost_model: CostModel, baseline_degree: int,
                     degrees: Sequence[int], steps: int | None = None) -> float:
    """The most any policy can gain in saturated throughput over static lanes of
    ``baseline_degree`` (one request at a time per lane) on this class mix: every
    request at its most efficient degree, every worker busy, against the lanes' time."""
    total = sum(c.weight for c in classes)
    lane = best = 0.0
    for c in classes:
        t, n = cost_model.tokens(c.width, c.height), c.n
        s = c.steps or steps or cost_model.default_steps
        stages = cost_model.request_s(t, s, n) - s * cost_model.step_s(t, n, 1)
        lane += c.weight / total * baseline_degree * (stages + s * cost_model.step_s(t, n, baseline_degree))
        best += c.weight / total * (stages + s * min(d * cost_model.step_s(t, n, d) for d in degrees))
    return lane / best


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf") if a else 1.0
