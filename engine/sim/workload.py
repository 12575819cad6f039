"""Workloads for the simulator and the serving benchmark: who asks for what, and when.

A workload is a list of requests with arrival times, drawn from request classes (S/M/L
by image size), each class with a deadline factor ``alpha``: a request's deadline is
``alpha`` times its class's *single-GPU latency* (the cost model's time for it alone on
one worker, encode to decode) after its arrival. Arrivals are Poisson, or
piecewise-Poisson (phases of different load), with the rate set by a target *load*:

    load = offered single-GPU work / (GPUs x window)

so load 1.0 would keep every GPU busy if every request ran alone at degree 1. In
saturation mode every request arrives at t=0, which measures the maximum throughput.

The same workload, written as JSON lines, drives ``gfdit simulate --workload`` and
``benchmarks/benchmark_serving.py --workload``, so a prediction and a real run see the
same requests. Everything is drawn from one seeded generator: a seed gives one workload.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.scheduler.cost_model import CostModel

PROMPTS = ("a red fox in the snow", "a lighthouse on a cliff at dawn", "a bowl of ramen, studio light",
           "a city street in the rain at night", "an astronaut riding a horse", "a watercolor of a harbor")


@dataclass(frozen=True)
class RequestClass:
    """A kind of request: its size, its share of arrivals and its deadline factor."""

    name: str
    width: int
    height: int
    weight: float = 1.0
    alpha: float | None = None  # deadline = alpha x single-GPU latency; None: no deadline
    steps: int | None = None  # None: the workload's (or the profile's default)
    n: int = 1

    @classmethod
    def parse(cls, text: str) -> RequestClass:
        """``NAME:WxH[:WEIGHT[:ALPHA[:STEPS]]]``, e.g. ``S:512x512:0.5:1.5``; ``-`` skips a field."""
        parts = text.strip().split(":")
        if len(parts) < 2 or not parts[0]:
            raise ValueError(f"request class {text!r}: expected NAME:WxH[:WEIGHT[:ALPHA[:STEPS]]]")
        try:
            width, _, height = parts[1].lower().partition("x")
            fields = [*parts[2:], "-", "-", "-"][:3]
            return cls(parts[0], int(width), int(height or width),
                       weight=1.0 if fields[0] == "-" else float(fields[0]),
                       alpha=None if fields[1] == "-" else float(fields[1]),
                       steps=None if fields[2] == "-" else int(fields[2]))
        except ValueError:
            raise ValueError(f"request class {text!r}: expected NAME:WxH[:WEIGHT[:ALPHA[:STEPS]]]") from None


# Small, medium and large images; the small ones have the tightest SLO.
DEFAULT_CLASSES = (RequestClass("S", 512, 512, 0.5, 1.5), RequestClass("M", 1024, 1024, 0.3, 2.0),
                   RequestClass("L", 1536, 1536, 0.2, 6.0))


@dataclass(frozen=True)
class Phase:
    """A stretch of the window with a constant load."""

    duration_s: float
    load: float

    @classmethod
    def parse_list(cls, text: str) -> list[Phase]:
        """``DURATION:LOAD,...``, e.g. ``600:0.6,300:1.5,600:0.9``."""
        phases = []
        for part in text.split(","):
            duration, _, load = part.partition(":")
            phases.append(cls(float(duration), float(load)))
        return phases


@dataclass(frozen=True)
class WorkloadRequest:
    index: int
    arrival_s: float
    label: str
    width: int
    height: int
    steps: int
    n: int
    deadline_s: float | None  # seconds after arrival
    seed: int
    prompt: str
    priority: int = 0


def single_gpu_latency_s(cls: RequestClass, cost_model: CostModel, steps: int) -> float:
    return cost_model.request_s(cost_model.tokens(cls.width, cls.height), steps, cls.n)


def generate(classes: Sequence[RequestClass], cost_model: CostModel, *, num_gpus: int,
             phases: Sequence[Phase] = (), saturate: int = 0, steps: int | None = None,
             seed: int = 0) -> list[WorkloadRequest]:
    """Poisson arrivals per phase at the phase's load, or ``saturate`` requests at t=0."""
    if not classes or any(c.weight < 0 for c in classes) or not sum(c.weight for c in classes) > 0:
        raise ValueError("request classes need non-negative weights with a positive sum")
    rng = random.Random(seed)
    weights = [c.weight for c in classes]
    class_steps = [c.steps or steps or cost_model.default_steps for c in classes]
    latency = [single_gpu_latency_s(c, cost_model, s) for c, s in zip(classes, class_steps)]
    mean_work = sum(w * t for w, t in zip(weights, latency)) / sum(weights)
    arrivals: list[tuple[float, int]] = []
    if saturate:
        arrivals = [(0.0, k) for k in rng.choices(range(len(classes)), weights, k=saturate)]
    start = 0.0
    for phase in phases:
        arrivals += _phase_arrivals(phase, start, num_gpus, latency, weights, mean_work, rng)
        start += phase.duration_s
    requests = []
    for i, (t, k) in enumerate(arrivals):
        c = classes[k]
        requests.append(WorkloadRequest(
            index=i, arrival_s=t, label=c.name, width=c.width, height=c.height, steps=class_steps[k], n=c.n,
            deadline_s=None if c.alpha is None else c.alpha * latency[k], seed=rng.randrange(2**31),
            prompt=f"{PROMPTS[i % len(PROMPTS)]} ({c.name} {i})"))
    return requests


def _phase_arrivals(phase: Phase, start: float, num_gpus: int, latency: list[float], weights: list[float],
                    mean_work: float, rng: random.Random) -> list[tuple[float, int]]:
    """Poisson arrivals whose offered work matches the phase's load.

    Gaps are exponential at the rate the load implies; requests are drawn until their
    single-GPU work reaches load x GPUs x duration, and the gaps are then scaled to span
    the phase, so the load asked is the load offered (within one request), not a draw.
    """
    if phase.load <= 0 or phase.duration_s <= 0:
        return []
    target = phase.load * num_gpus * phase.duration_s
    rate = phase.load * num_gpus / mean_work
    drawn: list[tuple[float, int]] = []
    t = work = 0.0
    while work < target:
        t += rng.expovariate(rate)
        k = rng.choices(range(len(weights)), weights)[0]
        drawn.append((t, k))
        work += latency[k]
    end = t + rng.expovariate(rate)  # where the next arrival would fall: the phase's end
    return [(start + at * phase.duration_s / end, k) for at, k in drawn]


def offered_load(requests: Iterable[WorkloadRequest], cost_model: CostModel, num_gpus: int,
                 window_s: float) -> float:
    """Single-GPU work of ``requests`` over GPUs x window (what ``generate`` aims at)."""
    work = sum(cost_model.request_s(cost_model.tokens(r.width, r.height), r.steps, r.n) for r in requests)
    return work / (num_gpus * window_s)


def save_jsonl(requests: Iterable[WorkloadRequest], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(asdict(r)) + "\n" for r in requests))


def load_jsonl(path: str | Path) -> list[WorkloadRequest]:
    lines = Path(path).read_text().splitlines()
    return [WorkloadRequest(**json.loads(line)) for line in lines if line.strip()]
