"""The pure scheduler, driven with hand-made results and a fake clock (no torch, no workers)."""

import subprocess
import sys

import pytest

from engine.messages import ItemResult, Stage, TaskResult
from engine.params import ImageParams
from engine.request import Request, RequestStatus
from engine.scheduler.policies import FCFSPolicy, SRTFPolicy, StaticPolicy, make_policy
from engine.scheduler.policy import Plan, Policy, SchedulerView
from engine.scheduler.scheduler import Scheduler, UpdateKind
from tests.scheduling_helpers import pixel_size, shape_key

A = shape_key(256, 256)
B = shape_key(512, 512)


def make_request(rid, arrival=0.0, steps=4, n=1, shape=A, priority=0):
    width, height = pixel_size(shape)
    params = ImageParams(n=n, width=width, height=height, num_inference_steps=steps,
                         guidance_scale=4.5, seed=0, priority=priority)
    return Request(rid, "a prompt", params, shape, arrival)


def complete(sched, task, now=1.0, error=None, item_errors=()):
    """What a worker would answer: every member reports, the leader with the items."""
    items = []
    for rid in task.request_ids:
        req = sched.requests[rid]
        step = 0 if task.stage == Stage.ENCODE else min(req.num_steps, req.step + task.num_steps)
        items.append(ItemResult(rid, step, error="boom" if rid in item_errors else None))
    updates = []
    for rank in task.members:
        leader = rank == task.group[0]
        updates += sched.on_result(TaskResult(task.task_id, rank, items if leader else [], error=error), now)
    return updates


def run_until_idle(sched, now=0.0, limit=1000):
    """Complete tasks one schedule round at a time; returns the tasks in order."""
    seen = []
    for _ in range(limit):
        tasks = sched.schedule(now).tasks
        if not tasks:
            return seen
        for task in tasks:
            seen.append(task)
            complete(sched, task, now)
        now += 1
    raise AssertionError("scheduler did not go idle")


def test_requests_flow_encode_denoise_decode_and_finish():
    sched = Scheduler(FCFSPolicy(), num_workers=1)
    sched.add_request(make_request("r", steps=3))
    stages = [t.stage for t in run_until_idle(sched)]
    assert stages == [Stage.ENCODE, Stage.DENOISE, Stage.DENOISE, Stage.DENOISE, Stage.DECODE]
    assert sched.num_unfinished == 0 and not sched.requests


def test_a_late_request_joins_the_running_batch_at_its_own_step():
    sched = Scheduler(FCFSPolicy(), num_workers=1)
    sched.add_request(make_request("old", steps=5))
    for _ in range(3):  # encode + 2 steps
        complete(sched, sched.schedule(0).tasks[0])
    sched.add_request(make_request("new", arrival=1.0, steps=5))
    encode = sched.schedule(1).tasks[0]
    assert encode.stage == Stage.ENCODE and encode.request_ids == ["new"]
    complete(sched, encode)
    step = sched.schedule(2).tasks[0]
    assert step.stage == Stage.DENOISE and step.request_ids == ["old", "new"]
    assert (sched.requests["old"].step, sched.requests["new"].step) == (2, 0)


def test_batches_hold_at_most_max_batch_size_images():
    sched = Scheduler(FCFSPolicy(), num_workers=1, max_batch_size=4)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", arrival=i, n=2))
    tasks = run_until_idle(sched)
    for task in tasks:
        if task.stage != Stage.ENCODE:
            assert sum(2 for _ in task.request_ids) <= 4
    first_denoise = next(t for t in tasks if t.stage == Stage.DENOISE)
    assert first_denoise.request_ids == ["r0", "r1"]


def test_a_request_larger_than_the_batch_limit_still_runs_alone():
    sched = Scheduler(FCFSPolicy(), num_workers=1, max_batch_size=2)
    sched.add_request(make_request("big", n=5))
    run_until_idle(sched)
    assert not sched.requests


def test_other_shapes_are_not_starved_by_a_stream_of_arrivals():
    sched = Scheduler(FCFSPolicy(), num_workers=1)
    sched.add_request(make_request("a0", arrival=0, shape=A, steps=4))
    sched.add_request(make_request("b0", arrival=1, shape=B, steps=4))
    finished, now, n = [], 2.0, 1
    for _ in range(200):
        sched.add_request(make_request(f"a{n}", arrival=now, shape=A, steps=4))  # one new A every round
        n += 1
        for task in sched.schedule(now).tasks:
            for update in complete(sched, task, now):
                if update.kind == UpdateKind.FINISHED:
                    finished.append(update.request.request_id)
        now += 1
        if "b0" in finished:
            break
    assert "b0" in finished
    # b0 waited only for the A requests older than it, not for every later arrival.
    assert finished.index("b0") <= 3


