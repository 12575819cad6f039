"""Two ways memory telemetry could hold a rank or a request for ever, and their escapes.

Pure scheduler, hand-made DeviceStates and results, a fake clock."""

import math

import pytest

from engine.messages import ItemResult, Stage, TaskResult
from engine.scheduler.memory import MemoryModel
from engine.scheduler.policies import FCFSPolicy, make_policy
from engine.scheduler.scheduler import Scheduler
from engine.telemetry import GiB
from tests.engine.scheduler.test_telemetry_scheduling import devices
from tests.scheduling_helpers import L, S, complete, h20, make_request


def test_memory_pytorch_caches_counts_as_headroom_for_nearly_full():
    """NVML says 1 GiB of 80 free (nearly full), but the worker's allocator holds 20 GiB it
    does not use: once the readings are newer than its report, the rank takes new requests."""
    def encodes_on_rank_0(readings_time: float) -> bool:
        sched = Scheduler(FCFSPolicy(), 2, memory=MemoryModel(margin=1.0))
        sched.add_request(make_request("old", steps=4, shape=S, location=(0,)))
        [task] = sched.schedule(0.0).tasks
        sched.on_result(TaskResult(task.task_id, 0, [ItemResult("old", 1)], cached_memory_bytes=20 * GiB), 50.0)
        sched.add_request(make_request("new0", arrival=51.0, steps=4, shape=S))
        sched.add_request(make_request("new1", arrival=51.0, steps=4, shape=S))
        sched.devices = devices([1, 1], nearly_full={0, 1}, time=readings_time)
        return any(t.stage == Stage.ENCODE and t.group == (0,) for t in sched.schedule(60.0).tasks)

    assert encodes_on_rank_0(readings_time=55.0)
    assert not encodes_on_rank_0(readings_time=45.0)  # older readings may still count that memory as used


def run_steady_traffic(policy: str, starvation_s: float, ticks: int = 80) -> tuple[float | None, list[float]]:
    """One worker, 40 GiB free, a small request running; a 1536x1536 request whose
    predicted step (81 GiB) fits no headroom arrives at t=0, then a small 512x512 request
    every second. Returns when the large one was encoded and when small ones were."""
    sched = Scheduler(make_policy(policy, cost_model=h20()), 1, memory=MemoryModel(margin=1.0),
                      starvation_s=starvation_s)
    sched.memory.learn(Stage.DENOISE, S, 1, 1, GiB)  # quadratic extrapolation: 81 GiB for L
    sched.devices = devices([40])
    sched.add_request(make_request("running", arrival=-1.0, steps=2, shape=S, location=(0,)))
    sched.add_request(make_request("large", arrival=0.0, steps=2, shape=L))
    large_at, small_at = None, []
    for tick in range(ticks):
        now = float(tick)
        sched.add_request(make_request(f"small{tick}", arrival=now, steps=2, shape=S))
        sched.devices = devices([40], time=now)
        for task in sched.schedule(now).tasks:
            if task.stage == Stage.ENCODE:
                if "large" in task.request_ids:
                    large_at = now
                small_at += [now] * sum(rid != "large" for rid in task.request_ids)
            complete(sched, task, now)
    return large_at, small_at


@pytest.mark.parametrize("policy", ["fcfs", "edf"])
def test_a_request_too_large_for_any_headroom_escapes_steady_small_traffic(policy):
    never, small = run_steady_traffic(policy, starvation_s=math.inf, ticks=30)
    assert never is None and len(small) >= 7  # without the escape it waits while the small ones run
    large_at, small = run_steady_traffic(policy, starvation_s=30.0)
    assert large_at is not None and 30.0 <= large_at <= 40.0
    # Once it starved, nothing newer overtook it: the running ones drained, then it ran.
    assert not [t for t in small if 30.0 < t < large_at]
