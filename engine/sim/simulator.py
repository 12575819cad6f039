"""A discrete-event simulator: the real Scheduler and policies, a virtual clock, modelled workers.

Nothing is mocked above the workers: requests enter ``Scheduler.add_request``, tasks come
out of ``Scheduler.schedule`` (the policy's plans, checked by the scheduler) and results
go back through ``Scheduler.on_result`` from every member of a task, exactly as the
engine does it. Only the workers are replaced: a task lasts what the cost model predicts
for its stage, batch and degree, plus its migrations, divided by the speed of its slowest
member, times an optional seeded jitter. Time never comes from a clock, so a seed gives
one result.

Hooks for device conditions: ``speed(rank, t)`` is the true relative speed of a rank (a
device shared with a foreign job runs at, say, 0.5 for a window); ``observe(t)`` is what
the scheduler is told before each round: a DeviceState (``Scheduler.devices``), as the
engine's telemetry gives it (engine/sim/interference.py samples a fake NVML source), or
a plain rank -> speed map (``Scheduler.rank_speed``). Leaving ``observe`` out simulates a
scheduler blind to the slowdown.

A rank outside a task's group that only sends a request's state (a migration source)
answers once its sends are done, so it is free again long before the group finishes.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.config import SchedulerConfig
from engine.messages import ItemResult, Stage, Task, TaskResult
from engine.model_info import ModelInfo
from engine.params import ImageParams, StepCache
from engine.request import Request
from engine.scheduler.cost_model import CostModel
from engine.scheduler.device_state import DeviceState
from engine.scheduler.factory import make_scheduler
from engine.scheduler.policy import Policy
from engine.scheduler.scheduler import UpdateKind
from engine.sim.report import RequestRecord, ServingMetrics
from engine.sim.workload import WorkloadRequest

SpeedFn = Callable[[int, float], float]
ObserveFn = Callable[[float], "DeviceState | dict[int, float]"]


class SimulationStalled(RuntimeError):
    """Requests are left, no task is running and the policy plans nothing."""


@dataclass(frozen=True)
class SharedDevice:
    """One device shared with a foreign job from ``start_s`` to ``end_s``: it runs at ``speed``."""

    rank: int
    start_s: float
    end_s: float
    speed: float = 0.5

    def __call__(self, rank: int, t: float) -> float:
        return self.speed if rank == self.rank and self.start_s <= t < self.end_s else 1.0


@dataclass
class SimResult:
    policy: str
    records: list[RequestRecord]
    metrics: ServingMetrics
    busy_s: dict[int, float] = field(default_factory=dict)  # per rank, including migrations
    denoise_steps_by_degree: dict[int, int] = field(default_factory=dict)  # image-steps
    migrations: int = 0
    tasks: int = 0

    @property
    def utilisation(self) -> float:
        span = self.metrics.duration_s * max(len(self.busy_s), 1)
        return sum(self.busy_s.values()) / span if span > 0 else math.nan


def simulated_model(cost_model: CostModel) -> ModelInfo:
    """The ModelInfo of the model a profile measured, as far as scheduling needs it.

    Tokens follow the profile's pixels per token side; a profile measured on a CPU gets
    the CPU's batch caps. Its heads are the least number every measured degree divides:
    the degrees themselves come from the profile.
    """
    profile = cost_model.profile
    return ModelInfo(
        name=profile.model, family="simulated", default_width=512, default_height=512,
        default_steps=profile.default_steps, default_guidance=4.0,
        latent=profile.latent,
        max_size=1 << 16, num_heads=math.lcm(*cost_model.degrees), guidance="cfg",
        device="cpu" if profile.device.lower().startswith("cpu") else "cuda", dtype="bfloat16")


class Simulator:
    """``max_batch_size``, ``max_batch_tokens`` and ``steps_per_task`` are the engine's
    scheduler options (None: the engine's default for the profile's device)."""

    def __init__(self, policy: Policy, cost_model: CostModel, num_workers: int, *, max_batch_size: int = 16,
                 steps_per_task: int = 1, degrees: Sequence[int] | None = None, speed: SpeedFn | None = None,
                 observe: ObserveFn | None = None, jitter: float = 0.0, seed: int = 0,
                 max_batch_tokens: int | None = None, model: ModelInfo | None = None,
                 cache_hit_rate: float = 0.0) -> None:
        """``cache_hit_rate``: every request runs a step cache that reuses this share of its
        steps (a measured figure, benchmarks/benchmark_cache.py's cached_fraction); its
        results report those cached steps, so the scheduler learns the rate as it does
        from real workers, and a step costs what the cost model says of that share."""
        self.cost_model = cost_model
        self.cache_hit_rate = cache_hit_rate
        self.model = model or simulated_model(cost_model)
        config = SchedulerConfig(max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                                 steps_per_task=steps_per_task)
        self.scheduler = make_scheduler(self.model, config, num_workers, policy=policy,
                                        degrees=cost_model.degrees if degrees is None else degrees)
        self.num_workers = num_workers
        self.speed = speed
        self.observe = observe
        self.jitter = jitter
        self._rng = random.Random(seed)

    def run(self, workload: Sequence[WorkloadRequest]) -> SimResult:
        sched = self.scheduler
        seq = itertools.count()
        events: list[tuple[float, int, WorkloadRequest | tuple[Task, tuple[int, ...]]]] = [
            (w.arrival_s, next(seq), w) for w in sorted(workload, key=lambda w: (w.arrival_s, w.index))]
        heapq.heapify(events)
        meta = {str(w.index): w for w in workload}
        records: list[RequestRecord] = []
        busy: Counter[int] = Counter({rank: 0.0 for rank in range(self.num_workers)})
        degree_steps: Counter[int] = Counter()
        migrations = tasks = 0
        while events:
            now = events[0][0]
            while events and events[0][0] == now:
                _, _, item = heapq.heappop(events)
                if isinstance(item, WorkloadRequest):
                    sched.add_request(self._request(item))
                    continue
                for update in self._complete(*item, now):
                    w = meta[update.request.request_id]
                    latency = now - w.arrival_s if update.kind == UpdateKind.FINISHED else None
                    records.append(RequestRecord(w.label, w.arrival_s, latency, w.deadline_s, w.n))
            if self.observe is not None:
                observed = self.observe(now)
                if isinstance(observed, DeviceState):
                    sched.devices = observed
                else:
                    sched.rank_speed = observed
            for task in sched.schedule(now).tasks:
                duration = self._duration(task, now)
                heapq.heappush(events, (now + duration, next(seq), (task, task.group)))
                for rank, sent in self._senders(task, now).items():
                    heapq.heappush(events, (now + sent, next(seq), (task, (rank,))))
                    busy[rank] += sent
                tasks += 1
                migrations += len(task.migrations)
                for rank in task.group:
                    busy[rank] += duration
                if task.stage == Stage.DENOISE:
                    degree_steps[len(task.group)] += task.num_steps * sum(sched.requests[r].n for r in task.request_ids)
        if sched.num_unfinished:
            raise SimulationStalled(f"policy {sched.policy.name} left {sched.num_unfinished} request(s) unfinished "
                                    "with nothing running")
        records.sort(key=lambda r: r.arrival_s)
        return SimResult(sched.policy.name, records, ServingMetrics.of(records), dict(busy),
                         dict(sorted(degree_steps.items())), migrations, tasks)

    def _duration(self, task: Task, now: float) -> float:
        cm, requests = self.cost_model, self.scheduler.requests
        tokens = requests[task.request_ids[0]].tokens
        images = sum(requests[rid].n for rid in task.request_ids)
        if task.stage == Stage.DENOISE:
            seconds = cm.step_s(tokens, images, len(task.group), cached=self.cache_hit_rate)
        else:
            seconds = cm.stage_s(task.stage, tokens, images, len(task.group))
        for m in task.migrations:
            r = requests[m.request_id]
            seconds += cm.migration_s(r.tokens, r.n)
        if self.speed is not None:
            seconds /= min(self.speed(rank, now) for rank in task.group)
        if self.jitter:
            seconds *= math.exp(self._rng.gauss(0.0, self.jitter))
        return seconds

    def _senders(self, task: Task, now: float) -> dict[int, float]:
        """Ranks outside the group that only send state: each is done once its sends are."""
        cm, requests = self.cost_model, self.scheduler.requests
        sent: dict[int, float] = {}
        for m in task.migrations:
            if m.src not in task.group:
                r = requests[m.request_id]
                seconds = cm.migration_s(r.tokens, r.n)
                if self.speed is not None:
                    seconds /= self.speed(m.src, now)
                sent[m.src] = sent.get(m.src, 0.0) + seconds
        return sent

    def _request(self, w: WorkloadRequest) -> Request:
        params = ImageParams(n=w.n, width=w.width, height=w.height, num_inference_steps=w.steps,
                             guidance_scale=4.0, seed=w.seed, priority=w.priority, deadline_s=w.deadline_s,
                             cache=StepCache() if self.cache_hit_rate else None)
        rid = str(w.index)
        return Request(rid, w.prompt, params, self.model.batch_key(params, rid), w.arrival_s)

    def _complete(self, task: Task, ranks: tuple[int, ...], now: float):
        """These members answer; the leader carries the items, as a worker would. A rank
        that only sent state answers when its sends are done, before the group."""
        items = []
        for rid in task.request_ids:
            r = self.scheduler.requests.get(rid)
            if r is None:
                continue
            step = 0 if task.stage == Stage.ENCODE else r.step
            if task.stage == Stage.DENOISE:
                step = min(r.num_steps, r.step + task.num_steps)
            items.append(ItemResult(rid, step, cached_steps=math.floor(step * self.cache_hit_rate)))
        updates = []
        for rank in ranks:
            result = TaskResult(task.task_id, rank, items if rank == task.group[0] else [])
            updates += self.scheduler.on_result(result, now)
        return [u for u in updates if u.kind in (UpdateKind.FINISHED, UpdateKind.FAILED)]