def test_decode_of_a_finished_request_comes_before_more_denoising():
    sched = Scheduler(FCFSPolicy(), num_workers=1)
    sched.add_request(make_request("short", steps=1))
    sched.add_request(make_request("long", steps=10))
    complete(sched, sched.schedule(0).tasks[0])  # encode both
    complete(sched, sched.schedule(0).tasks[0])  # one step: short is denoised
    task = sched.schedule(0).tasks[0]
    assert task.stage == Stage.DECODE and task.request_ids == ["short"]


def test_priority_and_srtf_order():
    sched = Scheduler(FCFSPolicy(), num_workers=1, max_batch_size=1)
    sched.add_request(make_request("low", arrival=0, priority=0))
    sched.add_request(make_request("high", arrival=1, priority=5))
    assert sched.schedule(0).tasks[0].request_ids == ["high"]

    sched = Scheduler(SRTFPolicy(), num_workers=1, max_batch_size=1)
    sched.add_request(make_request("long", arrival=0, steps=20))
    sched.add_request(make_request("short", arrival=1, steps=2))
    assert sched.schedule(0).tasks[0].request_ids == ["short"]


def test_abort_of_an_idle_request_frees_its_state_on_its_worker():
    sched = Scheduler(FCFSPolicy(), num_workers=1)
    sched.add_request(make_request("r"))
    complete(sched, sched.schedule(0).tasks[0])
    update = sched.abort_request("r", now=1.0)
    assert update.kind == UpdateKind.ABORTED and update.request.status == RequestStatus.ABORTED
    out = sched.schedule(1)
    assert out.frees == [(0, ["r"])] and not out.tasks
    assert sched.abort_request("r", now=2.0) is None  # a second abort is a no-op


def test_abort_during_a_task_frees_when_the_task_returns():
    sched = Scheduler(FCFSPolicy(), num_workers=1)
    sched.add_request(make_request("r"))
    complete(sched, sched.schedule(0).tasks[0])
    task = sched.schedule(0).tasks[0]
    sched.abort_request("r", now=0.5)
    assert complete(sched, task) == []
    out = sched.schedule(1)
    assert out.frees == [(0, ["r"])] and not sched.requests


def test_a_failed_task_fails_only_its_requests():
    sched = Scheduler(FCFSPolicy(), num_workers=1, max_batch_size=1)
    sched.add_request(make_request("bad", arrival=0))
    sched.add_request(make_request("good", arrival=1))
    encode = sched.schedule(0).tasks[0]
    assert encode.request_ids == ["bad"]
    updates = complete(sched, encode, error="RuntimeError: out of memory")
    assert [(u.request.request_id, u.kind) for u in updates] == [("bad", UpdateKind.FAILED)]
    assert updates[0].request.error == "RuntimeError: out of memory"
    run_until_idle(sched)
    assert not sched.requests


def test_an_item_error_fails_one_request_of_a_batch():
    sched = Scheduler(FCFSPolicy(), num_workers=1)
    sched.add_request(make_request("a"))
    sched.add_request(make_request("b"))
    updates = complete(sched, sched.schedule(0).tasks[0], item_errors={"a"})
    kinds = {u.request.request_id: u.kind for u in updates}
    assert kinds == {"a": UpdateKind.FAILED, "b": UpdateKind.PROGRESS}


def test_new_requests_spread_over_free_workers_by_load():
    sched = Scheduler(FCFSPolicy(), num_workers=2)
    for i in range(8):
        sched.add_request(make_request(f"r{i}", arrival=i))
    tasks = sched.schedule(0).tasks
    assert sorted(len(t.request_ids) for t in tasks) == [4, 4]
    assert {t.group for t in tasks} == {(0,), (1,)}


def test_dead_worker_restarts_its_requests_then_fails_them():
    sched = Scheduler(FCFSPolicy(), num_workers=2, max_retries=1)
    sched.add_request(make_request("r"))
    task = sched.schedule(0).tasks[0]
    complete(sched, task)
    rank = sched.requests["r"].location[0]
    updates = sched.on_worker_failed(rank, "worker 0 died", now=1.0)
    assert [u.kind for u in updates] == [UpdateKind.RESTARTED]
    assert sched.requests["r"].status == RequestStatus.WAITING and sched.requests["r"].location is None
    assert rank not in sched.free_workers
    task = sched.schedule(1).tasks[0]
    assert task.group != (rank,)
    complete(sched, task)
    other = sched.requests["r"].location[0]
    updates = sched.on_worker_failed(other, "worker died again", now=2.0)
    assert [u.kind for u in updates] == [UpdateKind.FAILED]
    assert updates[0].request.error == "worker died again"
    sched.on_worker_restarted(rank)
    assert rank in sched.free_workers


def test_a_policy_that_plans_badly_is_refused():
    class Greedy(Policy):
        name = "greedy"

        def plan(self, view: SchedulerView):
            return [Plan(Stage.DENOISE, [r.request_id for r in view.requests], (0,))]

    sched = Scheduler(Greedy(), num_workers=1)
    sched.add_request(make_request("r"))
    with pytest.raises(RuntimeError, match="planned DENOISE"):
        sched.schedule(0)


def test_policies_load_by_name_or_module_path():
    assert isinstance(make_policy("fcfs"), FCFSPolicy)
    assert isinstance(make_policy("engine.scheduler.policies:SRTFPolicy"), SRTFPolicy)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("nope")
    with pytest.raises(ValueError, match="not a subclass"):
        make_policy("engine.request:ImageParams")


def test_the_scheduler_imports_without_torch():
    code = ("import sys; import engine.scheduler.scheduler, engine.scheduler.policies; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_request_moved_to_a_wider_group_lists_its_migration():
    """The degree sequence 1 -> 2 -> 1 on other ranks: each move copies state peer to peer."""
    script = [(Stage.ENCODE, (0,)), (Stage.DENOISE, (1, 2)), (Stage.DENOISE, (2,)), (Stage.DENOISE, (3,)),
              (Stage.DECODE, (3,))]

    class Scripted(Policy):
        name = "scripted"

        def plan(self, view):
            stage, group = script.pop(0)
            return [Plan(stage, [view.requests[0].request_id], group)]

    sched = Scheduler(Scripted(), num_workers=4, degrees=(1, 2))
    sched.add_request(make_request("r", steps=3))
    tasks = []
    for _ in range(5):
        out = sched.schedule(0)
        tasks.append((out.tasks[0], out.frees))
        complete(sched, out.tasks[0])
    (encode, _), (wide, free1), (narrow, free2), (moved, free3), (decode, free4) = tasks
    assert encode.migrations == []
    assert [(m.src, m.dsts) for m in wide.migrations] == [(0, (1, 2))]
    assert wide.members == (1, 2, 0)  # rank 0 only sends, then drops its copy
    assert free1 == []
    assert narrow.migrations == [] and free2 == [(1, ["r"])]  # rank 2 already holds it
    assert [(m.src, m.dsts) for m in moved.migrations] == [(2, (3,))] and moved.members == (3, 2)
    assert decode.migrations == [] and not sched.requests


def test_a_degree_the_model_cannot_split_is_refused():
    class Wide(Policy):
        name = "wide"

        def plan(self, view):
            r = view.requests[0]
            stage = Stage.ENCODE if r.location is None else Stage.DENOISE
            return [Plan(stage, [r.request_id], (0, 1, 2))]

    sched = Scheduler(Wide(), num_workers=4, degrees=(1, 2, 4))
    sched.add_request(make_request("r"))
    complete(sched, sched.schedule(0).tasks[0])  # encode on three ranks is fine
    with pytest.raises(RuntimeError, match="degree 3"):
        sched.schedule(0)


def test_static_lanes_run_one_request_at_a_time_at_a_fixed_degree():
    sched = Scheduler(make_policy("static", static_degree=2), num_workers=4, degrees=(1, 2, 4))
    for i in range(3):
        sched.add_request(make_request(f"r{i}", arrival=i, steps=2))
    tasks = run_until_idle(sched)
    groups = {}
    for task in tasks:
        assert len(task.request_ids) == 1 and len(task.group) == 2 and not task.migrations
        groups.setdefault(task.request_ids[0], set()).add(task.group)
    assert all(len(g) == 1 for g in groups.values())  # a request never changes lane
    assert groups["r0"] != groups["r1"]  # two lanes serve two requests at once
    with pytest.raises(ValueError, match="static degree 3"):
        Scheduler(make_policy("static", static_degree=3), num_workers=4, degrees=(1, 2, 4))


@pytest.mark.parametrize("shape, degree, expected", [
    (A, 1, 4),  # 256x256 with CFG: 512 token rows an image, 4 fit in 2048
    (B, 1, 1),  # 512x512 with CFG: 2048 token rows, one image at a time
    (B, 2, 2),  # at degree 2 each rank computes half the tokens
])
def test_max_batch_tokens_caps_denoise_batches_by_token_rows(shape, degree, expected):
    def denoise_batches(max_batch_tokens):
        policy = StaticPolicy(static_degree=degree, batch=True)
        sched = Scheduler(policy, num_workers=degree, max_batch_size=8, degrees=(1, 2)[:degree],
                          max_batch_tokens=max_batch_tokens)
        for i in range(6):
            sched.add_request(make_request(f"r{i}", shape=shape))
        return {len(t.request_ids) for t in run_until_idle(sched) if t.stage == Stage.DENOISE}

    assert max(denoise_batches(2048)) == expected
    assert max(denoise_batches(None)) == 6
